"""broker.ledger.exact: whatever the compiled check accepts, the schema model accepts, with itself as its JSON form.

The check replaces pydantic on the hot paths (the broker's own entries, ``audit verify``); a refusal
only sends the entry to the model, so the property that matters is one-sided: *accepted ⇒ valid and
unchanged*. It is tested on valid entries of every kind and on many thousands of mutations of them
(wrong types, near-miss strings, nulls, missing and extra members, values of other members).
"""

from __future__ import annotations

import copy
import enum
import random
from typing import Any

import pytest
from pydantic import ValidationError

from broker.audit.schema import _validated_model
from broker.ledger.exact import exact_check
from broker.ledger.schema import ENTRY_MODELS

SHA = "sha256:" + "ab" * 32
LEAF = "cd" * 32
B64 = "A" * 43
ENVELOPE = {"v": 1, "time": "2026-12-03T10:00:00Z", "request_id": "r" * 32}
WORKLOAD = {"spiffe_id": "spiffe://example.org/ns/support/sa/support-assistant", "attestation": "dev",
            "issuer": "urn:nhi-broker:dev-issuer", "evidence_digest": SHA, "name": "support-assistant",
            "owner": "alice@example.org"}
INTENT = {"type": "intent", "action": "payments.refund", "resource": "customers/c-42/orders/ord-1001",
          "context": {"customer": "c-42", "amount": 20.5, "currency": "EUR", "tags": ["a", "b"], "urgent": True,
                      "n": 3}}
JWT = {"kind": "jwt", "jti": B64[:22], "kid": B64, "iat": 1_700_000_000, "exp": 1_700_000_120, "claims_sha256": SHA}
OPERATOR = {"kind": "operator", "name": "ops-lead", "role": "admin", "auth": "bearer"}
ISSUANCE = {**ENVELOPE, "kind": "issuance", "workload": WORKLOAD, "audience": "payments-api", "intent": INTENT,
            "decision": {"effect": "allow", "rule": "refund-small", "policy_version": SHA}, "credential": JWT}

VALID: list[dict[str, Any]] = [
    ISSUANCE,
    {**ISSUANCE, "trace_id": "0af7651916cd43dd8448eb211c80319c",
     "credential": {**JWT, "cnf_jkt": B64, "cnf_x5t_s256": B64},
     "approval": {"auth_req_id": "q" * 24, "index": 7, "leaf_hash": LEAF, "approvers": ["bob@example.org"]},
     "user": {"iss": "https://idp.example.org", "sub": "user-1", "evidence_digest": SHA},
     "parent": {"jti": B64[:22], "txn": LEAF, "client_id": "support-assistant"}},
    {**ISSUANCE, "credential": {"kind": "vault-db", "jti": "a1" * 16, "vault": "database/creds/ro",
                                "lease_id": "database/creds/ro/abc", "iat": 1, "exp": 2}},
    {**ISSUANCE, "credential": {"kind": "vault-token", "jti": "a1" * 16, "vault": "auth/token/create",
                                "accessor": "acc-1", "iat": 1, "exp": 2}},
    {**ENVELOPE, "kind": "denial", "workload": {k: WORKLOAD[k] for k in list(WORKLOAD)[:4]}, "audience": "x",
     "intent": INTENT, "decision": {"effect": "deny", "rule": None, "policy_version": SHA, "error": "access_denied",
                                    "reason": "no rule allows it"}},
    {**ENVELOPE, "kind": "denial", "workload": WORKLOAD, "audience": "payments-api", "intent": INTENT,
     "decision": {"effect": "deny", "rule": "refund-small", "policy_version": SHA, "error": "budget_exceeded",
                  "reason": "over budget"},
     "user": {"iss": "https://idp.example.org", "sub": "user-1"}},
    {**ENVELOPE, "kind": "revocation", "actor": {"kind": "client", "client_id": "orders-api", "auth": "secret"},
     "revocation": {"scope": "token", "jti": "abc_DEF-123", "workload": "support-assistant", "reason": "RFC 7009"}},
    {**ENVELOPE, "kind": "revocation", "actor": OPERATOR,
     "revocation": {"scope": "conversation", "value": "conv-1", "reason": "leak"}},
    {**ENVELOPE, "kind": "revocation", "actor": {"kind": "broker"},
     "revocation": {"scope": "lease", "jti": "a1" * 16, "workload": "support-assistant",
                    "spiffe_id": WORKLOAD["spiffe_id"], "credential": {"kind": "vault-db", "lease_id": "l/1"},
                    "issuance": None, "reason": "expired"}},
    {**ENVELOPE, "kind": "revocation",
     "actor": {"kind": "workload", "spiffe_id": WORKLOAD["spiffe_id"], "auth": "jwt"},
     "revocation": {"scope": "lease", "jti": "a1" * 16, "workload": "support-assistant",
                    "spiffe_id": WORKLOAD["spiffe_id"], "credential": {"kind": "vault-token", "accessor": "a"},
                    "issuance": LEAF, "reason": "released"}},
    {**ENVELOPE, "kind": "suspension", "actor": OPERATOR,
     "suspension": {"workload": "support-assistant", "state": "suspended", "reason": "incident 42"}},
    {**ENVELOPE, "kind": "policy_load", "policy": {"version": SHA, "files": {"model.conf": SHA, "p.csv": SHA},
                                                   "source": "/etc/policies"}},
    {**ENVELOPE, "kind": "policy_load", "actor": OPERATOR,
     "policy": {"version": SHA, "files": {"model.conf": SHA}, "source": "reload"}},
]


class Text(str):
    pass


class Number(enum.IntEnum):
    ONE = 1


# Values that are wrong somewhere and right elsewhere: types, edges of every grammar in the schema.
POOL: list[Any] = [
    None, "", " ", "a", "x" * 3000, "a\x00", "a\x7f", "\u00e9", "\U0001f600", "\ud800", Text("a"), Text(SHA),
    0, -1, 1, 7, 2**53, 2**64, True, False, 1.0, 1.5, float("nan"), float("inf"), Number.ONE, (1,), b"x",
    [], ["a"], ["a", "a"], ["a", 1], [None], {}, {"a": 1}, {"a": None}, {"A": 1}, {"a": [1]}, {"a": {"b": 1}},
    SHA, "sha256:" + "AB" * 32, "sha256:" + "ab" * 31, LEAF, LEAF.upper(), B64, B64 + "A", B64[:22] + "=",
    "spiffe://example.org/x", "spiffe://example.org/../x", "spiffe://Example.org/x", "spiffe://example.org/",
    "2026-02-30T00:00:00Z", "2026-12-03T10:00:00Z", "2026-12-03 10:00:00Z", "2026-12-03T10:00:00+00:00",
    "0" * 32, "0af7651916cd43dd8448eb211c80319c", "a1" * 16, "A1" * 16,
    "payments.refund", "Payments.refund", "customers/c-42", "customers//c-42", "customers/../x", "/x",
    "jwt", "vault-db", "vault-token", "vault-wrapped", "vault", "allow", "deny", "review", "intent",
    "issuance", "denial", "revocation", "token", "lease", "workload", "end_user", "conversation", "scope",
    "access_denied", "operator", "client", "broker", "admin", "root", "suspended", "resumed", "dev", "oidc",
    "support-assistant", "Support", "q" * 24, "q" * 19, "kind", "extra",
]


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if type(value) is dict:
        for key, item in value.items():
            out += _paths(item, (*prefix, key))
    elif type(value) is list:
        for index, item in enumerate(value):
            out += _paths(item, (*prefix, index))
    return out


def _mutate(entry: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    out = copy.deepcopy(entry)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(_paths(out)[1:])
        *parents, last = path
        target: Any = out
        for step in parents:
            target = target[step]
        roll = rng.random()
        if roll < 0.6:
            target[last] = copy.deepcopy(rng.choice(POOL))
        elif roll < 0.7 and type(target) is dict:
            del target[last]
        elif roll < 0.8 and type(target) is dict:
            target[rng.choice(["extra", "name", "owner", "kind", "trace_id", "user", "cnf_jkt", "lease_id"])] = (
                copy.deepcopy(rng.choice(POOL)))
        else:  # a value that is valid for some member of some entry
            other = rng.choice(VALID)
            source_path = rng.choice(_paths(other)[1:])
            value: Any = other
            for step in source_path:
                value = value[step]
            target[last] = copy.deepcopy(value)
    return out


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON: same types throughout (``True`` is not ``1``), same members, same order of lists."""
    if type(a) is not type(b):
        return False
    if type(a) is dict:
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if type(a) is list:
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _model_verdict(entry: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return ENTRY_MODELS[entry["kind"]].model_validate(entry).to_json()
    except ValidationError:
        return None


@pytest.mark.parametrize("index", range(len(VALID)))
def test_valid_entries_take_the_fast_path(index: int) -> None:
    entry = VALID[index]
    assert _model_verdict(entry) == entry
    check = exact_check(ENTRY_MODELS[entry["kind"]])
    assert check is not None and check(copy.deepcopy(entry))


@pytest.mark.parametrize("seed", range(8))
def test_what_the_check_accepts_the_model_accepts_unchanged(seed: int) -> None:
    rng = random.Random(seed)
    accepted = refused = 0
    for _ in range(1500):
        entry = _mutate(rng.choice(VALID), rng)
        kind = entry.get("kind")
        model = ENTRY_MODELS.get(kind) if type(kind) is str else None
        for candidate in [model] if model is not None else list(ENTRY_MODELS.values()):
            check = exact_check(candidate)
            if check is None or not check(entry):
                refused += 1
                continue
            accepted += 1
            assert _same(candidate.model_validate(entry).to_json(), entry), entry
            _validated_model(entry)  # the auditor's envelope steps and model accept it too
    assert accepted > 100 and refused > 1000  # both sides of the check are exercised


def test_null_for_an_absent_by_default_member_is_left_to_the_model() -> None:
    check = exact_check(ENTRY_MODELS["issuance"])
    assert check is not None
    assert not check({**ISSUANCE, "trace_id": None})
    assert not check({**ISSUANCE, "credential": {**JWT, "cnf_jkt": None}})
    assert _model_verdict({**ISSUANCE, "trace_id": None}) == ISSUANCE  # valid, and its JSON form drops it


def test_models_with_rules_the_compiler_cannot_read_keep_pydantic() -> None:
    # key_rotation: a `before` validator and a thumbprint rule over a nested key; approval: a rule
    # reading a nested member. Both stay on the model path (None: no compiled check).
    assert exact_check(ENTRY_MODELS["key_rotation"]) is None
    assert exact_check(ENTRY_MODELS["approval"]) is None
