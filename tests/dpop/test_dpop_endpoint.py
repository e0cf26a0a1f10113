"""DPoP at POST /v1/token, in process: binding (cnf.jkt, token_type DPoP), policy bindings, nonces,
and errors that name the problem. Tokens are checked with jwcrypto, an independent JOSE library."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from jwcrypto import jwk as jwcrypto_jwk
from jwcrypto import jwt as jwcrypto_jwt

from broker.api.app import create_app
from broker.attest.dev import DevIssuer
from broker.clock import SystemClock
from broker.config import Settings
from tests.dpop.dpop_helpers import jwk_of, new_key, proof
from tests.helpers import POLICIES, SUPPORT, exchange_form, form_body, intent

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
HTU = "http://127.0.0.1:8080/v1/token"  # the issuer URL of default settings + the endpoint path
READ = intent("orders.read", "customers/c-42/orders/ord-1001", customer="c-42")
CANCEL = intent("orders.cancel", "customers/c-42/orders/ord-1001", customer="c-42")
UPDATE = intent("customers.update", "customers/c-42", customer="c-42")


def _client(tmp_path: Path, **settings: Any) -> Iterator[tuple[TestClient, DevIssuer]]:
    s = Settings(data_dir=tmp_path / "data", policies_dir=POLICIES, **settings)
    with TestClient(create_app(s), raise_server_exceptions=False) as c:
        yield c, DevIssuer.load_or_create(s.data_dir)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[tuple[TestClient, DevIssuer]]:
    yield from _client(tmp_path)


@pytest.fixture
def nonce_client(tmp_path: Path) -> Iterator[tuple[TestClient, DevIssuer]]:
    yield from _client(tmp_path, dpop_nonce=True)


def post(c: TestClient, issuer: DevIssuer, details: str, dpop: str | list[str] | None = None,
         cnf_jwk: dict[str, Any] | None = None) -> Any:
    subject = issuer.mint(SUPPORT, "nhi-broker", clock=SystemClock(), cnf_jwk=cnf_jwk)
    headers: Any = dict(FORM)
    if isinstance(dpop, list):
        headers = [*FORM.items(), *(("DPoP", p) for p in dpop)]
    elif dpop is not None:
        headers["DPoP"] = dpop
    return c.post("/v1/token", content=form_body(exchange_form(subject, "orders-api", details)), headers=headers)


def verified_claims(c: TestClient, token: str) -> dict[str, Any]:
    keyset = jwcrypto_jwk.JWKSet.from_json(json.dumps(c.get("/.well-known/jwks.json").json()))
    return json.loads(jwcrypto_jwt.JWT(jwt=token, key=keyset, algs=["ES256"]).claims)


def test_dpop_proof_binds_the_token(client: tuple[TestClient, DevIssuer]) -> None:
    c, issuer = client
    key = new_key()
    r = post(c, issuer, READ, proof(key, htu=HTU, iat=time.time()))
    assert r.status_code == 200, r.text
    assert r.json()["token_type"] == "DPoP"
    claims = verified_claims(c, r.json()["access_token"])
    assert claims["cnf"] == {"jkt": jwcrypto_jwk.JWK(**jwk_of(key)).thumbprint()}
    # Without a proof the same intent gets a bearer token without cnf.
    bearer = post(c, issuer, READ)
    assert bearer.json()["token_type"] == "Bearer"
    assert "cnf" not in verified_claims(c, bearer.json()["access_token"])


def test_metadata_advertises_dpop_algorithms(client: tuple[TestClient, DevIssuer]) -> None:
    c, _ = client
    algs = c.get("/.well-known/oauth-authorization-server").json()["dpop_signing_alg_values_supported"]
    assert "ES256" in algs and not any(a.startswith("HS") for a in algs)


def test_bad_proofs_get_invalid_dpop_proof(client: tuple[TestClient, DevIssuer]) -> None:
    c, issuer = client
    key = new_key()
    replayed = proof(key, htu=HTU, iat=time.time())
    assert post(c, issuer, READ, replayed).status_code == 200
    cases = [
        (replayed, "already been used"),
        (proof(key, htu="http://127.0.0.1:8080/v1/other", iat=time.time()), "'htu' does not match"),
        (proof(key, htu=HTU, htm="GET", iat=time.time()), "'htm' does not match"),
        ([proof(key, htu=HTU, iat=time.time()), proof(key, htu=HTU, iat=time.time())], "more than one DPoP header"),
        ("garbage", "not a compact JWS"),
    ]
    for given, error in cases:
        r = post(c, issuer, READ, given)
        assert r.status_code == 400, r.text
        assert r.json()["error"] == "invalid_dpop_proof"
        assert error in r.json()["error_description"]


def test_rule_requiring_dpop(client: tuple[TestClient, DevIssuer]) -> None:
    c, issuer = client
    r = post(c, issuer, CANCEL)
    assert r.status_code == 400
    assert r.json() == {"error": "invalid_dpop_proof",
                        "error_description": "rule orders-cancel-dpop requires a DPoP-bound token: send a DPoP proof"}
    ok = post(c, issuer, CANCEL, proof(new_key(), htu=HTU, iat=time.time()))
    assert ok.status_code == 200, ok.text
    assert ok.json()["token_type"] == "DPoP"
    # The refusal is in the ledger as a denial naming the rule.
    size = int(c.get("/v1/ledger/checkpoint").text.splitlines()[1])
    entries = c.get("/v1/ledger/entries", params={"start": 0, "end": size}).json()["entries"]
    kinds = [json.loads(base64.b64decode(e["leaf"])) for e in entries]
    denial = next(e for e in kinds if e["kind"] == "denial")
    assert "orders-cancel-dpop" in json.dumps(denial)
    issued = [e for e in kinds if e["kind"] == "issuance"][-1]
    assert issued["credential"]["cnf_jkt"] == verified_claims(c, ok.json()["access_token"])["cnf"]["jkt"]


def test_rule_requiring_the_identity_key(client: tuple[TestClient, DevIssuer]) -> None:
    c, issuer = client
    key, other = new_key(), new_key()
    ok = post(c, issuer, UPDATE, proof(key, htu=HTU, iat=time.time()), cnf_jwk=jwk_of(key))
    assert ok.status_code == 200, ok.text
    for dpop, cnf in [(proof(other, htu=HTU, iat=time.time()), jwk_of(key)),
                      (proof(key, htu=HTU, iat=time.time()), None)]:
        r = post(c, issuer, UPDATE, dpop, cnf_jwk=cnf)
        assert r.status_code == 400
        assert r.json()["error"] == "invalid_dpop_proof"
        assert "key the workload identity is bound to" in r.json()["error_description"]
    missing = post(c, issuer, UPDATE, None, cnf_jwk=jwk_of(key))
    assert "requires a DPoP-bound token" in missing.json()["error_description"]


def test_identity_with_a_bad_cnf_is_not_attested(client: tuple[TestClient, DevIssuer]) -> None:
    c, issuer = client
    r = post(c, issuer, READ, cnf_jwk={"kty": "oct", "k": "c2VjcmV0"})
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_grant"
    assert "cnf.jwk is refused" in r.json()["error_description"]


def test_server_nonce_round_trip(nonce_client: tuple[TestClient, DevIssuer]) -> None:
    c, issuer = nonce_client
    key = new_key()
    first = post(c, issuer, READ, proof(key, htu=HTU, iat=time.time()))
    assert first.status_code == 400
    assert first.json()["error"] == "use_dpop_nonce"
    nonce = first.headers["DPoP-Nonce"]
    second = post(c, issuer, READ, proof(key, htu=HTU, iat=time.time(), nonce=nonce))
    assert second.status_code == 200, second.text
    assert second.headers["DPoP-Nonce"]
    stale = post(c, issuer, READ, proof(key, htu=HTU, iat=time.time(), nonce="bm9wZQ"))
    assert stale.json()["error"] == "use_dpop_nonce"
