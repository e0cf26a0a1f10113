"""POST /v1/token in process: every bad input gets a precise RFC 6749 error, never a 500."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient

from broker.api.app import create_app
from broker.attest.dev import DevIssuer
from broker.clock import SystemClock
from broker.config import Settings
from tests.helpers import (
    POLICIES,
    SUPPORT,
    TRIAGE,
    delegated_form,
    dev_user,
    exchange_form,
    form_body,
    intent,
    verified_claims,
)

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
READ = intent("orders.read", "customers/c-42/orders/ord-1001", customer="c-42")
REFUND_20 = intent("payments.refund", "customers/c-42/orders/ord-1001", customer="c-42", amount=20, currency="EUR")
REFUND_500 = intent("payments.refund", "customers/c-42/orders/ord-1001", customer="c-42", amount=500, currency="EUR")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", policies_dir=POLICIES)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def issuer(settings: Settings, client: TestClient) -> DevIssuer:
    return DevIssuer.load_or_create(settings.data_dir)


def identity(issuer: DevIssuer, spiffe_id: str = SUPPORT, audience: str = "nhi-broker", ttl: int = 300) -> str:
    return issuer.mint(spiffe_id, audience, ttl=ttl, clock=SystemClock())


def post(client: TestClient, form: dict[str, str] | bytes, headers: dict[str, str] | None = None) -> Any:
    body = form if isinstance(form, bytes) else form_body(form)
    return client.post("/v1/token", content=body, headers=headers if headers is not None else FORM)


def forged(issuer: DevIssuer, settings: Settings, **overrides: Any) -> str:
    """A dev-issuer-shaped token with chosen claims, signed by the real dev key unless `key` is given."""
    from cryptography.hazmat.primitives import serialization

    key = overrides.pop("key", None)
    if key is None:
        key = serialization.load_pem_private_key((settings.data_dir / "dev-issuer-key.pem").read_bytes(), None)
    kid = jwt.get_unverified_header(identity(issuer))["kid"]
    now = int(time.time())
    claims = {"iss": "urn:nhi-broker:dev-issuer", "sub": SUPPORT, "aud": "nhi-broker", "iat": now,
              "exp": now + 300, "jti": f"j-{time.monotonic_ns()}"}
    claims.update(overrides)
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid, "typ": "JWT"})


def refund_form(issuer: DevIssuer, settings: Settings, details: str, customer: str = "c-42") -> dict[str, str]:
    """A refund exchange for the verified end user ``customer`` (the sample refund rules need one)."""
    return delegated_form(dev_user(settings.data_dir, customer), identity(issuer), "payments-api", details)


def test_refund_within_limit_is_issued(client: TestClient, issuer: DevIssuer, settings: Settings) -> None:
    r = post(client, refund_form(issuer, settings, REFUND_20))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_type"] == "Bearer"
    assert body["issued_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
    assert 0 < body["expires_in"] <= 120  # the refund rule caps the lifetime at 120 s
    assert r.headers["cache-control"] == "no-store"
    claims = verified_claims(body["access_token"], client.get("/.well-known/jwks.json").json(), "payments-api")
    assert claims["txn"] == body["receipt"]["leaf_hash"]
    assert claims["authorization_details"] == json.loads(REFUND_20)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# (case, form or raw body, headers, status, error, description substring)
def bad_inputs(issuer: DevIssuer, settings: Settings) -> list[tuple[str, Any, dict[str, str] | None, int, str, str]]:
    tok = identity(issuer)
    other_key = ec.generate_private_key(ec.SECP256R1())
    good = exchange_form(tok, "orders-api", READ)
    return [
        ("json content type", json.dumps(good).encode(), {"Content-Type": "application/json"}, 415,
         "invalid_request", "x-www-form-urlencoded"),
        ("no content type", form_body(good), {}, 415, "invalid_request", "x-www-form-urlencoded"),
        ("oversized body", form_body({**good, "pad": "x" * 70000}), FORM, 413, "invalid_request", "larger than"),
        ("empty body", b"", FORM, 400, "invalid_request", "empty"),
        ("not utf-8", b"grant_type=\xff\xfe", FORM, 400, "invalid_request", "UTF-8"),
        ("bad percent-encoding", b"grant_type=%ff", FORM, 400, "invalid_request", "UTF-8"),
        ("not a form", b"just text", FORM, 400, "invalid_request", "form encoding"),
        ("missing grant_type", {k: v for k, v in good.items() if k != "grant_type"}, FORM, 400,
         "invalid_request", "grant_type is required"),
        ("unknown grant_type", {**good, "grant_type": "client_credentials"}, FORM, 400,
         "unsupported_grant_type", "token-exchange"),
        ("repeated parameter", form_body(good) + b"&audience=payments-api", FORM, 400, "invalid_request",
         "repeated"),
        ("missing subject_token", {k: v for k, v in good.items() if k != "subject_token"}, FORM, 400,
         "invalid_request", "subject_token is required"),
        ("missing subject_token_type", {k: v for k, v in good.items() if k != "subject_token_type"}, FORM, 400,
         "invalid_request", "subject_token_type is required"),
        ("unknown subject_token_type", {**good, "subject_token_type": "urn:x:saml"}, FORM, 400,
         "invalid_request", "subject_token_type"),
        ("missing audience", {k: v for k, v in good.items() if k != "audience"}, FORM, 400, "invalid_request",
         "audience is required"),
        ("actor_token", {**good, "actor_token": tok}, FORM, 400, "invalid_request", "actor_token"),
        ("unissuable requested_token_type", {**good, "requested_token_type": "urn:x:secret"}, FORM, 400,
         "invalid_target", "requested_token_type"),
        ("malformed subject_token", {**good, "subject_token": "not-a-jwt"}, FORM, 400, "invalid_grant", ""),
        ("bad signature", {**good, "subject_token": forged(issuer, settings, key=other_key)}, FORM, 400,
         "invalid_grant", "signature"),
        ("tampered payload", {**good, "subject_token": tok.split(".")[0] + "." + _b64(json.dumps(
            {**jwt.decode(tok, options={"verify_signature": False}), "sub": SUPPORT + "x"}).encode())
            + "." + tok.split(".")[2]}, FORM, 400, "invalid_grant", "signature"),
        ("expired", {**good, "subject_token": forged(issuer, settings, iat=int(time.time()) - 900,
                                                      exp=int(time.time()) - 600)}, FORM, 400,
         "invalid_grant", "expired"),
        ("wrong audience", {**good, "subject_token": forged(issuer, settings, aud="someone-else")}, FORM, 400,
         "invalid_grant", "audience"),
        ("unknown issuer", {**good, "subject_token": forged(issuer, settings, iss="https://evil.example")}, FORM,
         400, "invalid_grant", "issuer"),
        ("exp as string", {**good, "subject_token": forged(issuer, settings, exp=str(int(time.time()) + 60))},
         FORM, 400, "invalid_grant", "exp"),
        ("absurd exp", {**good, "subject_token": forged(issuer, settings, exp=10**20)}, FORM, 400,
         "invalid_grant", ""),
        ("alg none", {**good, "subject_token": _b64(b'{"alg":"none","typ":"JWT"}') + "." + _b64(json.dumps(
            {"iss": "urn:nhi-broker:dev-issuer", "sub": SUPPORT, "aud": "nhi-broker",
             "exp": int(time.time()) + 60}).encode()) + "."}, FORM, 400, "invalid_grant", ""),
        ("oversized subject_token", {**good, "subject_token": "a" * 9000 + ".b.c"}, FORM, 400, "invalid_grant",
         ""),
        ("malformed authorization_details", {**good, "authorization_details": "[{"}, FORM, 400,
         "invalid_authorization_details", "not valid JSON"),
        ("missing authorization_details", {k: v for k, v in good.items() if k != "authorization_details"}, FORM,
         400, "invalid_authorization_details", "required"),
        ("traversal in resource", {**good, "authorization_details": intent(
            "orders.read", "customers/c-42/orders/../../admin", customer="c-42")}, FORM, 400,
         "invalid_authorization_details", "resource"),
        ("unregistered workload", {**good, "subject_token": identity(
            issuer, "spiffe://example.org/ns/evil/sa/impostor")}, FORM, 403, "access_denied", "not registered"),
        ("audience not allowed for workload", {**good, "audience": "tickets-api"}, FORM, 400, "invalid_target",
         ""),
        ("over-limit refund", refund_form(issuer, settings, REFUND_500), FORM, 403,
         "access_denied", "no rule allows payments.refund"),
        ("refund without a verified end user", exchange_form(identity(issuer), "payments-api", REFUND_20), FORM,
         403, "access_denied", "denied by rule refund-requires-verified-user"),
        ("refund for another customer than the verified user", refund_form(issuer, settings, REFUND_20, "c-77"),
         FORM, 403, "access_denied", "denied by rule refund-other-customer"),
        ("triage may not reach payments", exchange_form(identity(issuer, TRIAGE), "payments-api", REFUND_20), FORM,
         400, "invalid_target", "not registered for workload"),
    ]


def test_bad_inputs_table(client: TestClient, issuer: DevIssuer, settings: Settings) -> None:
    failures = []
    for case, form, headers, status, error, needle in bad_inputs(issuer, settings):
        r = post(client, form, headers)
        body = r.json()
        ok = (r.status_code == status and body.get("error") == error
              and needle.lower() in body.get("error_description", "").lower()
              and "Traceback" not in r.text)
        if not ok:
            failures.append(f"{case}: {r.status_code} {body}")
    assert not failures, "\n".join(failures)


def test_policy_denial_names_rule_id_not_text(client: TestClient, issuer: DevIssuer) -> None:
    export = intent("customers.export", "customers/c-42", customer="c-42")
    r = post(client, exchange_form(identity(issuer), "orders-api", export))
    assert r.status_code == 403
    body = r.json()
    assert body["error"] == "access_denied"
    assert body["rule_id"]
    assert body["rule_id"] in body["error_description"]
    assert "customers.export," not in body["error_description"]  # no policy line text


def test_identity_token_is_single_use(client: TestClient, issuer: DevIssuer) -> None:
    tok = identity(issuer)
    assert post(client, exchange_form(tok, "orders-api", READ)).status_code == 200
    r = post(client, exchange_form(tok, "orders-api", READ))
    assert (r.status_code, r.json()["error"]) == (400, "invalid_grant")
    assert "already been used" in r.json()["error_description"]


def test_denials_and_issuances_are_ledger_entries(client: TestClient, issuer: DevIssuer, settings: Settings) -> None:
    before = client.get("/v1/ledger/checkpoint").text.splitlines()[1]
    assert post(client, refund_form(issuer, settings, REFUND_500)).status_code == 403
    ok = post(client, refund_form(issuer, settings, REFUND_20))
    size = int(before)
    entries = client.get("/v1/ledger/entries", params={"start": size, "end": size + 2}).json()["entries"]
    denial, issuance = entries[0]["entry"], entries[1]["entry"]
    assert denial["kind"] == "denial" and denial["decision"]["effect"] == "deny"
    assert denial["intent"]["context"]["amount"] == 500
    assert denial["workload"]["owner"]
    assert issuance["kind"] == "issuance"
    assert issuance["credential"]["jti"] == verified_claims(
        ok.json()["access_token"], client.get("/.well-known/jwks.json").json(), "payments-api")["jti"]
    assert ok.json()["access_token"] not in json.dumps(entries)


def test_attestation_failures_write_no_ledger_entry(client: TestClient) -> None:
    size = client.get("/v1/ledger/checkpoint").text.splitlines()[1]
    r = post(client, exchange_form("a.b.c", "orders-api", READ))
    assert r.status_code == 400
    assert client.get("/v1/ledger/checkpoint").text.splitlines()[1] == size


@pytest.mark.parametrize(
    ("method", "path", "status", "error"),
    [("GET", "/v1/token", 405, "method_not_allowed"), ("GET", "/nope", 404, "not_found"),
     ("GET", "/v1/ledger/entries?start=a&end=2", 400, "invalid_request"),
     ("GET", "/v1/ledger/entries?start=5&end=2", 400, "invalid_request"),
     ("GET", "/v1/ledger/proof/inclusion?tree_size=1", 400, "invalid_request"),
     ("GET", "/v1/ledger/proof/inclusion?tree_size=1&leaf_hash=zz", 400, "invalid_request"),
     ("GET", "/v1/ledger/proof/inclusion?tree_size=999999&index=0", 400, "invalid_request"),
     ("GET", "/v1/ledger/proof/inclusion?tree_size=1&leaf_hash=" + "0" * 64, 404, "not_found"),
     ("GET", "/v1/ledger/proof/consistency?first=5&second=2", 400, "invalid_request")],
)
def test_other_endpoints_answer_json_errors(client: TestClient, method: str, path: str, status: int,
                                            error: str) -> None:
    r = client.request(method, path)
    assert r.status_code == status, r.text
    assert r.json()["error"] == error
