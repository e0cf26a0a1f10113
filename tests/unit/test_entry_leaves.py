"""The leaves the broker writes are byte-for-byte what they were (pinned SHA-256 of each leaf).

issuance_entry / denial_entry take fast paths (the compiled exact check, the JSON encoder after a
plainness check); these vectors were computed before those paths existed, so any change in the
bytes of a plain, delegated, approved, bound, unregistered or traced entry fails here.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from broker.entries import denial_entry, issuance_entry, rfc3339
from broker.ledger.canonical import encode_entry
from broker.models import Delegation, EndUser, Grant, Intent, RegisteredWorkload, WorkloadIdentity

SHA = "sha256:" + "ab" * 32
IDENTITY = WorkloadIdentity(spiffe_id="spiffe://example.org/ns/support/sa/support-assistant",
                            issuer="urn:nhi-broker:dev-issuer", method="dev", subject="support-assistant",
                            evidence_digest=SHA, expires_at=1_800_000_000)
WORKLOAD = RegisteredWorkload(name="support-assistant", spiffe_id=IDENTITY.spiffe_id, owner="alice@example.org",
                              roles=("support",), audiences=("orders-api",))
INTENT = Intent(action="orders.read", resource="customers/c-42/orders/ord-1001",
                context={"customer": "c-42", "amount": 20.5, "currency": "\u20acUR", "tags": ["a", "b"], "n": 3,
                         "urgent": True})
USER = EndUser(issuer="https://idp.example.org", subject="user-1", evidence_digest=SHA)
PARENT = Delegation(subject="user-1", act=None, parent_client_id="parent-agent", parent_spiffe_id=IDENTITY.spiffe_id,
                    jti="parentjti0000000000001", txn="cd" * 32, exp=1_800_000_000, audience="orders-api",
                    intent=INTENT)
CREDENTIAL = {"kind": "jwt", "jti": "A" * 22, "kid": "B" * 43, "iat": 1_795_000_000, "exp": 1_795_000_300,
              "claims_sha256": SHA}
NOW = 1_795_000_000.75


def grant(**changes: Any) -> Grant:
    fields: dict[str, Any] = {"identity": IDENTITY, "workload": WORKLOAD, "intent": INTENT, "audience": "orders-api",
                              "rule_id": "read-orders", "max_ttl": 300, "credential_kind": "jwt",
                              "policy_version": SHA}
    fields.update(changes)
    return Grant(**fields)


def denial(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"identity": IDENTITY, "workload": WORKLOAD, "audience": "orders-api", "intent": INTENT,
                              "now": NOW, "request_id": "req-2", "error": "access_denied",
                              "reason": "no rule allows orders.read", "rule_id": None, "policy_version": SHA}
    fields.update(changes)
    return denial_entry(**fields)


CASES = {
    "issuance": lambda: issuance_entry(grant=grant(), now=NOW, request_id="req-1", credential=dict(CREDENTIAL)),
    "issuance bound, traced": lambda: issuance_entry(
        grant=grant(), now=NOW, request_id="req-1", trace_id="0af7651916cd43dd8448eb211c80319c",
        credential={**CREDENTIAL, "cnf_jkt": "C" * 43, "cnf_x5t_s256": "D" * 43}),
    "issuance approved, delegated": lambda: issuance_entry(
        grant=grant(user=USER, delegation=PARENT), now=NOW, request_id="req-1", credential=dict(CREDENTIAL),
        approval={"auth_req_id": "q" * 24, "index": 7, "leaf_hash": "ef" * 32, "approvers": ["bob@example.org"]}),
    "issuance vault": lambda: issuance_entry(
        grant=grant(), now=NOW, request_id="req-1",
        credential={"kind": "vault-db", "jti": "a1" * 16, "vault": "database/creds/ro", "lease_id": "db/ro/x",
                    "iat": 1, "exp": 2}),
    "denial unregistered": lambda: denial(workload=None),
    "denial by rule, traced": lambda: denial(rule_id="read-orders", error="budget_exceeded", reason="over budget",
                                             trace_id="0af7651916cd43dd8448eb211c80319c"),
    "denial delegated": lambda: denial(user=EndUser(issuer="https://idp.example.org", subject="user-1"),
                                       parent=PARENT),
}

# sha256 of encode_entry(...) for each case, computed with the code before the fast paths.
EXPECTED = {
    "denial by rule, traced": "715e45e369c7a1e39eb26a5cdc8945f11d0fe2bb94084ac278988282eb965fdb",
    "denial delegated": "57a95baca4d510ecee1cd45e0b107825770c298e2e89f89053ee754abf758fa1",
    "denial unregistered": "7f980fe0854706e57d2bb0942980408b033b4510d65f69de120829abf73c1f54",
    "issuance": "f08ccc0fe641f54e2c56fad908eca8246c141a347ffa610c6163844a25ce5cea",
    "issuance approved, delegated": "a7215549b4d0fb1d9283ad50d48c85157ae1c28bfd8ebd9458365bb319db0d79",
    "issuance bound, traced": "ac797c62005a5475a82a278a070f89d782522c4366deb16e5d9f227b02327f4d",
    "issuance vault": "abcd51f63f7e4f1272d21cc5149dc8671af1403d58a672f6a7b4d9e9a5d374de",
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_leaf_bytes_are_unchanged(name: str) -> None:
    assert hashlib.sha256(encode_entry(CASES[name]())).hexdigest() == EXPECTED[name]


def test_rfc3339_across_seconds() -> None:
    assert rfc3339(NOW) == "2026-11-18T11:06:40Z"
    assert rfc3339(NOW + 0.2) == "2026-11-18T11:06:40Z"
    assert rfc3339(NOW + 1) == "2026-11-18T11:06:41Z"
    assert rfc3339(0) == "1970-01-01T00:00:00Z"
    assert rfc3339(NOW) == "2026-11-18T11:06:40Z"
