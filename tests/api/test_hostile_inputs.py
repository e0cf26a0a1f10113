"""Bad input never costs a 500 or unbounded memory: inputs a hostile client would send, each with the
precise status and ``error`` it must get (issue 10, item 6).

Every row runs against the real app in process (real SQLite state and ledger); every answer is
checked to be an RFC 6749 error body with no 5xx and no traceback.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient

from broker.api.app import create_app
from broker.attest.dev import DevIssuer, DevUserIssuer
from broker.audit import WitnessSigner
from broker.clock import FixedClock, SystemClock
from broker.config import Settings
from broker.operators import hash_secret
from tests.dpop.dpop_helpers import new_key, proof
from tests.helpers import POLICIES, SUPPORT, LiveBroker, delegated_form, dev_user, exchange_form, form_body, intent
from tests.state.conftest import SHARED_REDIS, drop_prefix, unique_prefix

ADMIN = "admin-token-0123456789"
APPROVER = "approver-token-0123456789"
PAYMENTS_SECRET = "payments-secret-0123456789"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
JSON = {"Content-Type": "application/json"}
HTU = "http://127.0.0.1:8080/v1/token"
RESOURCE = "customers/c-42/orders/ord-1001"
BIG_INT = "1" * 5000  # Python's int() refuses more than 4300 digits with a bare ValueError
BIDI = ["\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2068", "\u2069",
        "\u200e", "\u200f", "\u061c"]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def settings(data_dir: Path, policies: Path = POLICIES, **extra: Any) -> Settings:
    return Settings(
        data_dir=data_dir, policies_dir=policies,
        operators=[
            {"name": "alice", "role": "admin", "token_sha256": hash_secret(ADMIN)},
            {"name": "april", "role": "approver", "token_sha256": hash_secret(APPROVER),
             "groups": ["refund-approvers"]},
        ],
        introspection_clients=[{"client_id": "payments-api", "secret_sha256": hash_secret(PAYMENTS_SECRET),
                                "audiences": ["payments-api"]}],
        **extra,
    )


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, DevIssuer]]:
    s = settings(tmp_path_factory.mktemp("hostile") / "data")
    with TestClient(create_app(s), raise_server_exceptions=False) as c:
        yield c, DevIssuer.load_or_create(s.data_dir)


def assert_precise(r: Any, status: int, error: str) -> dict[str, Any]:
    """The answer is exactly ``status`` with ``error``, an RFC 6749 body, and no trace of a traceback."""
    assert r.status_code < 500, r.text
    assert "Traceback" not in r.text and "File \"" not in r.text
    assert (r.status_code, r.json().get("error")) == (status, error), r.text
    body: dict[str, Any] = r.json()
    assert isinstance(body.get("error_description"), str) and body["error_description"]
    return body


def details(context: dict[str, Any] | str, action: str = "payments.refund") -> str:
    """``authorization_details`` with ``context`` (a dict, or raw JSON text spliced in as is)."""
    raw = context if isinstance(context, str) else json.dumps(context)
    return f'[{{"type":"intent","action":"{action}","resource":"{RESOURCE}","context":{raw}}}]'


# -- POST /v1/token: authorization_details -------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    details: str
    status: int
    error: str
    says: str = ""  # a fragment the error_description must contain


REFUND = {"customer": "c-42", "currency": "EUR"}
DETAIL_CASES = [
    Case("integer of 5000 digits", details('{"customer":"c-42","amount":' + BIG_INT + ',"currency":"EUR"}'),
         400, "invalid_authorization_details", "more than 64 characters"),
    Case("negative integer of 5000 digits", details('{"n":-' + BIG_INT + "}"), 400, "invalid_authorization_details"),
    Case("fraction of 5000 digits", details('{"n":0.' + BIG_INT + "}"), 400, "invalid_authorization_details"),
    Case("number beyond a double", details('{"n":1e400}'), 400, "invalid_authorization_details", "too large"),
    Case("number finer than a double", details('{"n":1e-400}'), 400, "invalid_authorization_details", "exactly"),
    Case("NaN", details('{"n":NaN}'), 400, "invalid_authorization_details"),
    Case("unpaired surrogate", details('{"customer":"c-42\\ud800"}'), 400, "invalid_authorization_details",
         "surrogate"),
    Case("nested 5000 deep", "[" * 4000 + "]" * 4000, 400, "invalid_authorization_details"),
    Case("duplicate context member", details('{"customer":"c-42","customer":"c-43"}'), 400,
         "invalid_authorization_details", "duplicate"),
    Case("NUL in a context value", details({"customer": "c-42\x00"}), 400, "invalid_authorization_details",
         "U+0000"),
    Case("C1 control in a context value", details({"customer": "c-42\x85"}), 400, "invalid_authorization_details",
         "U+0085"),
    Case("line separator in a context value", details({"note": "a\u2028b"}), 400, "invalid_authorization_details",
         "U+2028"),
    Case("bidi control in a context list", details({"tags": ["ok", "x\u202ey"]}), 400,
         "invalid_authorization_details", "U+202E"),
    *[Case(f"bidi U+{ord(c):04X} in a context value", details({"customer": f"c-42{c}24-c"}), 400,
           "invalid_authorization_details", f"U+{ord(c):04X}") for c in BIDI],
    # Amounts (broker.money): a JSON number, positive, no more decimals than the currency has.
    Case("amount as a string", details({**REFUND, "amount": "20"}), 400, "invalid_authorization_details",
         "JSON number"),
    Case("amount as a boolean", details({**REFUND, "amount": True}), 400, "invalid_authorization_details"),
    Case("amount as an object", details('{"customer":"c-42","amount":{"v":20},"currency":"EUR"}'), 400,
         "invalid_authorization_details"),
    Case("amount as a list", details({**REFUND, "amount": ["20"]}), 400, "invalid_authorization_details"),
    Case("amount zero", details({**REFUND, "amount": 0}), 400, "invalid_authorization_details", "greater than zero"),
    Case("amount negative", details({**REFUND, "amount": -20}), 400, "invalid_authorization_details"),
    Case("EUR with three decimals", details('{"customer":"c-42","amount":10.001,"currency":"EUR"}'), 400,
         "invalid_authorization_details", "more decimals than EUR allows (2)"),
    Case("EUR hiding a third decimal", details('{"customer":"c-42","amount":50.000000000000001,"currency":"EUR"}'),
         400, "invalid_authorization_details", "exactly"),
    Case("JPY with a decimal", details('{"customer":"c-42","amount":10.5,"currency":"JPY"}'), 400,
         "invalid_authorization_details", "JPY allows (0)"),
    Case("KWD with four decimals", details('{"customer":"c-42","amount":1.0001,"currency":"KWD"}'), 400,
         "invalid_authorization_details", "KWD allows (3)"),
    Case("amount without currency", details({"customer": "c-42", "amount": 20}), 400,
         "invalid_authorization_details", "currency"),
    Case("unknown currency", details({**REFUND, "amount": 20, "currency": "ZZZ"}), 400,
         "invalid_authorization_details", "ISO 4217"),
    Case("currency as a number", details({**REFUND, "amount": 20, "currency": 978}), 400,
         "invalid_authorization_details", "ISO 4217"),
    Case("too many minor units", details({**REFUND, "amount": 10**14}), 400, "invalid_authorization_details"),
    # Well-formed amounts reach the policy: trailing zeros are exact; JPY has no rule (default deny).
    Case("EUR 10.50 is exact", details('{"customer":"c-42","amount":10.50,"currency":"EUR"}'), 200, ""),
    Case("JPY 1000 reaches the policy", details({**REFUND, "amount": 1000, "currency": "JPY"}), 403,
         "access_denied"),
    Case("KWD 1.234 reaches the policy", details({**REFUND, "amount": 1.234, "currency": "KWD"}), 403,
         "access_denied"),
]


@pytest.mark.parametrize("case", DETAIL_CASES, ids=lambda c: c.name)
def test_authorization_details(app: tuple[TestClient, DevIssuer], case: Case) -> None:
    c, issuer = app
    actor = issuer.mint(SUPPORT, "nhi-broker", clock=SystemClock())
    # Refunds are delegated: the verified end user c-42 (the sample refund rules need one).
    user = dev_user(c.app.state.runtime.settings.data_dir)  # type: ignore[attr-defined]
    r = c.post("/v1/token", content=form_body(delegated_form(user, actor, "payments-api", case.details)), headers=FORM)
    if case.status == 200:
        assert r.status_code == 200, r.text
        return
    body = assert_precise(r, case.status, case.error)
    assert case.says in body["error_description"]


# -- POST /v1/token: subject token, DPoP proof, form ------------------------------------------------


def _forged_jwt(header: str, payload: str) -> str:
    return f"{b64(header.encode())}.{b64(payload.encode())}.{b64(b'sig')}"


READ = intent("orders.read", RESOURCE, customer="c-42")
SUBJECT_CASES = [
    ("integer of 5000 digits in a claim", _forged_jwt('{"alg":"ES256","typ":"JWT"}', '{"exp":' + BIG_INT + "}")),
    ("integer of 5000 digits in the header", _forged_jwt('{"alg":"ES256","n":' + BIG_INT + "}", "{}")),
    ("number beyond a double in a claim", _forged_jwt('{"alg":"ES256"}', '{"iat":1e999}')),
    ("unpaired surrogate in a claim", _forged_jwt('{"alg":"ES256"}', '{"sub":"\\udfff"}')),
    ("nested deeply", _forged_jwt('{"alg":"ES256"}', "[" * 3000 + "]" * 3000)),
]


@pytest.mark.parametrize(("name", "subject"), SUBJECT_CASES, ids=[n for n, _ in SUBJECT_CASES])
def test_subject_token(app: tuple[TestClient, DevIssuer], name: str, subject: str) -> None:
    c, _ = app
    r = c.post("/v1/token", content=form_body(exchange_form(subject, "orders-api", READ)), headers=FORM)
    assert_precise(r, 400, "invalid_grant")


def _claims(members: str) -> str:
    return '{"htm":"POST","htu":"' + HTU + '",' + members + "}"


def _dpop_with_payload(payload: str) -> str:
    key = new_key()
    good = proof(key, htu=HTU, iat=SystemClock().now())
    header = good.split(".")[0]
    return f"{header}.{b64(payload.encode())}.{good.split('.')[2]}"


DPOP_CASES = [
    ("integer of 5000 digits", _dpop_with_payload(_claims(f'"jti":"j","iat":{BIG_INT}'))),
    ("number beyond a double", _dpop_with_payload(_claims('"jti":"j","iat":1e999'))),
    ("unpaired surrogate", _dpop_with_payload(_claims('"jti":"\\ud800","iat":1'))),
    ("duplicate claim", _dpop_with_payload(_claims('"jti":"a","jti":"b","iat":1'))),
]


@pytest.mark.parametrize(("name", "dpop"), DPOP_CASES, ids=[n for n, _ in DPOP_CASES])
def test_dpop_proof(app: tuple[TestClient, DevIssuer], name: str, dpop: str) -> None:
    c, issuer = app
    subject = issuer.mint(SUPPORT, "nhi-broker", clock=SystemClock())
    r = c.post("/v1/token", content=form_body(exchange_form(subject, "orders-api", READ)),
               headers={**FORM, "DPoP": dpop})
    assert_precise(r, 400, "invalid_dpop_proof")


def test_two_dpop_headers(app: tuple[TestClient, DevIssuer]) -> None:
    c, issuer = app
    key = new_key()
    subject = issuer.mint(SUPPORT, "nhi-broker", clock=SystemClock())
    proofs = [proof(key, htu=HTU, iat=SystemClock().now()) for _ in range(2)]
    r = c.post("/v1/token", content=form_body(exchange_form(subject, "orders-api", READ)),
               headers=[*FORM.items(), *(("DPoP", p) for p in proofs)])
    assert_precise(r, 400, "invalid_dpop_proof")


FORM_CASES = [
    ("body of 1 MiB", b"a=" + b"x" * 2**20, FORM, 413, "invalid_request"),
    ("ten thousand fields", b"&".join(b"f%d=1" % i for i in range(10_000)), FORM, 413, "invalid_request"),
    ("forty fields", b"&".join(b"f%d=1" % i for i in range(40)), FORM, 400, "invalid_request"),
    ("NUL in grant_type", b"grant_type=%00", FORM, 400, "unsupported_grant_type"),
    ("percent-encoded invalid UTF-8", b"grant_type=%ff%fe", FORM, 400, "invalid_request"),
    ("raw invalid UTF-8", b"grant_type=\xff", FORM, 400, "invalid_request"),
    ("repeated parameter", b"grant_type=a&grant_type=b", FORM, 400, "invalid_request"),
    ("JSON instead of a form", b'{"grant_type":1}', JSON, 415, "invalid_request"),
    ("Content-Length that is not a number", b"a=1", {**FORM, "Content-Length": "1e3"}, 400, "invalid_request"),
]


@pytest.mark.parametrize(("name", "body", "headers", "status", "error"), FORM_CASES, ids=[c[0] for c in FORM_CASES])
def test_token_form(
    app: tuple[TestClient, DevIssuer], name: str, body: bytes, headers: dict[str, str], status: int, error: str
) -> None:
    c, _ = app
    assert_precise(c.post("/v1/token", content=body, headers=headers), status, error)


# -- admin and approvals JSON API -------------------------------------------------------------------


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


SUSPEND = "/v1/admin/workloads/ticket-triage/suspend"
RESUME = "/v1/admin/workloads/ticket-triage/resume"
REVOKE = "/v1/admin/revocations"
APPROVE = "/v1/admin/approvals/" + "a" * 32 + "/approve"
ADMIN_CASES: list[tuple[str, str, Any, bytes, int, str]] = [
    # name, path, headers, body, status, error
    ("no credentials, huge body", RESUME, JSON, b'{"reason":"' + b"x" * 2**20 + b'"}', 401, "invalid_token"),
    ("no credentials, 5000-digit integer", RESUME, JSON, b'{"reason":%s}' % BIG_INT.encode(), 401, "invalid_token"),
    ("no credentials, invalid JSON", REVOKE, JSON, b"{{{", 401, "invalid_token"),
    ("wrong credentials, huge body", APPROVE, {**JSON, **bearer("nope-" + "x" * 20)}, b"[" * 2**20, 401,
     "invalid_token"),
    ("auditor-less role, valid body", REVOKE, {**JSON, **bearer(APPROVER)},
     b'{"scope":"workload","value":"ticket-triage","reason":"x"}', 403, "access_denied"),
    ("two Authorization headers", RESUME, [("Content-Type", "application/json"), ("Authorization", f"Bearer {ADMIN}"),
                                           ("Authorization", "Bearer other")], b'{"reason":"r"}', 400,
     "invalid_request"),
    ("body over 16 KiB", RESUME, {**JSON, **bearer(ADMIN)}, b'{"reason":"' + b"x" * 17_000 + b'"}', 413,
     "invalid_request"),
    ("duplicate member name", RESUME, {**JSON, **bearer(ADMIN)}, b'{"reason":"a","reason":"b"}', 400,
     "invalid_request"),
    ("duplicate member name in a revocation", REVOKE, {**JSON, **bearer(ADMIN)},
     b'{"scope":"end_user","value":"c-1","value":"c-2","reason":"r"}', 400, "invalid_request"),
    ("5000-digit integer", RESUME, {**JSON, **bearer(ADMIN)}, b'{"reason":%s}' % BIG_INT.encode(), 400,
     "invalid_request"),
    ("nested deeply", RESUME, {**JSON, **bearer(ADMIN)}, b"[" * 5000 + b"]" * 5000, 400, "invalid_request"),
    ("unpaired surrogate", RESUME, {**JSON, **bearer(ADMIN)}, b'{"reason":"\\ud800"}', 400, "invalid_request"),
    ("not an object", RESUME, {**JSON, **bearer(ADMIN)}, b'["reason"]', 400, "invalid_request"),
    ("not JSON", RESUME, {**JSON, **bearer(ADMIN)}, b"reason=r", 400, "invalid_request"),
    ("not UTF-8", RESUME, {**JSON, **bearer(ADMIN)}, b'{"reason":"\xff"}', 400, "invalid_request"),
    ("form media type", RESUME, {"Content-Type": "application/x-www-form-urlencoded", **bearer(ADMIN)},
     b"reason=r", 415, "invalid_request"),
    ("no media type", RESUME, bearer(ADMIN), b'{"reason":"r"}', 415, "invalid_request"),
    ("unknown member", RESUME, {**JSON, **bearer(ADMIN)}, b'{"reason":"r","force":true}', 400, "invalid_request"),
    ("reason as a number", RESUME, {**JSON, **bearer(ADMIN)}, b'{"reason":5}', 400, "invalid_request"),
    *[(f"bidi U+{ord(c):04X} in a suspension reason", SUSPEND, {**JSON, **bearer(ADMIN)},
       json.dumps({"reason": f"routine{c} check"}).encode(), 400, "invalid_request") for c in BIDI],
    ("bidi in a revocation value", REVOKE, {**JSON, **bearer(ADMIN)},
     json.dumps({"scope": "end_user", "value": "c-1\u202e", "reason": "r"}).encode(), 400, "invalid_request"),
    ("bidi in an approval reason", APPROVE, {**JSON, **bearer(APPROVER)},
     json.dumps({"reason": "ok \u2067fine\u2069"}).encode(), 400, "invalid_request"),
    ("valid approval of an unknown request", APPROVE, {**JSON, **bearer(APPROVER)}, b'{"reason":"ok"}', 404,
     "not_found"),
]


@pytest.mark.parametrize(("name", "path", "headers", "body", "status", "error"), ADMIN_CASES,
                         ids=[c[0] for c in ADMIN_CASES])
def test_admin_json(
    app: tuple[TestClient, DevIssuer], name: str, path: str, headers: Any, body: bytes, status: int, error: str
) -> None:
    c, _ = app
    assert_precise(c.post(path, content=body, headers=headers), status, error)


def test_two_authorization_headers_on_reads_and_introspection(app: tuple[TestClient, DevIssuer]) -> None:
    c, _ = app
    twice = [("Authorization", f"Bearer {ADMIN}"), ("Authorization", f"Bearer {ADMIN}")]
    assert_precise(c.get("/v1/admin/workloads", headers=twice), 400, "invalid_request")
    assert_precise(c.get("/v1/admin/approvals", headers=twice), 400, "invalid_request")
    basic = "Basic " + base64.b64encode(f"payments-api:{PAYMENTS_SECRET}".encode()).decode()
    two_basic = [("Authorization", basic), ("Authorization", basic), *FORM.items()]
    assert_precise(c.post("/v1/introspect", content=b"token=x", headers=two_basic), 400, "invalid_request")
    assert_precise(c.post("/v1/revoke", content=b"token=x", headers=two_basic), 400, "invalid_request")
    # One header still works.
    assert c.post("/v1/introspect", content=b"token=x", headers={"Authorization": basic, **FORM}).json() == {
        "active": False}


def test_introspection_caller_with_a_5000_digit_identity(app: tuple[TestClient, DevIssuer]) -> None:
    c, _ = app
    token = _forged_jwt('{"alg":"ES256"}', '{"exp":' + BIG_INT + "}")
    r = c.post("/v1/introspect", content=b"token=x", headers={**FORM, "Authorization": f"Bearer {token}"})
    assert_precise(r, 401, "invalid_client")


def test_admin_bodies_are_documented_in_openapi(app: tuple[TestClient, DevIssuer]) -> None:
    c, _ = app
    paths = c.get("/openapi.json").json()["paths"]
    for path in ("/v1/admin/revocations", "/v1/admin/workloads/{name}/suspend",
                 "/v1/admin/approvals/{auth_req_id}/approve"):
        schema = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert "reason" in schema["properties"]


# -- witness cosignatures: a capped stream ---------------------------------------------------------


def test_cosignature_body_is_capped(tmp_path: Path) -> None:
    key = WitnessSigner("witness.example/w1", Ed25519PrivateKey.generate()).verifier_key
    s = settings(tmp_path / "data", ledger_witnesses=[key])
    with TestClient(create_app(s), raise_server_exceptions=False) as c:
        r = c.post("/v1/ledger/cosignatures", content=b"x" * 2**20)
        assert_precise(r, 413, "invalid_request")
        assert_precise(c.post("/v1/ledger/cosignatures", content=b"\xff"), 400, "invalid_request")


# -- 429 carries Retry-After -----------------------------------------------------------------------


def test_rate_limit_answers_retry_after(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    limits = (policies / "limits.toml").read_text().replace('rate = "30/minute"', 'rate = "2/minute"')
    (policies / "limits.toml").write_text(limits)
    clock = FixedClock(1_800_000_015.25)  # 15.25 s into a minute window
    s = settings(tmp_path / "data", policies)
    with TestClient(create_app(s, clock=clock), raise_server_exceptions=False) as c:
        issuer = DevIssuer.load_or_create(s.data_dir)

        users = DevUserIssuer.load_or_create(s.data_dir)

        def refund(conversation: str) -> Any:
            actor = issuer.mint(SUPPORT, "nhi-broker", clock=clock)
            user = users.mint_user("c-42", "nhi-broker", clock=clock)
            ctx = {"customer": "c-42", "amount": 5, "currency": "EUR", "conversation": conversation}
            return c.post("/v1/token", data=delegated_form(user, actor, "payments-api",
                                                           intent("payments.refund", RESOURCE, **ctx)))

        assert refund("a").status_code == 200
        assert refund("b").status_code == 200
        r = refund("c")
        assert_precise(r, 429, "rate_limit_exceeded")
        assert r.headers["Retry-After"] == "45"  # the window frees at 1_800_000_060
        clock.advance(44.5)
        assert refund("d").headers["Retry-After"] == "1"
        clock.advance(0.5)
        assert refund("e").status_code == 200


# -- the DPoP jti is consumed only for an attested caller ------------------------------------------


@pytest.fixture
def redis_app(tmp_path: Path) -> Iterator[tuple[TestClient, DevIssuer, str]]:
    prefix = unique_prefix()
    s = settings(tmp_path / "data", state_backend="redis", redis_url=SHARED_REDIS, redis_prefix=prefix)
    try:
        with TestClient(create_app(s), raise_server_exceptions=False) as c:
            yield c, DevIssuer.load_or_create(s.data_dir), prefix
    finally:
        drop_prefix(SHARED_REDIS, prefix)


def _state_keys(prefix: str) -> set[bytes]:
    client = redis.Redis.from_url(SHARED_REDIS)
    try:
        return set(client.scan_iter(match=prefix + "*", count=1000))
    finally:
        client.close()


def test_unauthenticated_dpop_request_writes_no_state(redis_app: tuple[TestClient, DevIssuer, str]) -> None:
    c, issuer, prefix = redis_app
    key = new_key()
    dpop = proof(key, htu=HTU, iat=SystemClock().now())
    before = _state_keys(prefix)
    forged = _forged_jwt('{"alg":"ES256","typ":"JWT"}', json.dumps({"sub": SUPPORT}))
    # (a) a valid proof with an identity that does not verify; (b) a bad proof and a bad identity.
    r = c.post("/v1/token", content=form_body(exchange_form(forged, "orders-api", READ)),
               headers={**FORM, "DPoP": dpop})
    assert_precise(r, 400, "invalid_grant")
    r = c.post("/v1/token", content=form_body(exchange_form(forged, "orders-api", READ)),
               headers={**FORM, "DPoP": dpop[:-4] + "AAAA"})
    assert_precise(r, 400, "invalid_dpop_proof")
    expired = issuer.mint(SUPPORT, "nhi-broker", clock=FixedClock(1_000_000_000))
    r = c.post("/v1/token", content=form_body(exchange_form(expired, "orders-api", READ)),
               headers={**FORM, "DPoP": dpop})
    assert_precise(r, 400, "invalid_grant")
    assert _state_keys(prefix) == before
    # The same proof then works once, with an identity that verifies, and is a replay after that.
    subject = issuer.mint(SUPPORT, "nhi-broker", clock=SystemClock())
    r = c.post("/v1/token", content=form_body(exchange_form(subject, "orders-api", READ)),
               headers={**FORM, "DPoP": dpop})
    assert r.status_code == 200, r.text
    assert r.json()["token_type"] == "DPoP"
    assert len(_state_keys(prefix) - before) >= 2  # the identity's jti and the proof's jti
    again = issuer.mint(SUPPORT, "nhi-broker", clock=SystemClock())
    r = c.post("/v1/token", content=form_body(exchange_form(again, "orders-api", READ)), headers={**FORM, "DPoP": dpop})
    body = assert_precise(r, 400, "invalid_dpop_proof")
    assert "already been used" in body["error_description"]


# -- the request head is bounded by the server protocol (live `nhi-broker serve`) --------------------


def _exchange_raw(port: int, data: bytes, reads: int = 1) -> bytes:
    """Send ``data`` on one connection; everything the broker answers until it closes or ``reads`` answers."""
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while out.count(b"HTTP/1.1 ") < reads or not out.endswith((b"}", b"]")):
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    return out


def test_request_head_is_bounded(live_broker: LiveBroker) -> None:
    port = live_broker.port
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
    cases = [
        ("one 1 MiB header", head + b"X-Big: " + b"a" * 2**20 + b"\r\n\r\n"),
        ("20000 small headers", head + b"".join(b"X-%d: 1\r\n" % i for i in range(20_000)) + b"\r\n"),
        ("a 1 MiB path", b"GET /" + b"a" * 2**20 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
    ]
    for name, data in cases:
        answer = _exchange_raw(port, data)
        assert answer.startswith(b"HTTP/1.1 431 "), (name, answer[:200])
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "invalid_request", name
    # Within the bound: a 40 KiB header, twice on one keep-alive connection (each head counts alone).
    ok = head + b"X-Fine: " + b"a" * 40_000 + b"\r\n\r\n"
    answer = _exchange_raw(port, ok + ok, reads=2)
    assert answer.count(b"HTTP/1.1 200 OK") == 2, answer[:300]
    # A small head followed at once by a 60 KiB body in the same segment is not mistaken for a long head.
    body = form_body({"grant_type": "x", "pad": "p" * 60_000})
    post = (b"POST /v1/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)) + body
    answer = _exchange_raw(port, post)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]
    assert b'"unsupported_grant_type"' in answer
    assert live_broker.proc.poll() is None


def test_invented_methods_do_not_grow_metrics(app: tuple[TestClient, DevIssuer]) -> None:
    c, _ = app
    for i in range(5):
        r = c.request(f"XMETHOD{i}", "/v1/token")
        assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"
    text = c.get("/metrics").text
    assert "XMETHOD" not in text
    assert 'method="other"' in text


@pytest.mark.parametrize(("name", "subject"), SUBJECT_CASES, ids=[n for n, _ in SUBJECT_CASES])
def test_delegated_subject_token(app: tuple[TestClient, DevIssuer], name: str, subject: str) -> None:
    c, issuer = app
    actor = issuer.mint(SUPPORT, "nhi-broker", clock=SystemClock())
    form = exchange_form(subject, "orders-api", READ, actor_token=actor,
                         actor_token_type="urn:ietf:params:oauth:token-type:jwt")
    assert_precise(c.post("/v1/token", content=form_body(form), headers=FORM), 400, "invalid_grant")
