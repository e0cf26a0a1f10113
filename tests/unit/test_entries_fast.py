"""broker.entries returns validated data as the entry itself: it must be exactly the schema model's JSON form.

The issuance path skips the model's serialiser when the data holds no null (``_validated``). That is
sound only while the schema is strict, closed, without aliases and with absent-by-default optional
members; these cases would fail if a schema change broke that (a coercion, a default, an alias).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from broker.entries import _validated
from broker.ledger.canonical import encode_entry
from broker.ledger.schema import DenialEntry, IssuanceEntry

SHA = "sha256:" + "ab" * 32
LEAF = "cd" * 32
B64 = "A" * 43


def _issuance(**changes: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "v": 1, "kind": "issuance", "time": "2026-12-03T10:00:00Z", "request_id": "r" * 32,
        "workload": {"spiffe_id": "spiffe://example.org/ns/support/sa/support-assistant", "attestation": "dev",
                     "issuer": "urn:nhi-broker:dev-issuer", "evidence_digest": SHA, "name": "support-assistant",
                     "owner": "alice@example.org"},
        "audience": "payments-api",
        "intent": {"type": "intent", "action": "payments.refund", "resource": "customers/c-42/orders/ord-1001",
                   "context": {"customer": "c-42", "amount": 20.5, "currency": "EUR", "tags": ["a", "b"],
                               "urgent": True}},
        "decision": {"effect": "allow", "rule": "refund-small", "policy_version": SHA},
        "credential": {"kind": "jwt", "jti": B64[:22], "kid": B64, "iat": 1_700_000_000, "exp": 1_700_000_120,
                       "claims_sha256": SHA},
    }
    entry.update(changes)
    return entry


CASES = {
    "plain": _issuance(),
    "dpop and certificate bound": _issuance(credential={**_issuance()["credential"], "cnf_jkt": B64,
                                                         "cnf_x5t_s256": B64}),
    "approved": _issuance(approval={"auth_req_id": "q" * 24, "index": 7, "leaf_hash": LEAF,
                                    "approvers": ["bob@example.org"]}),
    "delegated": _issuance(user={"iss": "https://idp.example.org", "sub": "user-1", "evidence_digest": SHA}),
    "sub-agent": _issuance(parent={"jti": B64[:22], "txn": LEAF, "client_id": "support-assistant"}),
    "vault lease": _issuance(credential={"kind": "vault-db", "jti": "a1" * 16, "vault": "database/creds/ro",
                                         "lease_id": "database/creds/ro/abc", "iat": 1, "exp": 2}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_data_without_null_is_its_own_json_form(name: str) -> None:
    data = copy.deepcopy(CASES[name])
    assert IssuanceEntry.model_validate(data).to_json() == data
    assert _validated(IssuanceEntry, data) is data
    assert encode_entry(_validated(IssuanceEntry, copy.deepcopy(data))) == encode_entry(
        IssuanceEntry.model_validate(data).to_json())


def test_null_optional_members_are_dropped_as_the_model_drops_them() -> None:
    data = _issuance(approval=None, user=None)
    data["credential"] = {**data["credential"], "cnf_jkt": None}
    out = _validated(IssuanceEntry, data)
    assert out == IssuanceEntry.model_validate(data).to_json()
    assert "approval" not in out and "user" not in out and "cnf_jkt" not in out["credential"]


@pytest.mark.parametrize(("change", "member"), [
    ({"audience": 5}, "audience"),                        # strict: no coercion of a number to a string
    ({"kind": "denial"}, "kind"),
    ({"extra": "x"}, "extra"),                             # closed
    ({"credential": {"kind": "jwt"}}, "credential"),
])
def test_a_bad_member_is_refused_before_anything_is_returned(change: dict[str, Any], member: str) -> None:
    with pytest.raises(ValueError, match=member):
        _validated(IssuanceEntry, _issuance(**change))


def test_denial_entries_keep_the_model_path() -> None:
    data = {"v": 1, "kind": "denial", "time": "2026-12-03T10:00:00Z", "request_id": "r" * 32,
            "workload": _issuance()["workload"], "audience": "payments-api", "intent": _issuance()["intent"],
            "decision": {"effect": "deny", "rule": None, "policy_version": SHA, "error": "access_denied",
                         "reason": "no rule allows it"}}
    assert _validated(DenialEntry, data) == DenialEntry.model_validate(data).to_json()


def test_the_schema_resource_rule_is_the_intent_rule() -> None:
    # broker.ledger.schema checks a resource with one regular expression; it must answer exactly as
    # broker.intent.is_valid_resource, which decides what a token may carry.
    import random

    from broker.intent import is_valid_resource
    from broker.ledger.schema import _valid_resource

    rng = random.Random(7)
    alphabet = "a/./-_~:@Z09é \x00"
    samples = ["", "/", "a", "a/", "/a", "a//b", ".", "..", "a/./b", "a/../b", ".a", "a.", "a.b", "a" * 128,
               "a" * 129, "/".join(["a"] * 16), "/".join(["a"] * 17), "/".join(["a" * 31] * 16) + "b",
               "/".join(["a" * 128] * 4), "/".join(["a" * 127] * 5)]
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(20000)]
    samples += ["/".join("a" * rng.randint(0, 130) for _ in range(rng.randint(1, 18))) for _ in range(2000)]
    for sample in samples:
        assert _valid_resource(sample) == is_valid_resource(sample), sample
