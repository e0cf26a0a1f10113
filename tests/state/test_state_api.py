"""Introspection, revocation, the kill switch, rates and budgets over HTTP, on both backends.

Each test runs the real app in process (TestClient) against a real SQLite file or the real Redis
server, with operators and resource-server clients configured by hash only.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from fastapi.testclient import TestClient

from broker.api.app import create_app
from broker.attest.dev import DevIssuer
from broker.clock import SystemClock
from broker.config import Settings
from broker.operators import hash_secret
from tests.helpers import POLICIES, SUPPORT, TRIAGE, delegated_form, dev_user, exchange_form, intent, verified_claims
from tests.state.conftest import SHARED_REDIS, OwnRedis

ADMIN, AUDITOR, APPROVER = "admin-token-0123456789", "auditor-token-0123456789", "approver-token-0123456789"
PAYMENTS_SECRET, TICKETS_SECRET = "payments-secret-0123456789", "tickets-secret-0123456789"
READ = intent("orders.read", "customers/c-42/orders/ord-1001", customer="c-42", conversation="conv-1")


def refund(amount: Any, conversation: str | None = "conv-1", customer: str = "c-42") -> str:
    context: dict[str, Any] = {"customer": customer, "amount": amount, "currency": "EUR"}
    if conversation is not None:
        context["conversation"] = conversation
    return intent("payments.refund", f"customers/{customer}/orders/ord-1001", **context)


def basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


PAYMENTS = basic("payments-api", PAYMENTS_SECRET)
TICKETS = basic("tickets-api", TICKETS_SECRET)


NO_AUTH = "client authentication (HTTP Basic or a workload identity token) is required"
RS_SPIFFE = "spiffe://example.org/ns/payments/sa/payments-api"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def state_settings(data_dir: Path, backend: str, prefix: str, policies: Path = POLICIES) -> Settings:
    return Settings(
        data_dir=data_dir, policies_dir=policies, state_backend=backend, redis_url=SHARED_REDIS, redis_prefix=prefix,
        operators=[
            {"name": "alice", "role": "admin", "token_sha256": hash_secret(ADMIN)},
            {"name": "audrey", "role": "auditor", "token_sha256": hash_secret(AUDITOR)},
            {"name": "april", "role": "approver", "token_sha256": hash_secret(APPROVER)},
        ],
        introspection_clients=[
            {"client_id": "payments-api", "secret_sha256": hash_secret(PAYMENTS_SECRET),
             "audiences": ["payments-api", "orders-api"]},
            {"client_id": "tickets-api", "secret_sha256": hash_secret(TICKETS_SECRET), "audiences": ["tickets-api"]},
            {"client_id": "payments-workload", "spiffe_id": RS_SPIFFE, "audiences": ["payments-api"]},
        ],
    )


class Harness:
    """The app plus the helpers every test needs."""

    def __init__(self, client: TestClient, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.issuer = DevIssuer.load_or_create(settings.data_dir)

    def exchange(self, audience: str, details: str, spiffe_id: str = SUPPORT) -> Any:
        """An exchange; at payments-api (refunds) delegated for the verified customer c-42, as the sample
        refund rules require."""
        identity = self.issuer.mint(spiffe_id, "nhi-broker", ttl=300, clock=SystemClock())
        if audience == "payments-api":
            return self.client.post("/v1/token", data=delegated_form(dev_user(self.settings.data_dir), identity,
                                                                     audience, details))
        return self.client.post("/v1/token", data=exchange_form(identity, audience, details))

    def token(self, audience: str, details: str, spiffe_id: str = SUPPORT) -> str:
        r = self.exchange(audience, details, spiffe_id)
        assert r.status_code == 200, r.text
        return str(r.json()["access_token"])

    def introspect(self, token: str, headers: dict[str, str] = PAYMENTS) -> Any:
        return self.client.post("/v1/introspect", data={"token": token}, headers=headers)

    def active(self, token: str, headers: dict[str, str] = PAYMENTS) -> bool:
        r = self.introspect(token, headers)
        assert r.status_code == 200, r.text
        return bool(r.json()["active"])

    def ledger(self) -> list[dict[str, Any]]:
        size = self.client.get("/v1/ledger/checkpoint").text.splitlines()[1]
        body = self.client.get("/v1/ledger/entries", params={"start": 0, "end": int(size)}).json()
        return [json.loads(base64.b64decode(e["leaf"])) for e in body["entries"]]


@pytest.fixture
def harness(tmp_path: Path, backend: str, redis_prefix: str) -> Iterator[Harness]:
    settings = state_settings(tmp_path / "data", backend, redis_prefix)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield Harness(client, settings)


def test_single_use_refund_token_is_consumed_at_introspection(harness: Harness) -> None:
    token = harness.token("payments-api", refund(20))
    r = harness.introspect(token)
    body = r.json()
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    assert body["active"] is True
    assert body["sub"] == "c-42" and body["act"] == {"sub": SUPPORT}  # for the verified customer
    assert body["client_id"] == "support-assistant"
    assert body["owner"] == "Dana Reyes <dana.reyes@example.com>"
    assert body["authorization_details"][0]["action"] == "payments.refund"
    assert len(body["txn"]) == 64
    assert body["num_uses"] == 1 and body["uses_remaining"] == 0
    assert harness.introspect(token).json() == {"active": False}


def test_metadata_names_the_endpoints(harness: Harness) -> None:
    meta = harness.client.get("/.well-known/oauth-authorization-server").json()
    base = harness.settings.issuer_url
    assert meta["introspection_endpoint"] == f"{base}/v1/introspect"
    assert meta["revocation_endpoint"] == f"{base}/v1/revoke"
    assert meta["introspection_endpoint_auth_methods_supported"] == ["client_secret_basic"]


def test_unlimited_token_stays_active(harness: Harness) -> None:
    token = harness.token("orders-api", READ)
    assert harness.active(token) and harness.active(token)
    assert "num_uses" not in harness.introspect(token).json()


@pytest.mark.parametrize(
    ("headers", "description"),
    [
        ({}, NO_AUTH),
        (bearer("x"), "workload identity not accepted: subject_token is not a compact JWS"),
        ({"Authorization": "Basic !!!"}, "the Basic credentials are not valid base64 UTF-8"),
        ({"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()}, "client authentication failed"),
        (basic("payments-api", "wrong"), "client authentication failed"),
        (basic("unknown", PAYMENTS_SECRET), "client authentication failed"),
        (basic("tickets-api", PAYMENTS_SECRET), "client authentication failed"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/introspect", "/v1/revoke"])
def test_callers_must_authenticate(harness: Harness, path: str, headers: dict[str, str], description: str) -> None:
    r = harness.client.post(path, data={"token": "x"}, headers=headers)
    assert r.status_code == 401
    assert r.json() == {"error": "invalid_client", "error_description": description}
    assert r.headers["www-authenticate"].startswith("Basic")


@pytest.mark.parametrize(
    ("data", "status", "description"),
    [
        ({}, 400, "token is required"),
        ({"token": ""}, 400, "token is required"),
        ({"token": "a", "token_type_hint": "x" * 65}, 400, "token_type_hint is too long"),
    ],
)
def test_bad_introspection_requests(harness: Harness, data: dict[str, str], status: int, description: str) -> None:
    r = harness.client.post("/v1/introspect", data=data or {"other": "1"}, headers=PAYMENTS)
    assert (r.status_code, r.json()["error_description"]) == (status, description)


def test_resource_server_authenticates_with_its_workload_identity(harness: Harness) -> None:
    token = harness.token("payments-api", refund(20))

    def rs_identity(spiffe_id: str = RS_SPIFFE) -> dict[str, str]:
        return bearer(harness.issuer.mint(spiffe_id, "nhi-broker", ttl=60, clock=SystemClock()))

    # Not configured as a client, or not a valid identity: 401, and the token is not consumed.
    for headers, fragment in [
        (rs_identity(SUPPORT), "not a configured introspection client"),
        (bearer("not-a-jwt"), "workload identity not accepted"),
    ]:
        r = harness.introspect(token, headers)
        assert r.status_code == 401 and fragment in r.json()["error_description"]
    reused = rs_identity()
    r = harness.introspect(token, reused)
    assert r.status_code == 200 and r.json()["active"] is True
    r = harness.introspect(token, reused)  # an identity token is single use here too
    assert r.status_code == 401 and "already been used" in r.json()["error_description"]
    assert harness.introspect(token, rs_identity()).json() == {"active": False}  # the refund token was single use
    harness.client.post("/v1/revoke", data={"token": harness.token("payments-api", refund(1))}, headers=rs_identity())
    entry = [e for e in harness.ledger() if e["kind"] == "revocation"][-1]
    assert entry["actor"] == {"kind": "client", "client_id": "payments-workload", "auth": "workload_identity"}


def test_foreign_tampered_and_other_audience_tokens_read_inactive(harness: Harness) -> None:
    token = harness.token("orders-api", READ)
    head, payload, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["authorization_details"][0]["action"] = "orders.delete"
    forged_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    identity_token = harness.issuer.mint(SUPPORT, "nhi-broker", ttl=300, clock=SystemClock())
    unsigned = jwt.encode(claims, key=None, algorithm="none", headers={"typ": "at+jwt"})  # type: ignore[arg-type]
    for bad in ("garbage", f"{head}.{forged_payload}.{sig}", identity_token, unsigned, "a" * 20000):
        assert harness.introspect(bad).json() == {"active": False}
    # A resource server configured for tickets-api learns nothing about an orders-api token.
    assert harness.introspect(token, TICKETS).json() == {"active": False}
    assert harness.active(token)


def test_rfc7009_revocation(harness: Harness) -> None:
    token = harness.token("orders-api", READ)
    other = harness.token("orders-api", READ)
    assert harness.client.post("/v1/revoke", data={"token": "not-a-token"}, headers=PAYMENTS).status_code == 200
    # tickets-api may not revoke an orders-api token: 200, nothing happens (RFC 7009 §2.2).
    assert harness.client.post("/v1/revoke", data={"token": token}, headers=TICKETS).status_code == 200
    assert harness.active(token)
    r = harness.client.post("/v1/revoke", data={"token": token, "token_type_hint": "access_token"}, headers=PAYMENTS)
    assert r.status_code == 200 and r.content == b""
    assert not harness.active(token)
    assert harness.active(other)
    entry = [e for e in harness.ledger() if e["kind"] == "revocation"][-1]
    assert entry["actor"] == {"kind": "client", "client_id": "payments-api", "auth": "client_secret_basic"}
    assert entry["revocation"]["scope"] == "token"
    jwks = harness.client.get("/.well-known/jwks.json").json()
    assert entry["revocation"]["jti"] == verified_claims(token, jwks, "orders-api")["jti"]
    assert token not in json.dumps(harness.ledger())


@pytest.mark.parametrize(
    ("headers", "status", "error"),
    [
        ({}, 401, "invalid_token"),
        (bearer("not-an-operator"), 401, "invalid_token"),
        ({"Authorization": "Basic " + base64.b64encode(b"a:b").decode()}, 401, "invalid_token"),
        (bearer(AUDITOR), 403, "access_denied"),
        (bearer(APPROVER), 403, "access_denied"),
    ],
)
def test_admin_calls_need_the_admin_role(harness: Harness, headers: dict[str, str], status: int, error: str) -> None:
    calls = [
        ("/v1/admin/workloads/support-assistant/suspend", {"reason": "x"}),
        ("/v1/admin/workloads/support-assistant/resume", {"reason": "x"}),
        ("/v1/admin/revocations", {"scope": "workload", "value": "support-assistant", "reason": "x"}),
    ]
    for path, body in calls:
        r = harness.client.post(path, json=body, headers=headers)
        assert (r.status_code, r.json()["error"]) == (status, error), path
    assert harness.client.get("/v1/admin/workloads/support-assistant", headers=bearer(AUDITOR)).status_code == 200
    assert harness.client.get("/v1/admin/workloads/support-assistant").status_code == 401


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        ("/v1/admin/workloads/nobody/suspend", {"reason": "x"}, 404, "no workload named 'nobody'"),
        ("/v1/admin/workloads/support-assistant/suspend", {}, 400, "reason"),
        ("/v1/admin/workloads/support-assistant/suspend", {"reason": "x", "extra": 1}, 400, "extra"),
        ("/v1/admin/workloads/bad%0Aname/suspend", {"reason": "x"}, 400, "name"),
        ("/v1/admin/revocations", {"scope": "everyone", "value": "x", "reason": "x"}, 400, "scope"),
        ("/v1/admin/revocations", {"scope": "conversation", "value": "", "reason": "x"}, 400, "value"),
        ("/v1/admin/revocations", {"scope": "workload", "value": "nobody", "reason": "x"}, 404, "nobody"),
    ],
)
def test_bad_admin_requests(harness: Harness, path: str, body: dict[str, Any], status: int, fragment: str) -> None:
    r = harness.client.post(path, json=body, headers=bearer(ADMIN))
    assert r.status_code == status, r.text
    assert fragment in r.json()["error_description"]


def test_every_admin_route_requires_an_operator(harness: Harness) -> None:
    paths = harness.client.get("/openapi.json").json()["paths"]
    routes = [(path, method.upper()) for path, ops in paths.items() if path.startswith("/v1/admin") for method in ops]
    assert len(routes) >= 5
    for path, method in routes:
        url = path.replace("{name}", "support-assistant")
        r = harness.client.request(method, url, json={"reason": "x"})
        assert r.status_code == 401 and r.json()["error"] == "invalid_token", (method, path)


@pytest.mark.parametrize(
    ("content", "content_type", "status"),
    [(b"{not json", "application/json", 400), (b"reason=x", "application/x-www-form-urlencoded", 415),
     (b"", None, 415), (b"", "application/json", 400), (b"[]", "application/json", 400),
     (b'{"reason": 5}', "application/json", 400)],
)
def test_malformed_admin_bodies(harness: Harness, content: bytes, content_type: str | None, status: int) -> None:
    headers = bearer(ADMIN) | ({"Content-Type": content_type} if content_type else {})
    r = harness.client.post("/v1/admin/workloads/support-assistant/suspend", content=content, headers=headers)
    assert r.status_code == status, r.text
    assert r.json()["error"] == "invalid_request"


def test_kill_switch(harness: Harness) -> None:
    live = harness.token("orders-api", READ)
    triage = harness.token("tickets-api", intent("tickets.create", "queues/q-1", priority="low"), spiffe_id=TRIAGE)
    r = harness.client.post("/v1/admin/workloads/support-assistant/suspend", json={"reason": "prompt injection"},
                            headers=bearer(ADMIN))
    assert r.status_code == 200 and r.json()["suspended"] is True
    assert not harness.active(live)
    assert harness.active(triage, TICKETS)  # another workload is untouched
    r = harness.exchange("orders-api", READ)
    assert r.status_code == 403
    assert r.json()["error"] == "workload_suspended"
    status = harness.client.get("/v1/admin/workloads/support-assistant", headers=bearer(AUDITOR)).json()
    assert status["suspended"] is True and status["revoked_before"] is not None
    listing = harness.client.get("/v1/admin/workloads", headers=bearer(APPROVER)).json()["workloads"]
    assert {w["workload"]: w["suspended"] for w in listing} == {
        "support-assistant": True, "ticket-triage": False, "nightly-report": False, "refund-executor": False}
    assert listing[0]["owner"] == "Dana Reyes <dana.reyes@example.com>"
    # Resume: new tokens work, tokens from before the suspension stay dead.
    r = harness.client.post("/v1/admin/workloads/support-assistant/resume", json={"reason": "fixed"},
                            headers=bearer(ADMIN))
    assert r.json()["was_suspended"] is True
    assert not harness.active(live)
    entries = harness.ledger()
    kinds = [e["kind"] for e in entries]
    assert kinds.count("suspension") == 2
    suspension = next(e for e in entries if e["kind"] == "suspension")
    assert suspension["actor"] == {"kind": "operator", "name": "alice", "role": "admin", "auth": "bearer"}
    assert suspension["suspension"] == {"workload": "support-assistant", "state": "suspended",
                                        "reason": "prompt injection"}
    denial = next(e for e in entries if e["kind"] == "denial")
    assert denial["decision"]["error"] == "workload_suspended"
    assert ADMIN not in json.dumps(entries)


@pytest.mark.parametrize(
    ("scope", "value", "dead", "alive"),
    [
        ("conversation", "conv-1", ["a"], ["b", "c"]),
        ("end_user", "c-42", ["a", "b"], ["c"]),
        ("workload", "support-assistant", ["a", "b", "c"], []),
    ],
)
def test_scoped_revocation(harness: Harness, scope: str, value: str, dead: list[str], alive: list[str]) -> None:
    tokens = {
        "a": harness.token("orders-api", READ),
        "b": harness.token("orders-api", intent("orders.read", "customers/c-42/orders/o-2", customer="c-42",
                                                conversation="conv-2")),
        "c": harness.token("orders-api", intent("orders.read", "customers/c-7/orders/o-3", customer="c-7",
                                                conversation="conv-3")),
    }
    r = harness.client.post("/v1/admin/revocations", json={"scope": scope, "value": value, "reason": "leak"},
                            headers=bearer(ADMIN))
    assert r.status_code == 200, r.text
    assert {k for k, t in tokens.items() if not harness.active(t)} == set(dead)
    assert {k for k, t in tokens.items() if harness.active(t)} == set(alive)
    entry = [e for e in harness.ledger() if e["kind"] == "revocation"][-1]
    assert entry["revocation"] == {"scope": scope, "value": value, "reason": "leak"}
    assert entry["actor"]["name"] == "alice"


def test_budget_per_conversation_to_the_cent(harness: Harness) -> None:
    for _ in range(3):
        assert harness.exchange("payments-api", refund(50)).status_code == 200
    assert harness.exchange("payments-api", refund(49.99)).status_code == 200
    r = harness.exchange("payments-api", refund(0.02))
    assert r.status_code == 403
    assert r.json()["error"] == "budget_exceeded"
    assert r.json()["rule_id"] == "refund-small-eur"
    assert "200.00 EUR per conversation per day" in r.json()["error_description"]
    assert harness.exchange("payments-api", refund(0.01)).status_code == 200  # exactly 200.00
    assert harness.exchange("payments-api", refund(0.01)).status_code == 403
    assert harness.exchange("payments-api", refund(50, conversation="conv-2")).status_code == 200
    denial = [e for e in harness.ledger() if e["kind"] == "denial"][-1]
    assert denial["decision"]["error"] == "budget_exceeded"
    assert denial["decision"]["rule"] == "refund-small-eur"


@pytest.mark.parametrize(
    ("amount", "fragment"),
    [(10.005, "more decimals than EUR allows (2)"), (True, "JSON number"), ("10", "JSON number")],
)
def test_budget_needs_a_clean_amount(harness: Harness, amount: Any, fragment: str) -> None:
    # Refused when the request is read (broker.money), before any budget is charged.
    r = harness.exchange("payments-api", refund(amount))
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_authorization_details"
    assert fragment in r.json()["error_description"]


def test_requests_without_a_conversation_share_one_budget(harness: Harness) -> None:
    for _ in range(4):
        assert harness.exchange("payments-api", refund(50, conversation=None)).status_code == 200
    assert harness.exchange("payments-api", refund(1, conversation=None)).json()["error"] == "budget_exceeded"


def test_rate_limit(tmp_path: Path, backend: str, redis_prefix: str) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    for name in ("model.conf", "policy.csv", "workloads.toml", "approvals.toml"):
        (policies / name).write_bytes((POLICIES / name).read_bytes())
    (policies / "limits.toml").write_text('[[limit]]\nrule = "orders-read-own-customer"\nrate = "2/hour"\n')
    settings = state_settings(tmp_path / "data", backend, redis_prefix, policies)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        h = Harness(client, settings)
        assert [h.exchange("orders-api", READ).status_code for _ in range(3)] == [200, 200, 429]
        r = h.exchange("orders-api", READ)
        assert r.json()["error"] == "rate_limit_exceeded" and r.json()["rule_id"] == "orders-read-own-customer"
        # Another action of the same workload has its own rate.
        assert h.exchange("orders-api", intent("orders.list", "customers/c-42/orders", customer="c-42")).status_code \
            == 200
        assert [e["decision"]["error"] for e in h.ledger() if e["kind"] == "denial"] == ["rate_limit_exceeded"] * 2


def test_redis_down_fails_closed_and_recovers(tmp_path: Path, own_redis: OwnRedis) -> None:
    settings = state_settings(tmp_path / "data", "redis", "t:").model_copy(update={"redis_url": own_redis.url})
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        h = Harness(client, settings)
        token = h.token("orders-api", READ)
        own_redis.stop()
        calls = {
            "exchange": lambda: h.exchange("orders-api", READ),
            "introspect": lambda: h.introspect(token),
            "revoke": lambda: client.post("/v1/revoke", data={"token": token}, headers=PAYMENTS),
            "suspend": lambda: client.post("/v1/admin/workloads/support-assistant/suspend", json={"reason": "x"},
                                           headers=bearer(ADMIN)),
        }
        for name, call in calls.items():
            r = call()
            assert r.status_code == 503, name
            assert r.json()["error"] == "temporarily_unavailable", name
            assert r.headers["retry-after"] == "1"
            assert "access_token" not in r.text and own_redis.url not in r.text
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["state"].startswith("state store unavailable")
        own_redis.start()
        # Calls fail fast for one window (Retry-After) after the outage; then the store answers again.
        deadline = time.monotonic() + 5
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the store did not recover"
            time.sleep(0.05)
        assert h.exchange("orders-api", READ).status_code == 200
        assert h.active(token)
        # Nothing was issued while Redis was down: the ledger holds issuances only for the two good exchanges.
        assert [e["kind"] for e in h.ledger()].count("issuance") == 2
