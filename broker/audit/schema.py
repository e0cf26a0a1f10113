"""The ledger entry schema, version 1 (docs/ledger.md §Entries), as a validator.

:func:`validate_entry` is the only way to get a :class:`ValidatedEntry`: it checks the common
envelope (``v``, ``kind``, ``time``), then every member of the kind's body — required members,
their JSON types and their grammars — and refuses members the schema does not define. The first
problem raises :class:`~broker.audit.errors.EntrySchemaError` naming the member by its dotted
path (``workload.evidence_digest``, ``policy.files.model.conf``).

Kinds ``revocation`` and ``suspension`` are reserved: only their envelope is checked. Any other
kind is refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from broker.audit.errors import EntrySchemaError
from broker.intent import ACTION_RE, CONTEXT_KEY_RE, is_valid_resource
from broker.mint.keys import jwk_thumbprint

__all__ = [
    "ENTRY_KINDS",
    "ENTRY_VERSION",
    "RESERVED_KINDS",
    "ValidatedEntry",
    "validate_entry",
]

ENTRY_VERSION = 1
WRITTEN_KINDS = frozenset({"issuance", "denial", "policy_load", "key_rotation", "approval"})
RESERVED_KINDS = frozenset({"revocation", "suspension"})
ENTRY_KINDS = WRITTEN_KINDS | RESERVED_KINDS

ATTESTATION_METHODS = frozenset({"kubernetes", "spiffe-jwt", "oidc", "dev"})
KEY_PURPOSES = frozenset({"task-token", "ledger"})
KEY_ALGS = frozenset({"ES256", "EdDSA"})
# Every error the pipeline records on a denial: policy, audience, kill switch, limits, DPoP binding.
DENIAL_ERRORS = frozenset({"access_denied", "invalid_target", "workload_suspended", "rate_limit_exceeded",
                           "budget_exceeded", "invalid_dpop_proof"})
# JWK members that carry private key material (RFC 7518 §6.2.2, §6.3.2, §6.4; RFC 8037 §2).
PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})

_TIME_RE = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})Z")
_SHA256_RE = re.compile(r"sha256:[0-9a-f]{64}")
_SPIFFE_RE = re.compile(r"spiffe://[a-z0-9._-]+(?:/[A-Za-z0-9._-]+)*")
_NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_RULE_ID_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_FILE_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,255}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_MAX_SPIFFE_BYTES = 2048
_MAX_TEXT = 2048

Check = Callable[[Any, str], None]


@dataclass(frozen=True, slots=True)
class ValidatedEntry:
    """A ledger entry that passed :func:`validate_entry`; build it no other way.

    ``time`` is the entry's RFC 3339 UTC time (fixed width, so string order is time order);
    ``spiffe_id``, ``workload`` and ``owner`` are set for entries about a workload; ``jti`` for
    issuances. ``entry`` is the whole decoded entry.
    """

    kind: str
    time: str
    entry: dict[str, Any]
    spiffe_id: str | None = None
    workload: str | None = None
    owner: str | None = None
    jti: str | None = None


# -- member checks ------------------------------------------------------------------------------
# Each check takes (value, dotted path) and raises EntrySchemaError(path, problem).


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _text(value: Any, path: str, max_len: int = _MAX_TEXT) -> str:
    if not isinstance(value, str):
        raise EntrySchemaError(path, f"must be a string, not {_type_name(value)}")
    if not value:
        raise EntrySchemaError(path, "must not be empty")
    if len(value) > max_len:
        raise EntrySchemaError(path, f"is longer than {max_len} characters")
    if _CONTROL_RE.search(value):
        raise EntrySchemaError(path, "contains control characters")
    return value


def _text_of(max_len: int = _MAX_TEXT) -> Check:
    def check(value: Any, path: str) -> None:
        _text(value, path, max_len)

    return check


def _matching(pattern: re.Pattern[str], what: str) -> Check:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, str):
            raise EntrySchemaError(path, f"must be a string, not {_type_name(value)}")
        if pattern.fullmatch(value) is None:
            raise EntrySchemaError(path, f"is not {what}")

    return check


def _one_of(allowed: frozenset[str]) -> Check:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, str) or value not in allowed:
            raise EntrySchemaError(path, f"must be one of {', '.join(sorted(allowed))}")

    return check


def _equal(expected: str) -> Check:
    def check(value: Any, path: str) -> None:
        if value != expected:
            raise EntrySchemaError(path, f"must be {expected!r}")

    return check


def _non_negative_int(value: Any, path: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise EntrySchemaError(path, "must be a non-negative integer")


def _nullable(inner: Check) -> Check:
    def check(value: Any, path: str) -> None:
        if value is not None:
            inner(value, path)

    return check


def _obj(required: dict[str, Check], optional: dict[str, Check] | None = None) -> Check:
    """An object with exactly these members (``optional`` ones may be absent)."""
    optional = optional or {}
    known = required.keys() | optional.keys()

    def check(value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise EntrySchemaError(path, f"must be an object, not {_type_name(value)}")
        prefix = f"{path}." if path else ""
        for name, member_check in required.items():
            if name not in value:
                raise EntrySchemaError(prefix + name, "is required")
            member_check(value[name], prefix + name)
        for name, member in value.items():
            if name not in known:
                raise EntrySchemaError(prefix + name, "is not a member of this object in entry version 1")
            if name in optional:
                optional[name](member, prefix + name)

    return check


def _time(value: Any, path: str) -> None:
    match = _TIME_RE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise EntrySchemaError(path, "is not an RFC 3339 UTC time of the form YYYY-MM-DDTHH:MM:SSZ")
    try:
        datetime(*(int(g) for g in match.groups()))  # only the calendar is checked
    except ValueError:
        raise EntrySchemaError(path, "is not a valid calendar time") from None


def _spiffe_id(value: Any, path: str) -> None:
    if not isinstance(value, str) or _SPIFFE_RE.fullmatch(value) is None:
        raise EntrySchemaError(path, "is not a SPIFFE ID (spiffe://trust-domain/path)")
    if len(value.encode("utf-8")) > _MAX_SPIFFE_BYTES or any(
        seg in (".", "..") for seg in value[len("spiffe://") :].split("/")[1:]
    ):
        raise EntrySchemaError(path, "is not a SPIFFE ID (too long, or a '.' or '..' segment)")


def _resource(value: Any, path: str) -> None:
    if not is_valid_resource(value):
        raise EntrySchemaError(path, "is not a resource path ('/'-separated safe segments)")


def _context(value: Any, path: str) -> None:
    if not isinstance(value, dict):
        raise EntrySchemaError(path, f"must be an object, not {_type_name(value)}")
    for key, member in value.items():
        if CONTEXT_KEY_RE.fullmatch(key) is None:
            raise EntrySchemaError(f"{path}.{key}", "is not a lower-case identifier")
        items = member if isinstance(member, list) else [member]
        for item in items:
            if isinstance(member, list) and not isinstance(item, str):
                raise EntrySchemaError(f"{path}.{key}", "lists may hold strings only")
            if item is None or isinstance(item, dict | list):
                raise EntrySchemaError(f"{path}.{key}", "must be a string, number, boolean or string list")


def _file_digests(value: Any, path: str) -> None:
    if not isinstance(value, dict) or not value:
        raise EntrySchemaError(path, "must be a non-empty object of file name to sha256:<hex>")
    for name, digest in value.items():
        if _FILE_NAME_RE.fullmatch(name) is None or name in (".", ".."):
            raise EntrySchemaError(f"{path}.{name}", "is not a plain file name")
        if not isinstance(digest, str) or _SHA256_RE.fullmatch(digest) is None:
            raise EntrySchemaError(f"{path}.{name}", "is not sha256:<64 lower-case hex digits>")


def _public_jwk(value: Any, path: str) -> None:
    if not isinstance(value, dict):
        raise EntrySchemaError(path, f"must be an object, not {_type_name(value)}")
    leaked = sorted(PRIVATE_JWK_MEMBERS & value.keys())
    if leaked:
        # The ledger is public to auditors: a private member here is a leaked signing key.
        raise EntrySchemaError(f"{path}.{leaked[0]}", "is private key material and must never be logged")
    if not isinstance(value.get("kty"), str):
        raise EntrySchemaError(f"{path}.kty", "is required (a string)")
    try:
        thumbprint = jwk_thumbprint(value)
    except (KeyError, ValueError, TypeError):
        raise EntrySchemaError(path, "is not a public EC, OKP or RSA key") from None
    if value.get("kid") != thumbprint:
        raise EntrySchemaError(f"{path}.kid", "is not the RFC 7638 thumbprint of the key")


_SHA256 = _matching(_SHA256_RE, "sha256:<64 lower-case hex digits>")
_REQUEST_ID = _text_of(128)

_WORKLOAD_REQUIRED: dict[str, Check] = {
    "spiffe_id": _spiffe_id,
    "attestation": _one_of(ATTESTATION_METHODS),
    "issuer": _text_of(),
    "evidence_digest": _SHA256,
}
_WORKLOAD_NAMED = {
    "name": _matching(_NAME_RE, "a workload name ([a-z][a-z0-9_-]{0,63})"),
    "owner": _text_of(256),
}

_INTENT = _obj(
    {
        "type": _equal("intent"),
        "action": _matching(ACTION_RE, "an action such as payments.refund"),
        "resource": _resource,
        "context": _context,
    }
)

_AUTH_REQ_ID = _matching(re.compile(r"[A-Za-z0-9_-]{20,64}"), "an auth_req_id (base64url, 20-64 characters)")
_HEX_LEAF = _matching(re.compile(r"[0-9a-f]{64}"), "a leaf hash (64 lower-case hex digits)")
_OPERATOR_NAME = _text_of(128)
APPROVAL_OUTCOMES = frozenset({"approved", "denied", "expired"})


def _names(value: Any, path: str) -> None:
    if not isinstance(value, list):
        raise EntrySchemaError(path, f"must be an array, not {_type_name(value)}")
    for i, name in enumerate(value):
        _OPERATOR_NAME(name, f"{path}.{i}")
    if len(set(value)) != len(value):
        raise EntrySchemaError(path, "names an approver twice")


def _boolean(value: Any, path: str) -> None:
    if not isinstance(value, bool):
        raise EntrySchemaError(path, f"must be a boolean, not {_type_name(value)}")


def _positive_int(value: Any, path: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise EntrySchemaError(path, "must be a positive integer")


_ACTOR = _obj({"kind": _equal("operator"), "name": _OPERATOR_NAME, "role": _text_of(32), "auth": _text_of(64)})

_APPROVAL = _obj(
    {
        "request_id": _REQUEST_ID,
        "workload": _obj({**_WORKLOAD_REQUIRED, **_WORKLOAD_NAMED}),
        "audience": _text_of(256),
        "intent": _INTENT,
        "decision": _obj(
            {
                "effect": _equal("review"),
                "rule": _matching(_RULE_ID_RE, "a rule id"),
                "policy_version": _SHA256,
            }
        ),
        "approval": _obj(
            {
                "auth_req_id": _AUTH_REQ_ID,
                "group": _matching(_NAME_RE, "an approver group"),
                "needed": _positive_int,
                "outcome": _one_of(APPROVAL_OUTCOMES),
                "approver": _nullable(_ACTOR),
                "reason": _nullable(_text_of(500)),
                "approvers": _names,
                "final": _boolean,
            }
        ),
    }
)

_ISSUANCE_APPROVAL = _obj(
    {"auth_req_id": _AUTH_REQ_ID, "index": _non_negative_int, "leaf_hash": _HEX_LEAF, "approvers": _names}
)

_ISSUANCE = _obj(
    {
        "request_id": _REQUEST_ID,
        "workload": _obj({**_WORKLOAD_REQUIRED, **_WORKLOAD_NAMED}),
        "audience": _text_of(256),
        "intent": _INTENT,
        "decision": _obj(
            {
                "effect": _equal("allow"),
                "rule": _matching(_RULE_ID_RE, "a rule id"),
                "policy_version": _SHA256,
            }
        ),
        "credential": _obj(
            {
                "kind": _equal("jwt"),
                "jti": _matching(_B64URL_RE, "a token id (base64url)"),
                "kid": _matching(_B64URL_RE, "a key id (base64url)"),
                "iat": _non_negative_int,
                "exp": _non_negative_int,
                "claims_sha256": _SHA256,
            }
        ),
    },
    {"approval": _ISSUANCE_APPROVAL},
)

_DENIAL = _obj(
    {
        "request_id": _REQUEST_ID,
        # A workload the registry does not know is denied with no name and no owner.
        "workload": _obj(_WORKLOAD_REQUIRED, _WORKLOAD_NAMED),
        "audience": _text_of(256),
        "intent": _INTENT,
        "decision": _obj(
            {
                "effect": _equal("deny"),
                "rule": _nullable(_matching(_RULE_ID_RE, "a rule id")),
                "policy_version": _SHA256,
                "error": _one_of(DENIAL_ERRORS),
                "reason": _text_of(),
            }
        ),
    }
)

_POLICY_LOAD = _obj(
    {
        "request_id": _REQUEST_ID,
        "policy": _obj({"version": _SHA256, "files": _file_digests, "source": _text_of(4096)}),
    }
)

_KEY_ROTATION = _obj(
    {
        "request_id": _REQUEST_ID,
        "key": _obj(
            {
                "purpose": _one_of(KEY_PURPOSES),
                "kid": _matching(_B64URL_RE, "a key id (base64url)"),
                "alg": _one_of(KEY_ALGS),
                "public_jwk": _public_jwk,
            }
        )
    }
)

_BODIES: dict[str, Check] = {
    "issuance": _ISSUANCE,
    "denial": _DENIAL,
    "policy_load": _POLICY_LOAD,
    "key_rotation": _KEY_ROTATION,
    "approval": _APPROVAL,
}
_ENVELOPE = ("v", "kind", "time")


def validate_entry(entry: Any) -> ValidatedEntry:
    """Check ``entry`` against the version 1 schema of its kind and return it validated.

    Raises :class:`~broker.audit.errors.EntrySchemaError` naming the first bad member.
    """
    # (1) the envelope every kind shares.
    if not isinstance(entry, dict):
        raise EntrySchemaError("", f"an entry must be an object, not {_type_name(entry)}")
    for name in _ENVELOPE:
        if name not in entry:
            raise EntrySchemaError(name, "is required")
    version = entry["v"]
    if not isinstance(version, int) or isinstance(version, bool) or version != ENTRY_VERSION:
        raise EntrySchemaError("v", f"unsupported entry version (this verifier reads {ENTRY_VERSION})")
    kind = entry["kind"]
    if not isinstance(kind, str) or kind not in ENTRY_KINDS:
        raise EntrySchemaError("kind", f"must be one of {', '.join(sorted(ENTRY_KINDS))}")
    _time(entry["time"], "time")
    if kind in RESERVED_KINDS:
        # (2a) reserved kinds: nothing in this version writes them; only the envelope is fixed.
        return ValidatedEntry(kind=kind, time=entry["time"], entry=entry)
    # (2) the body of the kind, member by member; the envelope members are known to it.
    body = {k: v for k, v in entry.items() if k not in _ENVELOPE}
    _BODIES[kind](body, "")
    # (3) cross-member rules.
    if kind == "issuance":
        credential = entry["credential"]
        if credential["exp"] <= credential["iat"]:
            raise EntrySchemaError("credential.exp", "must be after credential.iat")
    if kind == "key_rotation" and entry["key"]["public_jwk"]["kid"] != entry["key"]["kid"]:
        raise EntrySchemaError("key.kid", "differs from key.public_jwk.kid")
    if kind == "approval":
        approval = entry["approval"]
        if (approval["outcome"] == "expired") != (approval["approver"] is None):
            raise EntrySchemaError("approval.approver", "is null exactly when the outcome is expired")
        reached = len(approval["approvers"]) >= approval["needed"]
        if approval["outcome"] == "approved" and approval["final"] != reached:
            raise EntrySchemaError("approval.final", "must say whether the approvers reached the number needed")
    if kind == "issuance" and "approval" in entry and entry["approval"]["approvers"] == []:
        raise EntrySchemaError("approval.approvers", "an approved issuance names at least one approver")
    workload = entry.get("workload")
    if workload is None:
        return ValidatedEntry(kind=kind, time=entry["time"], entry=entry)
    credential = entry.get("credential")
    return ValidatedEntry(
        kind=kind,
        time=entry["time"],
        entry=entry,
        spiffe_id=workload["spiffe_id"],
        workload=workload.get("name"),
        owner=workload.get("owner"),
        jti=credential["jti"] if credential else None,
    )
