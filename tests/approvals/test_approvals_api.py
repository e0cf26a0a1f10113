"""Review rules end to end over HTTP (in process), on SQLite and on Redis: hold, poll, decide, issue.

The broker runs under a fixed clock, so poll intervals and expiry are exact without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from broker.api.app import create_app
from broker.audit.schema import validate_entry
from broker.clock import FixedClock
from tests.approvals.harness import ADA, APRIL, AUDREY, DANA, OTTO, Harness, approval_settings, bearer, refund
from tests.helpers import TRIAGE


@pytest.fixture
def harness(tmp_path: Path, backend: str, redis_prefix: str) -> Iterator[Harness]:
    settings = approval_settings(tmp_path / "data", backend, redis_prefix)
    clock = FixedClock(time.time())
    with TestClient(create_app(settings, clock=clock), raise_server_exceptions=False) as client:
        yield Harness(client, settings, clock)


def error(response: object) -> tuple[int, str]:
    body = response.json()  # type: ignore[attr-defined]
    return response.status_code, body["error"]  # type: ignore[attr-defined]


def test_over_limit_refund_is_held_approved_and_issued_with_the_approval(harness: Harness) -> None:
    r = harness.exchange(refund(120))
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    held = r.json()
    assert held["expires_in"] == 900 and held["interval"] == 1 and held["rule_id"] == "refund-review-eur"
    assert "access_token" not in held
    rid = held["auth_req_id"]
    # (1) nobody decided yet; polling faster than the interval is slow_down, and the interval grows.
    assert error(harness.poll(rid)) == (400, "authorization_pending")
    slow = harness.poll(rid)
    assert error(slow) == (400, "slow_down") and "6 seconds" in slow.json()["error_description"]
    harness.clock.advance(6)
    assert error(harness.poll(rid)) == (400, "authorization_pending")
    # (2) the approver sees the full intent and context, and approves with a reason.
    listed = harness.client.get("/v1/admin/approvals", headers=bearer(AUDREY)).json()["requests"]
    view = next(v for v in listed if v["auth_req_id"] == rid)
    assert view["status"] == "pending" and view["approvers_group"] == "refund-approvers"
    assert view["intent"]["context"] == {"customer": "c-42", "amount": 120, "currency": "EUR", "conversation": "conv-7"}
    assert view["workload"]["owner"] == "Dana Reyes <dana.reyes@example.com>"
    decided = harness.decide(rid, "approve")
    assert decided.status_code == 200, decided.text
    assert decided.json()["status"] == "approved" and decided.json()["approvals"][0]["name"] == "april"
    # (3) the next poll gets the token, with the approval bound in.
    harness.clock.advance(6)
    issued = harness.poll(rid)
    assert issued.status_code == 200, issued.text
    token_claims = harness.claims(issued.json()["access_token"])
    approval = token_claims["approval"]
    assert approval["auth_req_id"] == rid and approval["approvers"] == ["april"]
    assert token_claims["authorization_details"][0]["context"]["amount"] == 120
    entries, hashes = harness.ledger(), harness.leaf_hashes()
    approval_index = hashes.index(approval["txn"])
    approval_entry, issuance = entries[approval_index], entries[-1]
    assert approval_entry["kind"] == "approval"
    assert approval_entry["approval"]["outcome"] == "approved" and approval_entry["approval"]["final"] is True
    assert approval_entry["approval"]["approver"]["name"] == "april"
    assert approval_entry["approval"]["reason"] == "checked the order"
    assert issuance["kind"] == "issuance" and issuance["credential"]["jti"] == token_claims["jti"]
    assert issuance["approval"] == {"auth_req_id": rid, "index": approval_index, "leaf_hash": approval["txn"],
                                    "approvers": ["april"]}
    assert hashes[-1] == token_claims["txn"]
    for entry in (approval_entry, issuance):
        validate_entry(entry)
    # (4) one approval, one token.
    again = harness.poll(rid)
    assert error(again) == (400, "invalid_grant")


def test_denied_request_never_yields_a_token(harness: Harness) -> None:
    rid = harness.hold()
    r = harness.decide(rid, "deny", reason="customer already refunded")
    assert r.status_code == 200 and r.json()["status"] == "denied"
    for _ in range(2):
        harness.clock.advance(2)
        assert error(harness.poll(rid)) == (403, "access_denied")
    assert error(harness.decide(rid, "approve")) == (409, "already_decided")
    entry = harness.ledger()[-1]
    assert entry["kind"] == "approval" and entry["approval"]["outcome"] == "denied"
    assert entry["approval"]["reason"] == "customer already refunded"
    assert not [e for e in harness.ledger() if e["kind"] == "issuance"]


def test_expired_request_never_yields_a_token(harness: Harness) -> None:
    rid = harness.hold()
    harness.clock.advance(901)
    assert error(harness.poll(rid)) == (400, "expired_token")
    assert error(harness.decide(rid, "approve")) == (409, "already_decided")
    harness.clock.advance(2)
    assert error(harness.poll(rid)) == (400, "expired_token")
    expiries = [e for e in harness.ledger() if e["kind"] == "approval"]
    assert len(expiries) == 1  # expired once, recorded once
    assert expiries[0]["approval"]["outcome"] == "expired" and expiries[0]["approval"]["approver"] is None
    validate_entry(expiries[0])


def test_listing_expires_overdue_requests(harness: Harness) -> None:
    rid = harness.hold()
    harness.clock.advance(1000)
    listed = harness.client.get("/v1/admin/approvals", headers=bearer(AUDREY)).json()["requests"]
    assert next(v for v in listed if v["auth_req_id"] == rid)["status"] == "expired"
    assert harness.ledger()[-1]["approval"]["outcome"] == "expired"


@pytest.mark.parametrize(
    ("secret", "status", "code", "why"),
    [
        (DANA, 403, "access_denied", "owner cannot be the only approver"),
        (OTTO, 403, "access_denied", "not in approver group refund-approvers"),
        (AUDREY, 403, "access_denied", "may not approve"),
        ("not-a-configured-secret-012345", 401, "invalid_token", "not valid"),
    ],
)
def test_who_may_not_approve(harness: Harness, secret: str, status: int, code: str, why: str) -> None:
    rid = harness.hold()
    r = harness.decide(rid, "approve", secret=secret)
    assert error(r) == (status, code) and why in r.json()["error_description"]
    harness.clock.advance(2)
    assert error(harness.poll(rid)) == (400, "authorization_pending")


def test_the_owner_may_still_deny(harness: Harness) -> None:
    rid = harness.hold()
    assert harness.decide(rid, "deny", secret=DANA).json()["status"] == "denied"


@pytest.mark.parametrize(
    ("form", "status", "code", "why"),
    [
        ({}, 400, "invalid_request", "auth_req_id is required"),
        ({"auth_req_id": "x" * 65}, 400, "invalid_request", "too long"),
        ({"auth_req_id": "unknown-request-id-0123456789"}, 400, "invalid_grant", "not a request of this workload"),
        ({"audience": "payments-api"}, 400, "invalid_request", "audience is not a parameter of a CIBA poll"),
        ({"subject_token": ""}, 400, "invalid_request", "subject_token is required"),
        ({"subject_token": "not-a-jwt"}, 400, "invalid_grant", ""),
    ],
)
def test_bad_polls(harness: Harness, form: dict[str, str], status: int, code: str, why: str) -> None:
    rid = harness.hold()
    body = {"grant_type": "urn:openid:params:grant-type:ciba", "auth_req_id": rid,
            "subject_token": harness.identity(), "subject_token_type": "urn:ietf:params:oauth:token-type:jwt"}
    body.update(form)
    body = {k: v for k, v in body.items() if k != "auth_req_id" or form != {}}
    r = harness.client.post("/v1/token", data=body)
    assert error(r) == (status, code) and why in r.json()["error_description"]


def test_another_workload_cannot_collect_the_token(harness: Harness) -> None:
    rid = harness.hold()
    assert harness.decide(rid, "approve").status_code == 200
    r = harness.poll(rid, spiffe_id=TRIAGE)
    assert error(r) == (400, "invalid_grant")
    harness.clock.advance(2)
    assert harness.poll(rid).status_code == 200  # the right workload still can


def test_small_and_too_large_refunds_are_not_held(harness: Harness) -> None:
    assert "access_token" in harness.exchange(refund(20)).json()
    assert error(harness.exchange(refund(500))) == (403, "access_denied")


def test_a_multi_line_reason_is_recorded_on_one_line(harness: Harness) -> None:
    rid = harness.hold()
    assert harness.decide(rid, "approve", reason="refund ok\n\tper ticket 42").status_code == 200
    entry = harness.ledger()[-1]
    assert entry["approval"]["reason"] == "refund ok per ticket 42"
    validate_entry(entry)
    assert error(harness.decide(harness.hold(), "deny", reason="\n\t ")) == (400, "invalid_request")


def test_metadata_announces_ciba_polling(harness: Harness) -> None:
    meta = harness.client.get("/.well-known/oauth-authorization-server").json()
    assert "urn:openid:params:grant-type:ciba" in meta["grant_types_supported"]
    assert meta["backchannel_token_delivery_modes_supported"] == ["poll"]


def test_the_sweeper_records_expiry_without_anyone_looking(tmp_path: Path, redis_prefix: str) -> None:
    settings = approval_settings(tmp_path / "data", "sqlite", redis_prefix, sweep_interval=1)
    clock = FixedClock(time.time())
    with TestClient(create_app(settings, clock=clock), raise_server_exceptions=False) as client:
        h = Harness(client, settings, clock)
        rid = h.hold()
        clock.advance(901)
        deadline = time.monotonic() + 5
        while not [e for e in h.ledger() if e["kind"] == "approval"] and time.monotonic() < deadline:
            time.sleep(0.2)
        (entry,) = [e for e in h.ledger() if e["kind"] == "approval"]
        assert entry["approval"]["auth_req_id"] == rid and entry["approval"]["outcome"] == "expired"


def test_suspension_after_approval_still_stops_the_token(harness: Harness) -> None:
    rid = harness.hold()
    assert harness.decide(rid, "approve").status_code == 200
    r = harness.client.post("/v1/admin/workloads/support-assistant/suspend", json={"reason": "incident 7"},
                            headers=bearer(ADA))
    assert r.status_code == 200, r.text
    harness.clock.advance(2)
    assert error(harness.poll(rid)) == (403, "workload_suspended")
    harness.clock.advance(2)
    assert error(harness.poll(rid)) == (400, "invalid_grant")  # the approval was used up by the refusal
    kinds = [e["kind"] for e in harness.ledger()]
    assert kinds[-1] == "denial" and "issuance" not in kinds
    assert harness.ledger()[-1]["decision"]["error"] == "workload_suspended"
    validate_entry(harness.ledger()[-1])  # an auditor's verifier accepts the kill switch's denials


def test_a_suspended_workload_cannot_queue_requests_for_approvers(harness: Harness) -> None:
    r = harness.client.post("/v1/admin/workloads/support-assistant/suspend", json={"reason": "incident 8"},
                            headers=bearer(ADA))
    assert r.status_code == 200, r.text
    assert error(harness.exchange(refund(120))) == (403, "workload_suspended")
    assert harness.client.get("/v1/admin/approvals", headers=bearer(APRIL)).json()["requests"] == []
    last = harness.ledger()[-1]
    assert (last["kind"], last["decision"]["error"]) == ("denial", "workload_suspended")
    assert not any(e["kind"] == "approval" for e in harness.ledger())
    validate_entry(last)
