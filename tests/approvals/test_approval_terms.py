"""Approval terms beyond the sample: several approvers, an owner allowed to approve, DPoP-bound holds."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from broker.api.app import create_app
from broker.audit.schema import validate_entry
from broker.clock import FixedClock
from tests.approvals.harness import APRIL, DANA, Harness, approval_settings, refund
from tests.dpop.dpop_helpers import new_key, proof
from tests.helpers import POLICIES, delegated_form

TERMS = '[[review]]\nrule = "refund-review-eur"\napprovers = "refund-approvers"\napprovals = {n}\nmax_wait = 900\n'


def open_harness(tmp_path: Path, approvals: str, redis_prefix: str) -> Iterator[Harness]:
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    (policies / "approvals.toml").write_text(approvals)
    settings = approval_settings(tmp_path / "data", "sqlite", redis_prefix, policies=policies)
    clock = FixedClock(time.time())
    with TestClient(create_app(settings, clock=clock), raise_server_exceptions=False) as client:
        yield Harness(client, settings, clock)


@pytest.fixture
def two_approvals(tmp_path: Path, redis_prefix: str) -> Iterator[Harness]:
    yield from open_harness(tmp_path, TERMS.format(n=2), redis_prefix)


@pytest.fixture
def owner_may_approve(tmp_path: Path, redis_prefix: str) -> Iterator[Harness]:
    yield from open_harness(tmp_path, TERMS.format(n=1) + "owner_may_approve = true\n", redis_prefix)


def test_two_approvals_the_owner_second(two_approvals: Harness) -> None:
    h = two_approvals
    rid = h.hold()
    first = h.decide(rid, "approve", secret=APRIL)
    assert first.json()["status"] == "pending" and len(first.json()["approvals"]) == 1
    assert h.decide(rid, "approve", secret=APRIL).json()["error"] == "already_decided"  # once per approver
    h.clock.advance(2)
    assert h.poll(rid).json()["error"] == "authorization_pending"
    # The owner may complete it: april, not the owner, approved too.
    assert h.decide(rid, "approve", secret=DANA).json()["status"] == "approved"
    h.clock.advance(2)
    r = h.poll(rid)
    assert r.status_code == 200, r.text
    assert h.claims(r.json()["access_token"])["approval"]["approvers"] == ["april", "dana.reyes@example.com"]
    approvals = [e for e in h.ledger() if e["kind"] == "approval"]
    assert [(e["approval"]["approvers"], e["approval"]["final"]) for e in approvals] == [
        (["april"], False), (["april", "dana.reyes@example.com"], True)]
    for entry in approvals:
        validate_entry(entry)


def test_two_approvals_the_owner_first_still_needs_another(two_approvals: Harness) -> None:
    h = two_approvals
    rid = h.hold()
    assert h.decide(rid, "approve", secret=DANA).json()["status"] == "pending"
    assert h.decide(rid, "approve", secret=APRIL).json()["status"] == "approved"


def test_owner_may_approve_alone_when_the_rule_says_so(owner_may_approve: Harness) -> None:
    h = owner_may_approve
    rid = h.hold()
    assert h.decide(rid, "approve", secret=DANA).json()["status"] == "approved"
    h.clock.advance(2)
    assert h.poll(rid).status_code == 200


def test_a_dpop_held_request_is_collected_with_the_same_key_only(owner_may_approve: Harness) -> None:
    h = owner_may_approve
    htu = h.settings.issuer_url + "/v1/token"
    key, other = new_key(), new_key()
    r = h.client.post("/v1/token", data=delegated_form(h.user(), h.identity(), "payments-api", refund(120)),
                      headers={"DPoP": proof(key, htu=htu, iat=h.clock.now())})
    rid = r.json()["auth_req_id"]
    assert h.decide(rid, "approve").status_code == 200
    form = {"grant_type": "urn:openid:params:grant-type:ciba", "auth_req_id": rid,
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt"}
    for headers in ({}, {"DPoP": proof(other, htu=htu, iat=h.clock.now())}):
        h.clock.advance(2)
        wrong = h.client.post("/v1/token", data={**form, "subject_token": h.identity()}, headers=headers)
        assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_dpop_proof", wrong.text
    h.clock.advance(2)
    right = h.client.post("/v1/token", data={**form, "subject_token": h.identity()},
                          headers={"DPoP": proof(key, htu=htu, iat=h.clock.now())})
    assert right.status_code == 200, right.text
    assert right.json()["token_type"] == "DPoP" and "jkt" in h.claims(right.json()["access_token"])["cnf"]
