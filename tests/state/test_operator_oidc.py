"""Operators authenticated by an OIDC issuer: their identity token opens the admin API by role,
and is never accepted as a workload identity for token exchange."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient

from broker.api.app import create_app
from broker.config import Settings
from broker.mint.keys import public_jwk
from tests.helpers import POLICIES, exchange_form, intent

ISSUER = "https://login.example.test"
AUDIENCE = "nhi-broker-admin"


class Idp:
    """A signing key and the JWKS file of a test OIDC provider."""

    def __init__(self, directory: Path) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.jwk = public_jwk(self.key)
        self.jwks_file = directory / "idp-jwks.json"
        self.jwks_file.write_text(json.dumps({"keys": [self.jwk]}))

    def token(self, sub: str, **overrides: Any) -> str:
        now = int(time.time())
        claims = {"iss": ISSUER, "sub": sub, "aud": AUDIENCE, "iat": now, "exp": now + 300,
                  "jti": uuid.uuid4().hex, **overrides}
        return jwt.encode(claims, self.key, algorithm="ES256", headers={"kid": self.jwk["kid"], "typ": "JWT"})


@pytest.fixture
def idp(tmp_path: Path) -> Idp:
    return Idp(tmp_path)


@pytest.fixture
def client(tmp_path: Path, idp: Idp) -> Iterator[TestClient]:
    settings = Settings(
        data_dir=tmp_path / "data", policies_dir=POLICIES,
        operator_issuers=[{"issuer": ISSUER, "kind": "oidc", "audience": AUDIENCE, "jwks_file": idp.jwks_file,
                           "spiffe_id_template": "spiffe://ops.example.org/user/{sub}"}],
        operators=[
            {"name": "olivia", "role": "admin", "spiffe_id": "spiffe://ops.example.org/user/u-123"},
            {"name": "otto", "role": "auditor", "spiffe_id": "spiffe://ops.example.org/user/u-456"},
        ],
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def suspend(client: TestClient, token: str) -> Any:
    return client.post("/v1/admin/workloads/ticket-triage/suspend", json={"reason": "drill"},
                       headers={"Authorization": f"Bearer {token}"})


def test_oidc_operator_by_role(client: TestClient, idp: Idp) -> None:
    r = suspend(client, idp.token("u-123"))
    assert r.status_code == 200, r.text
    assert suspend(client, idp.token("u-456")).json()["error"] == "access_denied"
    reader = client.get("/v1/admin/workloads/ticket-triage", headers={"Authorization": f"Bearer {idp.token('u-456')}"})
    assert reader.json()["suspended"] is True


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda idp: idp.token("u-999"), "this identity is not a configured operator"),
        (lambda idp: idp.token("u-123", aud="someone-else"), "operator identity not accepted"),
        (lambda idp: idp.token("u-123", iss="https://evil.example.test"), "unknown issuer"),
        (lambda idp: idp.token("u-123", exp=int(time.time()) - 600), "operator identity not accepted"),
        (lambda idp: idp.token("a@b"), "operator identity not accepted"),
    ],
)
def test_refused_operator_identities(client: TestClient, idp: Idp, make: Any, fragment: str) -> None:
    r = suspend(client, make(idp))
    assert r.status_code == 401
    assert r.json()["error"] == "invalid_token" and fragment in r.json()["error_description"]


def test_operator_token_is_single_use_and_not_a_workload_identity(client: TestClient, idp: Idp) -> None:
    token = idp.token("u-123")
    assert suspend(client, token).status_code == 200
    assert "already been used" in suspend(client, token).json()["error_description"]
    r = client.post("/v1/token", data=exchange_form(idp.token("u-123"), "orders-api",
                                                    intent("orders.read", "customers/c-1/orders", customer="c-1")))
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
