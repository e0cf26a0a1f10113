"""Ledger entries: the JSON objects that become leaves (RFC 8785 canonical form, see docs/ledger.md).

Entries carry hashes, identifiers and decisions — never a token or a secret.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from broker.models import Grant, Intent, RegisteredWorkload, WorkloadIdentity

__all__ = [
    "ENTRY_VERSION",
    "denial_entry",
    "issuance_entry",
    "key_rotation_entry",
    "policy_load_entry",
    "revocation_entry",
]

ENTRY_VERSION = 1


def rfc3339(t: float) -> str:
    """UTC time with second precision, as every entry records it."""
    return datetime.fromtimestamp(int(t), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _workload(identity: WorkloadIdentity, workload: RegisteredWorkload | None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "spiffe_id": identity.spiffe_id,
        "attestation": identity.method,
        "issuer": identity.issuer,
        "evidence_digest": identity.evidence_digest,
    }
    if workload is not None:
        record["name"] = workload.name
        record["owner"] = workload.owner
    return record


def issuance_entry(
    *, grant: Grant, now: float, request_id: str, credential: dict[str, Any]
) -> dict[str, Any]:
    """The entry that must be durable before ``credential`` leaves the broker."""
    return {
        "v": ENTRY_VERSION,
        "kind": "issuance",
        "time": rfc3339(now),
        "request_id": request_id,
        "workload": _workload(grant.identity, grant.workload),
        "audience": grant.audience,
        "intent": grant.intent.to_json(),
        "decision": {
            "effect": "allow",
            "rule": grant.rule_id,
            "policy_version": grant.policy_version,
        },
        "credential": credential,
    }


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
) -> dict[str, Any]:
    """The entry for an attested workload that was refused (unregistered, wrong audience, policy deny)."""
    return {
        "v": ENTRY_VERSION,
        "kind": "denial",
        "time": rfc3339(now),
        "request_id": request_id,
        "workload": _workload(identity, workload),
        "audience": audience,
        "intent": intent.to_json(),
        "decision": {
            "effect": "deny",
            "rule": rule_id,
            "policy_version": policy_version,
            "error": error,
            "reason": reason,
        },
    }


def policy_load_entry(
    *, now: float, request_id: str, policy_version: str, files: dict[str, str], source: str
) -> dict[str, Any]:
    """A policy set went live: its version and the digest of every file in it.

    ``request_id`` names the start (or reload) that loaded it, so two starts within one second
    are two entries, not one deduplicated leaf.
    """
    return {
        "v": ENTRY_VERSION,
        "kind": "policy_load",
        "time": rfc3339(now),
        "request_id": request_id,
        "policy": {"version": policy_version, "files": files, "source": source},
    }


def key_rotation_entry(
    *, now: float, request_id: str, purpose: str, kid: str, alg: str, jwk: dict[str, Any]
) -> dict[str, Any]:
    """A new signing key went live (public part only)."""
    return {
        "v": ENTRY_VERSION,
        "kind": "key_rotation",
        "time": rfc3339(now),
        "request_id": request_id,
        "key": {"purpose": purpose, "kid": kid, "alg": alg, "public_jwk": jwk},
    }


def revocation_entry(
    *,
    now: float,
    request_id: str,
    workload: dict[str, Any],
    credential: dict[str, Any],
    reason: str,
    issuance: str | None,
    actor: dict[str, str],
) -> dict[str, Any]:
    """A credential was ended before or at its expiry (released, expired, suspended, or never recorded).

    ``workload`` holds ``name`` and ``spiffe_id``; ``credential`` its ``kind``, ``jti`` and lease id
    or accessor (never the secret); ``actor`` who ended it (``subject``, ``role``); ``issuance`` the
    leaf hash of its issuance entry, ``None`` when that entry never became durable.
    """
    return {
        "v": ENTRY_VERSION,
        "kind": "revocation",
        "time": rfc3339(now),
        "request_id": request_id,
        "workload": workload,
        "credential": credential,
        "reason": reason,
        "actor": actor,
        "issuance": issuance,
    }
