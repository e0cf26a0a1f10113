"""The token endpoint's answer and request id, built without Starlette's and uuid's plumbing, are byte for
byte what JSONResponse and uuid.UUID(version=4) give."""

from __future__ import annotations

import os
import uuid
from typing import Any

import pytest
from starlette.responses import JSONResponse

from broker.api.errors import NO_STORE
from broker.api.routes import token as token_route
from broker.api.routes.token import JsonAnswer, _request_id

PAYLOADS: list[dict[str, Any]] = [
    {"access_token": "eyJ" + "a" * 600, "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
     "token_type": "DPoP", "expires_in": 300,
     "authorization_details": [{"type": "intent", "action": "orders.read", "resource": "customers/c-42",
                                "context": {"customer": "Zoë ✓ \U0001f600", "amount": 20.5, "note": 'q"\\\n'}}],
     "receipt": {"index": 7, "leaf_hash": "ab" * 32}},
    {"auth_req_id": "r-1", "expires_in": 600, "interval": 5, "rule_id": "refund-review"},
]


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("nonce", [None, "n-123"])
def test_json_answer_is_what_json_response_sends(payload: dict[str, Any], nonce: str | None) -> None:
    request_id = _request_id()
    headers = {**NO_STORE, "X-Request-Id": request_id}
    if nonce is not None:
        headers["DPoP-Nonce"] = nonce
    reference = JSONResponse(payload, headers=headers)
    ours = JsonAnswer(payload, request_id, nonce)
    assert ours.body == reference.body
    assert ours.status_code == reference.status_code == 200
    assert sorted(ours.raw_headers) == sorted(reference.raw_headers)


def test_json_answer_refuses_nan_as_json_response_does() -> None:
    with pytest.raises(ValueError):
        JSONResponse({"x": float("nan")})
    with pytest.raises(ValueError):
        JsonAnswer({"x": float("nan")}, _request_id())


def test_request_id_is_a_version_4_uuid_of_the_random_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    for _ in range(20000):
        raw = os.urandom(16)
        monkeypatch.setattr(token_route, "random_bytes", lambda n, raw=raw: raw)
        assert _request_id() == uuid.UUID(bytes=raw, version=4).hex
    for raw in (b"\x00" * 16, b"\xff" * 16):
        monkeypatch.setattr(token_route, "random_bytes", lambda n, raw=raw: raw)
        assert _request_id() == uuid.UUID(bytes=raw, version=4).hex
