"""The token lane (broker.api.token_lane): ``POST /v1/token`` answers exactly as through FastAPI's stack."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.types import Receive, Scope, Send

from broker.api.app import create_app
from broker.api.token_lane import BrokerApp, TokenLane
from broker.attest.dev import DevIssuer
from broker.clock import SystemClock
from broker.config import Settings
from tests.helpers import POLICIES, SUPPORT, exchange_form, form_body, intent

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
READ = intent("orders.read", "customers/c-42/orders/ord-1001", customer="c-42")
REFUND_500 = intent("payments.refund", "customers/c-42/orders/ord-1001", customer="c-42", amount=500, currency="EUR")


class _Counting:
    """Wraps the lane to count the requests it served."""

    def __init__(self, lane: TokenLane) -> None:
        self.lane = lane
        self.served = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.served += 1
        await self.lane(scope, receive, send)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[TestClient, BrokerApp, DevIssuer, _Counting]]:
    """One broker; each case is sent once through the lane and once with the lane off (FastAPI's stack)."""
    app = create_app(Settings(data_dir=tmp_path / "data", policies_dir=POLICIES))
    assert isinstance(app, BrokerApp) and app.token_lane is not None
    counting = _Counting(app.token_lane)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, app, DevIssuer.load_or_create(tmp_path / "data"), counting


def _token(issuer: DevIssuer, **kw: Any) -> str:
    return issuer.mint(kw.pop("spiffe_id", SUPPORT), kw.pop("audience", "nhi-broker"), ttl=300, clock=SystemClock())


CASES: list[tuple[str, Any, dict[str, str]]] = [
    ("wrong media type", b"x", {"Content-Type": "text/plain"}),
    ("empty body", b"", FORM),
    ("repeated parameter", b"grant_type=a&grant_type=b", FORM),
    ("not UTF-8", b"grant_type=%ff", FORM),
    ("unknown grant type", {"grant_type": "password"}, FORM),
    ("missing subject token", {"grant_type": "urn:ietf:params:oauth:grant-type:token-exchange"}, FORM),
    ("garbage subject token", "garbage", FORM),
    ("refund over the limit", "refund", FORM),
    ("ok", "ok", FORM),
    ("oversized declared body", b"a=b", {**FORM, "Content-Length": "99999999"}),
    ("two DPoP headers", "dpop2", FORM),
]


@pytest.mark.parametrize(("name", "body", "headers"), CASES, ids=[c[0] for c in CASES])
def test_lane_answers_as_fastapi_does(
    pair: tuple[TestClient, BrokerApp, DevIssuer, _Counting], name: str, body: Any, headers: dict[str, str]
) -> None:
    client, app, issuer, counting = pair
    answers = []
    for lane in (counting, None):
        app.token_lane = lane  # type: ignore[assignment]
        extra: list[tuple[str, str]] = []
        if body == "garbage":
            payload = form_body(exchange_form("a.b.c", "orders-api", READ))
        elif body == "refund":
            payload = form_body(exchange_form(_token(issuer), "payments-api", REFUND_500))
        elif body in ("ok", "dpop2"):
            payload = form_body(exchange_form(_token(issuer), "orders-api", READ))
            if body == "dpop2":
                extra = [("DPoP", "a.b.c"), ("DPoP", "d.e.f")]
        else:
            payload = body if isinstance(body, bytes) else form_body(body)
        r = client.post("/v1/token", content=payload, headers=[*headers.items(), *extra])
        answers.append(r)
    a, b = answers
    assert a.status_code == b.status_code, (a.text, b.text)
    assert a.status_code != 500
    assert a.headers["content-type"] == b.headers["content-type"]
    assert a.headers.get("cache-control") == b.headers.get("cache-control") == "no-store"
    assert a.headers.get("retry-after") == b.headers.get("retry-after")
    assert "traceresponse" in a.headers and "traceresponse" in b.headers
    if a.status_code == 200:
        assert set(a.json()) == set(b.json())
        assert a.json()["authorization_details"] == b.json()["authorization_details"] == json.loads(READ)
    else:
        assert a.json() == b.json()
    assert counting.served == 1


def test_unexpected_error_is_a_bare_500_and_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app(Settings(data_dir=tmp_path / "data", policies_dir=POLICIES))
    with TestClient(app, raise_server_exceptions=False) as client:
        issuer = DevIssuer.load_or_create(tmp_path / "data")

        async def broken(request: object) -> object:
            raise RuntimeError("secret request detail")

        monkeypatch.setattr(app.state.runtime.broker, "exchange", broken)
        r = client.post("/v1/token", content=form_body(exchange_form(_token(issuer), "orders-api", READ)),
                        headers=FORM)
        metrics = client.get("/metrics").text
    assert r.status_code == 500
    assert r.json() == {"error": "server_error", "error_description": "internal error; nothing was issued"}
    assert "secret request detail" not in r.text
    assert 'nhi_broker_errors_total{error="server_error"} 1.0' in metrics
    assert 'nhi_broker_http_requests_total{method="POST",route="/v1/token",status="500"} 1.0' in metrics


def test_a_middleware_added_later_sees_token_requests(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path / "data", policies_dir=POLICIES))
    seen: list[str] = []

    class Spy:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                seen.append(scope["path"])
            await self.inner(scope, receive, send)

    app.add_middleware(Spy)
    assert isinstance(app, BrokerApp) and app.token_lane is None
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post("/v1/token", content=b"x", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    assert seen == ["/v1/token"]
