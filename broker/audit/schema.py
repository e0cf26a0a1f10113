"""The ledger entry schema, version 1 (docs/ledger.md §Entries), as a validator.

:func:`validate_entry` is the only way to get a :class:`ValidatedEntry`: it checks the common
envelope (``v``, ``kind``, ``time``), then every member of the kind's body — required members,
their JSON types and their grammars — and refuses members the schema does not define. The first
problem raises :class:`~broker.audit.errors.EntrySchemaError` naming the member by its dotted
path (``workload.evidence_digest``, ``policy.files.model.conf``).

Every kind this version of the broker writes has a schema; any other kind is refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
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
WRITTEN_KINDS = frozenset(
    {"issuance", "denial", "policy_load", "key_rotation", "revocation", "suspension", "approval"}
)
RESERVED_KINDS: frozenset[str] = frozenset()
ENTRY_KINDS = WRITTEN_KINDS | RESERVED_KINDS

ATTESTATION_METHODS = frozenset({"kubernetes", "spiffe-jwt", "oidc", "dev"})
KEY_PURPOSES = frozenset({"task-token", "ledger"})
KEY_ALGS = frozenset({"ES256", "EdDSA"})
DENIAL_ERRORS = frozenset({
    "access_denied",  # policy deny, unregistered workload
    "invalid_target",  # audience not allowed for the workload
    "invalid_dpop_proof",  # the deciding rule requires a DPoP-bound token
    "workload_suspended",  # the kill switch is on
    "rate_limit_exceeded",
    "budget_exceeded",
    "temporarily_unavailable",  # Vault unreachable or sealed: nothing was issued
})
VAULT_KINDS = frozenset({"vault-db", "vault-token", "vault-wrapped"})
OPERATOR_ROLES = frozenset({"admin", "approver", "auditor"})
REVOCATION_SCOPES = frozenset({"token", "lease", "workload", "end_user", "conversation"})
# JWK members that carry private key material (RFC 7518 §6.2.2, §6.3.2, §6.4; RFC 8037 §2).
PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})

_TIME_RE = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})Z")
_SHA256_RE = re.compile(r"sha256:[0-9a-f]{64}")
_SPIFFE_RE = re.compile(r"spiffe://[a-z0-9._-]+(?:/[A-Za-z0-9._-]+)*")
_NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_RULE_ID_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_JKT_RE = re.compile(r"[A-Za-z0-9_-]{43}")
_TASK_ID_RE = re.compile(r"[0-9a-f]{32}")
_HEX_HASH_RE = re.compile(r"[0-9a-f]{64}")
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
    children: dict[str, dict[str, str]] = {}  # dotted member paths, built once per parent path

    def check(value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise EntrySchemaError(path, f"must be an object, not {_type_name(value)}")
        paths = children.get(path)
        if paths is None:
            prefix = f"{path}." if path else ""
            paths = children.setdefault(path, {name: prefix + name for name in known})
        for name, member_check in required.items():
            if name not in value:
                raise EntrySchemaError(paths[name], "is required")
            member_check(value[name], paths[name])
        if len(value) != len(required):
            for name, member in value.items():
                if name not in known:
                    prefix = f"{path}." if path else ""
                    raise EntrySchemaError(prefix + name, "is not a member of this object in entry version 1")
                if name in optional:
                    optional[name](member, paths[name])

    return check


@lru_cache(maxsize=4096)
def _time_problem(value: str) -> str | None:
    match = _TIME_RE.fullmatch(value)
    if match is None:
        return "is not an RFC 3339 UTC time of the form YYYY-MM-DDTHH:MM:SSZ"
    try:
        year, month, day, hour, minute, second = (int(g) for g in match.groups())
        datetime(year, month, day, hour, minute, second)  # only the calendar is checked
    except ValueError:
        return "is not a valid calendar time"
    return None


def _time(value: Any, path: str) -> None:
    problem = _time_problem(value) if isinstance(value, str) else "is not an RFC 3339 UTC time"
    if problem is not None:
        raise EntrySchemaError(path, problem)


@lru_cache(maxsize=4096)
def _spiffe_problem(value: str) -> str | None:
    if _SPIFFE_RE.fullmatch(value) is None:
        return "is not a SPIFFE ID (spiffe://trust-domain/path)"
    if len(value.encode("utf-8")) > _MAX_SPIFFE_BYTES or any(
        seg in (".", "..") for seg in value[len("spiffe://") :].split("/")[1:]
    ):
        return "is not a SPIFFE ID (too long, or a '.' or '..' segment)"
    return None


def _spiffe_id(value: Any, path: str) -> None:
    problem = _spiffe_problem(value) if isinstance(value, str) else "is not a SPIFFE ID (spiffe://trust-domain/path)"
    if problem is not None:
        raise EntrySchemaError(path, problem)


_valid_resource = lru_cache(maxsize=65536)(is_valid_resource)


def _resource(value: Any, path: str) -> None:
    if not (isinstance(value, str) and _valid_resource(value)):
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


def _endorsement(value: Any, path: str) -> None:
    # A signed note (multi-line text): its signature is checked by the verifier, not here.
    if not isinstance(value, str) or not 0 < len(value) <= 4096 or not value.endswith("\n"):
        raise EntrySchemaError(path, "must be a signed note (text ending in a newline, at most 4096 characters)")


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

_JWT_CREDENTIAL = _obj(
    {
        "kind": _equal("jwt"),
        "jti": _matching(_B64URL_RE, "a token id (base64url)"),
        "kid": _matching(_B64URL_RE, "a key id (base64url)"),
        "iat": _non_negative_int,
        "exp": _non_negative_int,
        "claims_sha256": _SHA256,
    },
    # A DPoP-bound token: the RFC 7638 thumbprint of the proof key (the token's cnf.jkt).
    {"cnf_jkt": _matching(_JKT_RE, "a JWK thumbprint (43 base64url characters)")},
)
_TASK_ID = _matching(_TASK_ID_RE, "a task id (32 lower-case hex digits)")
# A Vault secret is named by its lease id (dynamic database users) or token accessor (child and
# wrapping tokens): both identify the secret without granting it. Never the secret itself.
_VAULT_REF = {"lease_id": _text_of(512), "accessor": _text_of(256)}


def _vault_credential(value: Any, path: str) -> None:
    ref = [name for name in _VAULT_REF if name in value]
    if len(ref) != 1:
        raise EntrySchemaError(f"{path}.lease_id", "exactly one of lease_id and accessor is required")
    _obj({"kind": _one_of(VAULT_KINDS), "jti": _TASK_ID, "vault": _text_of(512), ref[0]: _VAULT_REF[ref[0]],
          "iat": _non_negative_int, "exp": _non_negative_int})(value, path)


def _credential(value: Any, path: str) -> None:
    """A task JWT, or a leased Vault secret (docs/vault.md)."""
    kind = value.get("kind") if isinstance(value, dict) else None
    if kind in VAULT_KINDS:
        _vault_credential(value, path)
    else:
        _JWT_CREDENTIAL(value, path)

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


# A delegated request's verified end user (RFC 8693 subject): issuer and subject, and the digest of the
# user token when it was presented (absent when carried over from a parent task token).
_USER = _obj({"iss": _text_of(2048), "sub": _text_of(255)}, {"evidence_digest": _SHA256})
# A sub-agent's parent task token: its jti, the leaf hash of its issuance entry, its workload's name.
_PARENT = _obj(
    {"jti": _matching(_B64URL_RE, "a token id (base64url)"), "txn": _HEX_LEAF, "client_id": _text_of(64)}
)
_DELEGATION: dict[str, Check] = {"user": _USER, "parent": _PARENT}

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
    },
    {"user": _USER},
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
        "credential": _credential,
    },
    {"approval": _ISSUANCE_APPROVAL, **_DELEGATION},
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
    },
    _DELEGATION,
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
            },
            {"endorsement": _endorsement},
        )
    }
)

def _actor(value: Any, path: str) -> None:
    """Who acted: an operator of the admin API, an authenticated resource server (RFC 7009), the
    workload that held a Vault secret (release), or the broker itself (expiry sweep, failed append)."""
    kind = value.get("kind") if isinstance(value, dict) else None
    if kind == "broker":
        _obj({"kind": _equal("broker")})(value, path)
    elif kind == "workload":
        _obj({"kind": _equal("workload"), "spiffe_id": _spiffe_id, "auth": _text_of(64)})(value, path)
    elif kind == "operator":
        _obj({"kind": _equal("operator"), "name": _text_of(256), "role": _one_of(OPERATOR_ROLES),
              "auth": _text_of(64)})(value, path)
    elif kind == "client":
        _obj({"kind": _equal("client"), "client_id": _text_of(256), "auth": _text_of(64)})(value, path)
    else:
        raise EntrySchemaError(f"{path}.kind", "must be 'operator', 'client', 'workload' or 'broker'")


def _revocation(value: Any, path: str) -> None:
    scope = value.get("scope") if isinstance(value, dict) else None
    if scope == "lease":
        # One Vault secret ended: released, expired, suspended, or never durably issued
        # (``issuance`` is then null: the secret was revoked before anyone received it).
        _obj({"scope": _equal("lease"), "jti": _TASK_ID, "workload": _matching(_NAME_RE, "a workload name"),
              "spiffe_id": _spiffe_id,
              "credential": _obj({"kind": _one_of(VAULT_KINDS)}, _VAULT_REF),
              "issuance": _nullable(_matching(_HEX_HASH_RE, "a leaf hash (64 hex digits)")),
              "reason": _text_of()})(value, path)
    elif scope == "token":
        # One token (RFC 7009): its jti and the workload it was issued to.
        _obj({"scope": _equal("token"), "jti": _matching(_B64URL_RE, "a token id (base64url)"),
              "workload": _matching(_NAME_RE, "a workload name"), "reason": _text_of()})(value, path)
    else:
        # Every live token of a workload, an end user or a conversation: ``value`` names which.
        _obj({"scope": _one_of(REVOCATION_SCOPES - {"token"}), "value": _text_of(256),
              "reason": _text_of()})(value, path)


_REVOCATION = _obj({"request_id": _REQUEST_ID, "actor": _actor, "revocation": _revocation})

_SUSPENSION = _obj(
    {
        "request_id": _REQUEST_ID,
        "actor": _actor,
        "suspension": _obj(
            {
                "workload": _matching(_NAME_RE, "a workload name"),
                "state": _one_of(frozenset({"suspended", "resumed"})),
                "reason": _text_of(),
            }
        ),
    }
)

_BODIES: dict[str, Check] = {
    "issuance": _ISSUANCE,
    "denial": _DENIAL,
    "policy_load": _POLICY_LOAD,
    "key_rotation": _KEY_ROTATION,
    "revocation": _REVOCATION,
    "suspension": _SUSPENSION,
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
        if "request_id" not in entry:
            raise EntrySchemaError("request_id", "is required")
        _REQUEST_ID(entry["request_id"], "request_id")
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
