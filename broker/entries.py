"""Ledger entries: the JSON objects that become leaves (RFC 8785 canonical form, see docs/ledger.md).

Every entry is validated by its frozen model in :mod:`broker.ledger.schema` — the same models
``audit`` validates with; issuances and denials first by the exact check compiled from that model
(:mod:`broker.ledger.exact`) — so the broker cannot write an entry an auditor would refuse: a bad
member raises :class:`ValueError` here, before anything is appended. Entries carry hashes,
identifiers and decisions — never a token or a secret.

``trace_id`` is the W3C trace id of the request that wrote the entry (:mod:`broker.tracing`),
passed by the caller; it is omitted when there is none, so an entry written outside a request has
exactly the bytes it had before the member existed.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from broker.ledger.exact import exact_check
from broker.ledger.schema import (
    ENTRY_VERSION,
    ApprovalEntry,
    DenialEntry,
    IssuanceEntry,
    KeyRotationEntry,
    Member,
    PolicyLoadEntry,
    RevocationEntry,
    SuspensionEntry,
    Workload,
)
from broker.models import Delegation, EndUser, Grant, Intent, RegisteredWorkload, WorkloadIdentity

__all__ = [
    "ENTRY_VERSION",
    "approval_entry",
    "denial_entry",
    "issuance_entry",
    "key_rotation_entry",
    "policy_load_entry",
    "revocation_entry",
    "suspension_entry",
    "workload_json",
]

_last_time: tuple[int, str] = (-1, "")


def rfc3339(t: float) -> str:
    """UTC time with second precision, as every entry records it."""
    global _last_time
    second = int(t)
    last = _last_time  # one tuple, read and replaced whole: safe without a lock
    if last[0] != second:
        last = _last_time = (second, datetime.fromtimestamp(second, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    return last[1]


def _workload(identity: WorkloadIdentity, workload: RegisteredWorkload | None) -> Workload:
    return Workload(
        spiffe_id=identity.spiffe_id,
        attestation=identity.method,
        issuer=identity.issuer,
        evidence_digest=identity.evidence_digest,
        name=workload.name if workload is not None else None,
        owner=workload.owner if workload is not None else None,
    )


def workload_json(identity: WorkloadIdentity, workload: RegisteredWorkload | None) -> dict[str, Any]:
    """The ``workload`` member of an entry (never the evidence itself, only its digest)."""
    return _workload(identity, workload).to_json()


def issuance_entry(
    *, grant: Grant, now: float, request_id: str, credential: dict[str, Any],
    approval: dict[str, Any] | None = None, trace_id: str | None = None,
) -> dict[str, Any]:
    """The entry that must be durable before ``credential`` leaves the broker.

    ``approval`` (``{auth_req_id, index, leaf_hash, approvers}``) points at the ``approval`` entry
    that released an intent held for review. A delegated grant adds ``user`` (the verified end user)
    and a sub-agent's grant ``parent`` (the parent token's ``jti`` and ledger leaf hash ``txn``).
    """
    return _validated(IssuanceEntry, {
        "v": ENTRY_VERSION,
        "kind": "issuance",
        "time": rfc3339(now),
        "request_id": request_id,
        "workload": _workload_member(grant.identity, grant.workload),
        "audience": grant.audience,
        "intent": grant.intent.to_json(),
        "decision": {"effect": "allow", "rule": grant.rule_id, "policy_version": grant.policy_version},
        "credential": credential,
        **({"approval": approval} if approval is not None else {}),
        **_delegation(grant.user, grant.delegation),
        **({"trace_id": trace_id} if trace_id is not None else {}),
    })


def _delegation(user: EndUser | None, parent: Delegation | None) -> dict[str, Any]:
    # Optional members, absent when unused: a plain exchange's entry is exactly what it was before
    # delegation existed.
    members: dict[str, Any] = {}
    if user is not None:
        members["user"] = user.ledger_json()
    if parent is not None:
        members["parent"] = parent.ledger_json()
    return members


def _workload_member(identity: WorkloadIdentity, workload: RegisteredWorkload | None) -> dict[str, Any]:
    """:func:`workload_json` as a plain object, validated with the entry that holds it."""
    member = {"spiffe_id": identity.spiffe_id, "attestation": identity.method, "issuer": identity.issuer,
              "evidence_digest": identity.evidence_digest}
    if workload is not None:
        member["name"] = workload.name
        member["owner"] = workload.owner
    return member


def _has_null(value: Any) -> bool:
    if value is None:
        return True
    if type(value) is dict:
        return any(_has_null(item) for item in value.values())
    if type(value) is list:
        return any(_has_null(item) for item in value)
    return False


def _validated(model: type[Member], data: dict[str, Any]) -> dict[str, Any]:
    """``data`` validated by ``model`` (the auditors' schema; a bad member raises :class:`ValueError`),
    as the entry's JSON object.

    First the exact check compiled from the model (:mod:`broker.ledger.exact`): it accepts only
    data the model accepts *and* whose JSON form is the data itself, and then the data is returned
    as is — no model object is built and nothing is serialised (a third of the cost, once per token
    exchange). Anything it refuses goes to the model, which raises the precise error or gives the
    JSON form. The schema is strict (nothing is coerced), closed, has no aliases, and its optional
    members default to absent, so the model's JSON form of data without a null is that data itself
    (tests/unit/test_entries_fast.py checks the two agree); data holding a null goes through the
    model's serialiser, which drops absent members.
    """
    check = exact_check(model)
    if check is not None and check(data):
        return data
    entry = model.model_validate(data)
    return entry.to_json() if _has_null(data) else data


def approval_entry(
    *,
    now: float,
    request_id: str,
    workload: dict[str, Any],
    audience: str,
    intent: dict[str, Any],
    rule_id: str,
    policy_version: str,
    approval: dict[str, Any],
    user: EndUser | None = None,
    trace_id: str | None = None,
) -> dict[str, Any]:
    """A decision on an intent held for review: one approver's approval or denial, or its expiry.

    ``request_id`` is the token request that was held; ``approval`` is ``{auth_req_id, group,
    needed, outcome, approver, reason, approvers, final}`` (docs/ledger.md); ``user`` the verified
    end user the intent is for, if it was delegated.
    """
    return ApprovalEntry.model_validate({
        "v": ENTRY_VERSION,
        "kind": "approval",
        "time": rfc3339(now),
        "request_id": request_id,
        "workload": workload,
        "audience": audience,
        "intent": intent,
        "decision": {"effect": "review", "rule": rule_id, "policy_version": policy_version},
        "approval": approval,
        "user": user.ledger_json() if user is not None else None,
        "trace_id": trace_id,
    }).to_json()


def denial_entry(
    *,
    identity: WorkloadIdentity,
    workload: RegisteredWorkload | None,
    audience: str,
    intent: Intent,
    now: float,
    request_id: str,
    error: str,
    reason: str,
    rule_id: str | None,
    policy_version: str,
    user: EndUser | None = None,
    parent: Delegation | None = None,
    trace_id: str | None = None,
) -> dict[str, Any]:
    """The entry for an attested workload that was refused (unregistered, wrong audience, policy deny).

    ``user`` / ``parent`` as in :func:`issuance_entry`, when the refused request was delegated.
    """
    return _validated(DenialEntry, {
        "v": ENTRY_VERSION,
        "kind": "denial",
        "time": rfc3339(now),
        "request_id": request_id,
        "workload": _workload_member(identity, workload),
        "audience": audience,
        "intent": intent.to_json(),
        "decision": {
            "effect": "deny",
            "rule": rule_id,
            "policy_version": policy_version,
            "error": error,
            "reason": reason,
        },
        **_delegation(user, parent),
        **({"trace_id": trace_id} if trace_id is not None else {}),
    })


def policy_load_entry(
    *, now: float, request_id: str, policy_version: str, files: dict[str, str], source: str,
    actor: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A policy set went live: its version and the digest of every file in it.

    ``request_id`` names the start (or reload) that loaded it, so two starts within one second
    are two entries, not one deduplicated leaf; ``actor`` the operator who asked for a reload.
    """
    return PolicyLoadEntry.model_validate({
        "v": ENTRY_VERSION,
        "kind": "policy_load",
        "time": rfc3339(now),
        "request_id": request_id,
        "policy": {"version": policy_version, "files": files, "source": source},
        "actor": actor,
    }).to_json()


def key_rotation_entry(
    *, now: float, request_id: str, purpose: str, kid: str, alg: str, jwk: dict[str, Any],
    endorsement: str | None = None,
) -> dict[str, Any]:
    """A new signing key went live (public part only); ``endorsement`` by the old ledger key (§5.3)."""
    return KeyRotationEntry.model_validate({
        "v": ENTRY_VERSION,
        "kind": "key_rotation",
        "time": rfc3339(now),
        "request_id": request_id,
        "key": {"purpose": purpose, "kid": kid, "alg": alg, "public_jwk": jwk, "endorsement": endorsement},
    }).to_json()


def revocation_entry(
    *, now: float, request_id: str, actor: dict[str, str], scope: str, target: dict[str, Any], reason: str,
    trace_id: str | None = None,
) -> dict[str, Any]:
    """Tokens were revoked by ``actor``: one token (``scope`` = ``token``, ``target`` names its ``jti``)
    or every token of a workload, end user or conversation (``target`` names the value)."""
    return RevocationEntry.model_validate({
        "v": ENTRY_VERSION,
        "kind": "revocation",
        "time": rfc3339(now),
        "request_id": request_id,
        "actor": actor,
        "revocation": {"scope": scope, **target, "reason": reason},
        "trace_id": trace_id,
    }).to_json()


def suspension_entry(
    *, now: float, request_id: str, actor: dict[str, str], workload: str, suspended: bool, reason: str,
    trace_id: str | None = None,
) -> dict[str, Any]:
    """An operator suspended (kill switch) or resumed ``workload``."""
    return SuspensionEntry.model_validate({
        "v": ENTRY_VERSION,
        "kind": "suspension",
        "time": rfc3339(now),
        "request_id": request_id,
        "actor": actor,
        "suspension": {"workload": workload, "state": "suspended" if suspended else "resumed", "reason": reason},
        "trace_id": trace_id,
    }).to_json()
