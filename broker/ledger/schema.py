"""The ledger entry schema, version 1: one frozen model per entry kind (docs/ledger.md §4).

These models are the contract, written once. The broker *builds* every entry through them
(:mod:`broker.entries`), ``audit`` *validates* every entry against them
(:mod:`broker.audit.schema`), and ``nhi-broker ledger schema`` prints the JSON Schema generated
from them (:func:`entry_json_schema`). An entry that a model refuses can neither be written nor
pass an audit.

Conventions, so a change is one line:

- a member that may be absent is ``name: Type | None = None`` and is *omitted* from the JSON
  when ``None`` (an old entry without it stays valid, its bytes unchanged);
- a member that is present but may be ``null`` is ``name: Type | None`` (no default);
- every object refuses members it does not define (``extra="forbid"``), and every value has
  its JSON type exactly (``strict``): ``true`` is not ``1``, ``"1"`` is not ``1``.

So adding an optional member (a delegated ``user``) is one line in the model of each kind that
carries it; ``trace_id`` is one line in the envelope every kind shares.
"""

# The member types are built by small factories (Text(256), Matching(...)), which mypy cannot
# read as types; pydantic can, and these models are checked by the tests against the JSON Schema.
# mypy: disable-error-code="valid-type"

from __future__ import annotations

import re
from datetime import datetime
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    StrictBool,
    StrictInt,
    StrictStr,
    Tag,
    TypeAdapter,
    WithJsonSchema,
    model_serializer,
    model_validator,
)

from broker.intent import (
    ACTION_RE,
    CONTEXT_KEY_RE,
    MAX_RESOURCE_LEN,
    MAX_RESOURCE_SEGMENTS,
    RESOURCE_SEGMENT_RE,
)
from broker.mint.keys import jwk_thumbprint

__all__ = [
    "ATTESTATION_METHODS",
    "DENIAL_ERRORS",
    "ENTRY_KINDS",
    "ENTRY_MODELS",
    "ENTRY_VERSION",
    "SCHEMA_ID",
    "ApprovalEntry",
    "DenialEntry",
    "Entry",
    "IssuanceEntry",
    "KeyRotationEntry",
    "MemberProblem",
    "PolicyLoadEntry",
    "RevocationEntry",
    "SuspensionEntry",
    "entry_json_schema",
]

ENTRY_VERSION = 1
SCHEMA_ID = "https://nhi-broker.example/schemas/ledger-entry-v1.json"

ATTESTATION_METHODS = frozenset({"kubernetes", "spiffe-jwt", "oidc", "dev", "x509-svid", "wimse"})
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
APPROVAL_OUTCOMES = frozenset({"approved", "denied", "expired"})
# JWK members that carry private key material (RFC 7518 §6.2.2, §6.3.2, §6.4; RFC 8037 §2).
PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})

_MAX_TEXT = 2048
_MAX_SPIFFE_BYTES = 2048


class MemberProblem(ValueError):
    """A validator's finding about ``member`` (dotted, relative to the value checked), or the value itself."""

    def __init__(self, problem: str, member: str = "") -> None:
        super().__init__(problem)
        self.problem = problem
        self.member = member


# -- value types ----------------------------------------------------------------------------------
# Each is a str (or int) checked by a Python function, with the same rule stated in JSON Schema.


def _schema_pattern(regex: re.Pattern[str]) -> str:
    return f"^(?:{regex.pattern})$"


def _text_check(max_len: int) -> Any:
    def check(value: str) -> str:
        if not value:
            raise MemberProblem("must not be empty")
        if len(value) > max_len:
            raise MemberProblem(f"is longer than {max_len} characters")
        if _CONTROL_RE.search(value):
            raise MemberProblem("contains control characters")
        return value

    return check


_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def Text(max_len: int = _MAX_TEXT) -> Any:
    """A non-empty string without control characters, at most ``max_len`` characters."""
    return Annotated[
        StrictStr,
        AfterValidator(_text_check(max_len)),
        WithJsonSchema({"type": "string", "minLength": 1, "maxLength": max_len, "pattern": "^[^\\x00-\\x1f\\x7f]*$"}),
    ]


def Matching(regex: str, what: str) -> Any:
    """A string that fully matches ``regex`` (stated as a JSON Schema ``pattern``)."""
    compiled = re.compile(regex)

    def check(value: str) -> str:
        if compiled.fullmatch(value) is None:
            raise MemberProblem(f"is not {what}")
        return value

    return Annotated[StrictStr, AfterValidator(check),
                     WithJsonSchema({"type": "string", "pattern": _schema_pattern(compiled), "description": what})]


def OneOf(*allowed: str) -> Any:
    """A string from a fixed set."""
    values = frozenset(allowed)
    listed = ", ".join(sorted(values))

    def check(value: str) -> str:
        if value not in values:
            raise MemberProblem(f"must be one of {listed}")
        return value

    return Annotated[StrictStr, AfterValidator(check), WithJsonSchema({"type": "string", "enum": sorted(values)})]


def Const(value: str) -> Any:
    """Exactly this string (also the tag of a discriminated union)."""
    return Annotated[Literal[value], WithJsonSchema({"const": value})]


def _non_negative(value: int) -> int:
    if value < 0:
        raise MemberProblem("must be a non-negative integer")
    return value


def _positive(value: int) -> int:
    if value < 1:
        raise MemberProblem("must be a positive integer")
    return value


NonNegativeInt = Annotated[StrictInt, AfterValidator(_non_negative),
                           WithJsonSchema({"type": "integer", "minimum": 0})]
PositiveInt = Annotated[StrictInt, AfterValidator(_positive), WithJsonSchema({"type": "integer", "minimum": 1})]

_TIME_RE = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})Z")


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


def _time(value: str) -> str:
    problem = _time_problem(value)
    if problem is not None:
        raise MemberProblem(problem)
    return value


Time = Annotated[StrictStr, AfterValidator(_time), WithJsonSchema(
    {"type": "string", "pattern": _schema_pattern(_TIME_RE),
     "description": "RFC 3339 UTC time with second precision, YYYY-MM-DDTHH:MM:SSZ (a real calendar date)"})]

_SPIFFE_RE = re.compile(r"spiffe://[a-z0-9._-]+(?:/[A-Za-z0-9._-]+)*")


@lru_cache(maxsize=4096)
def _spiffe_problem(value: str) -> str | None:
    if _SPIFFE_RE.fullmatch(value) is None:
        return "is not a SPIFFE ID (spiffe://trust-domain/path)"
    if len(value.encode("utf-8")) > _MAX_SPIFFE_BYTES or any(
        seg in (".", "..") for seg in value[len("spiffe://") :].split("/")[1:]
    ):
        return "is not a SPIFFE ID (too long, or a '.' or '..' segment)"
    return None


def _spiffe(value: str) -> str:
    problem = _spiffe_problem(value)
    if problem is not None:
        raise MemberProblem(problem)
    return value


SpiffeId = Annotated[StrictStr, AfterValidator(_spiffe), WithJsonSchema(
    {"type": "string", "pattern": _schema_pattern(_SPIFFE_RE), "maxLength": _MAX_SPIFFE_BYTES,
     "description": "a SPIFFE ID; no '.' or '..' path segment"})]

# is_valid_resource as one expression: 1-16 segments, none of which can hold a "/" (nor be "." or
# "..", which the segment grammar excludes), at most MAX_RESOURCE_LEN characters. Most resources
# are new (an order, a customer), so a cache of past answers rarely helps.
_RESOURCE_RE = re.compile(
    f"(?:{RESOURCE_SEGMENT_RE.pattern})(?:/(?:{RESOURCE_SEGMENT_RE.pattern})){{0,{MAX_RESOURCE_SEGMENTS - 1}}}")


def _valid_resource(value: str) -> bool:
    return len(value) <= MAX_RESOURCE_LEN and _RESOURCE_RE.fullmatch(value) is not None


def _resource(value: str) -> str:
    if not _valid_resource(value):
        raise MemberProblem("is not a resource path ('/'-separated safe segments)")
    return value


_SEGMENT = RESOURCE_SEGMENT_RE.pattern
Resource = Annotated[StrictStr, AfterValidator(_resource), WithJsonSchema(
    {"type": "string", "minLength": 1, "maxLength": 512, "pattern": f"^(?:{_SEGMENT})(?:/(?:{_SEGMENT})){{0,15}}$",
     "description": "1-16 '/'-separated safe segments (none empty, '.' or '..')"})]

Sha256 = Matching(r"sha256:[0-9a-f]{64}", "sha256:<64 lower-case hex digits>")
LeafHashHex = Matching(r"[0-9a-f]{64}", "a leaf hash (64 lower-case hex digits)")
B64Id = Matching(r"[A-Za-z0-9_-]{1,128}", "an identifier (base64url, 1-128 characters)")
TaskId = Matching(r"[0-9a-f]{32}", "a task id (32 lower-case hex digits)")
WorkloadName = Matching(r"[a-z][a-z0-9_-]{0,63}", "a workload name ([a-z][a-z0-9_-]{0,63})")
RuleId = Matching(r"[a-z0-9][a-z0-9_.-]{0,63}", "a rule id")
AuthReqId = Matching(r"[A-Za-z0-9_-]{20,64}", "an auth_req_id (base64url, 20-64 characters)")
RequestId = Text(128)


_TRACE_ID_RE = re.compile(r"[0-9a-f]{32}")
_ZERO_TRACE_ID = "0" * 32


def _trace_id(value: str) -> str:
    if _TRACE_ID_RE.fullmatch(value) is None:
        raise MemberProblem("is not a W3C trace id (32 lower-case hex digits)")
    if value == _ZERO_TRACE_ID:
        raise MemberProblem("is all zeros, which W3C Trace Context forbids")
    return value


TraceId = Annotated[StrictStr, AfterValidator(_trace_id), WithJsonSchema({
    "type": "string", "pattern": _schema_pattern(_TRACE_ID_RE), "not": {"const": _ZERO_TRACE_ID},
    "description": "the W3C Trace Context trace id of the request that wrote the entry"})]

Action = Matching(ACTION_RE.pattern, "an action such as payments.refund")

_FILE_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,255}")
_SHA256_RE = re.compile(r"sha256:[0-9a-f]{64}")


def _context(value: dict[str, Any]) -> dict[str, Any]:
    for key, member in value.items():
        if not isinstance(key, str) or CONTEXT_KEY_RE.fullmatch(key) is None:
            raise MemberProblem("is not a lower-case identifier", str(key))
        if type(member) is str:
            continue  # the common case, valid as it is
        items = member if isinstance(member, list) else [member]
        for item in items:
            if isinstance(member, list) and not isinstance(item, str):
                raise MemberProblem("lists may hold strings only", key)
            if item is None or isinstance(item, dict | list):
                raise MemberProblem("must be a string, number, boolean or string list", key)
    return value


Context = Annotated[dict[str, Any], AfterValidator(_context), WithJsonSchema({
    "type": "object",
    "propertyNames": {"pattern": _schema_pattern(CONTEXT_KEY_RE)},
    "additionalProperties": {"anyOf": [{"type": ["string", "number", "boolean"]},
                                       {"type": "array", "items": {"type": "string"}}]},
})]


def _file_digests(value: dict[str, Any]) -> dict[str, Any]:
    if not value:
        raise MemberProblem("must be a non-empty object of file name to sha256:<hex>")
    for name, digest in value.items():
        if _FILE_NAME_RE.fullmatch(name) is None or name in (".", ".."):
            raise MemberProblem("is not a plain file name", name)
        if not isinstance(digest, str) or _SHA256_RE.fullmatch(digest) is None:
            raise MemberProblem("is not sha256:<64 lower-case hex digits>", name)
    return value


FileDigests = Annotated[dict[str, Any], AfterValidator(_file_digests), WithJsonSchema({
    "type": "object", "minProperties": 1,
    "propertyNames": {"pattern": _schema_pattern(_FILE_NAME_RE), "not": {"enum": [".", ".."]}},
    "additionalProperties": {"type": "string", "pattern": _schema_pattern(_SHA256_RE)},
})]


def _names(value: list[str]) -> list[str]:
    if len(set(value)) != len(value):
        raise MemberProblem("names an approver twice")
    return value


_ApproverName = Text(128)
Names = Annotated[list[_ApproverName], AfterValidator(_names)]


def _endorsement(value: str) -> str:
    if not 0 < len(value) <= 4096 or not value.endswith("\n"):
        raise MemberProblem("must be a signed note (text ending in a newline, at most 4096 characters)")
    return value


Endorsement = Annotated[StrictStr, AfterValidator(_endorsement), WithJsonSchema({
    "type": "string", "minLength": 1, "maxLength": 4096, "pattern": "\n$",
    "description": "a C2SP signed note by the previous ledger key (docs/ledger.md §5.3)"})]


# -- objects ----------------------------------------------------------------------------------------


_OPTIONAL_MEMBERS: dict[type[BaseModel], tuple[str, ...]] = {}


def _optional_members(model: type[BaseModel]) -> tuple[str, ...]:
    """The names of ``model``'s optional fields (computed once per class: this runs on every append)."""
    names = _OPTIONAL_MEMBERS.get(model)
    if names is None:
        names = _OPTIONAL_MEMBERS[model] = tuple(
            name for name, field in model.model_fields.items() if not field.is_required())
    return names


class Member(BaseModel):
    """Base of every object in an entry: frozen, strict, closed, and absent members omitted."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for name in _optional_members(type(self)):
            if data.get(name, 0) is None:
                del data[name]  # an optional member that is absent, not null
        return data

    def to_json(self) -> dict[str, Any]:
        """The JSON object (what the leaf's RFC 8785 canonical form encodes)."""
        return self.model_dump(mode="json")


class Workload(Member):
    """The attested workload. ``name`` and ``owner`` come from the registry (absent if unregistered)."""

    spiffe_id: SpiffeId
    attestation: OneOf(*ATTESTATION_METHODS)
    issuer: Text()
    evidence_digest: Sha256
    name: WorkloadName | None = None
    owner: Text(256) | None = None


class RegisteredWorkloadRef(Workload):
    """A workload the registry knows: ``name`` and ``owner`` are required."""

    name: WorkloadName
    owner: Text(256)


class IntentDetail(Member):
    """The RFC 9396 authorization detail of ``type`` ``intent``, exactly as requested and decided."""

    type: Const("intent")
    action: Action
    resource: Resource
    context: Context


class AllowDecision(Member):
    """The policy decision that allowed an issuance."""

    effect: Const("allow")
    rule: RuleId
    policy_version: Sha256


class ReviewDecision(Member):
    """The policy decision that held an intent for human review."""

    effect: Const("review")
    rule: RuleId
    policy_version: Sha256


class DenyDecision(Member):
    """Why a request was refused: the OAuth ``error`` returned and a human ``reason``."""

    effect: Const("deny")
    rule: RuleId | None
    policy_version: Sha256
    error: OneOf(*DENIAL_ERRORS)
    reason: Text()


class JwtCredential(Member):
    """A task JWT: its id, signing key, lifetime and the SHA-256 of its canonical claims (without ``txn``)."""

    kind: Const("jwt")
    jti: B64Id
    kid: B64Id
    iat: NonNegativeInt
    exp: NonNegativeInt
    claims_sha256: Sha256
    # A DPoP-bound token: the RFC 7638 thumbprint of the proof key (the token's cnf.jkt).
    cnf_jkt: Matching(r"[A-Za-z0-9_-]{43}", "a JWK thumbprint (43 base64url characters)") | None = None
    # A certificate-bound token (RFC 8705): the client certificate's SHA-256 thumbprint (cnf.x5t#S256).
    cnf_x5t_s256: Matching(r"[A-Za-z0-9_-]{43}", "a certificate thumbprint (43 base64url characters)") | None = None

    @model_validator(mode="after")
    def _lifetime(self) -> JwtCredential:
        if self.exp <= self.iat:
            raise MemberProblem("must be after credential.iat", "exp")
        return self


class VaultCredential(Member):
    """A Vault/OpenBao secret, named by its lease id or token accessor, never by the secret itself."""

    kind: OneOf(*VAULT_KINDS)
    jti: TaskId
    vault: Text(512)
    lease_id: Text(512) | None = None
    accessor: Text(256) | None = None
    iat: NonNegativeInt
    exp: NonNegativeInt

    @model_validator(mode="after")
    def _one_reference(self) -> VaultCredential:
        if (self.lease_id is None) == (self.accessor is None):
            raise MemberProblem("exactly one of lease_id and accessor is required", "lease_id")
        return self


def _credential_tag(value: Any) -> str:
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    return "vault" if kind in VAULT_KINDS else "jwt"


Credential = Annotated[
    Annotated[JwtCredential, Tag("jwt")] | Annotated[VaultCredential, Tag("vault")],
    Discriminator(_credential_tag),
]


class IssuanceApproval(Member):
    """Points at the ``approval`` entry that released an intent held for review."""

    auth_req_id: AuthReqId
    index: NonNegativeInt
    leaf_hash: LeafHashHex
    approvers: Names

    @model_validator(mode="after")
    def _someone(self) -> IssuanceApproval:
        if not self.approvers:
            raise MemberProblem("an approved issuance names at least one approver", "approvers")
        return self


class OperatorActor(Member):
    """An operator of the admin or approver API."""

    kind: Const("operator")
    name: Text(256)
    role: OneOf(*OPERATOR_ROLES)
    auth: Text(64)


class ClientActor(Member):
    """An authenticated resource server (RFC 7009 revocation)."""

    kind: Const("client")
    client_id: Text(256)
    auth: Text(64)


class WorkloadActor(Member):
    """The workload that held a Vault secret (it released it)."""

    kind: Const("workload")
    spiffe_id: SpiffeId
    auth: Text(64)


class BrokerActor(Member):
    """The broker itself (expiry sweep, an append that failed)."""

    kind: Const("broker")


Actor = Annotated[OperatorActor | ClientActor | WorkloadActor | BrokerActor, Field(discriminator="kind")]


class ApproverRef(Member):
    """The operator who decided on a held intent."""

    kind: Const("operator")
    name: Text(128)
    role: Text(32)
    auth: Text(64)


class ApprovalState(Member):
    """One decision on a held intent, and where the count of approvals stands."""

    auth_req_id: AuthReqId
    group: Matching(r"[a-z][a-z0-9_-]{0,63}", "an approver group")
    needed: PositiveInt
    outcome: OneOf(*APPROVAL_OUTCOMES)
    approver: ApproverRef | None
    reason: Text(500) | None
    approvers: Names
    final: StrictBool

    @model_validator(mode="after")
    def _consistent(self) -> ApprovalState:
        if (self.outcome == "expired") != (self.approver is None):
            raise MemberProblem("is null exactly when the outcome is expired", "approver")
        if self.outcome == "approved" and self.final != (len(self.approvers) >= self.needed):
            raise MemberProblem("must say whether the approvers reached the number needed", "final")
        return self


class PolicyRef(Member):
    """A policy set that went live: its version digest, each file's digest, where it was loaded from."""

    version: Sha256
    files: FileDigests
    source: Text(4096)


def _public_jwk_guard(value: Any) -> Any:
    if isinstance(value, dict):
        leaked = sorted(PRIVATE_JWK_MEMBERS & value.keys())
        if leaked:
            # The ledger is public to auditors: a private member here is a leaked signing key.
            raise MemberProblem("is private key material and must never be logged", leaked[0])
        if not isinstance(value.get("kty"), str):
            raise MemberProblem("is required (a string)", "kty")
    return value


class _Jwk(Member):
    @model_validator(mode="before")
    @classmethod
    def _no_private_members(cls, value: Any) -> Any:
        return _public_jwk_guard(value)

    @model_validator(mode="after")
    def _kid_is_thumbprint(self) -> _Jwk:
        if self.kid != jwk_thumbprint(self.model_dump(mode="json")):  # type: ignore[attr-defined]
            raise MemberProblem("is not the RFC 7638 thumbprint of the key", "kid")
        return self


class EcPublicJwk(_Jwk):
    """A P-256 public key (RFC 7518 §6.2.1). ``kid`` is its RFC 7638 thumbprint over crv, kty, x, y."""

    kty: Const("EC")
    crv: Const("P-256")
    x: Matching(r"[A-Za-z0-9_-]{43}", "a base64url P-256 coordinate")
    y: Matching(r"[A-Za-z0-9_-]{43}", "a base64url P-256 coordinate")
    kid: B64Id
    alg: Const("ES256") | None = None
    use: Const("sig") | None = None


class OkpPublicJwk(_Jwk):
    """An Ed25519 public key (RFC 8037 §2). ``kid`` is its RFC 7638 thumbprint over crv, kty, x."""

    kty: Const("OKP")
    crv: Const("Ed25519")
    x: Matching(r"[A-Za-z0-9_-]{43}", "a base64url Ed25519 public key")
    kid: B64Id
    alg: Const("EdDSA") | None = None
    use: Const("sig") | None = None


PublicJwk = Annotated[EcPublicJwk | OkpPublicJwk, Field(discriminator="kty")]


class KeyRef(Member):
    """A signing key that went live; for a ledger key after the first, the old key's ``endorsement``."""

    purpose: OneOf(*KEY_PURPOSES)
    kid: B64Id
    alg: OneOf(*KEY_ALGS)
    public_jwk: PublicJwk
    endorsement: Endorsement | None = None

    @model_validator(mode="after")
    def _same_kid(self) -> KeyRef:
        if str(self.public_jwk.kid) != str(self.kid):
            raise MemberProblem("differs from key.public_jwk.kid", "kid")
        return self


class LeaseCredentialRef(Member):
    """The Vault secret a lease revocation ended."""

    kind: OneOf(*VAULT_KINDS)
    lease_id: Text(512) | None = None
    accessor: Text(256) | None = None


class TokenRevocation(Member):
    """One token (RFC 7009): its ``jti`` and the workload it was issued to."""

    scope: Const("token")
    jti: B64Id
    workload: WorkloadName
    reason: Text()


class LeaseRevocation(Member):
    """One Vault secret ended: released, expired, suspended, or never durably issued (``issuance`` null)."""

    scope: Const("lease")
    jti: TaskId
    workload: WorkloadName
    spiffe_id: SpiffeId
    credential: LeaseCredentialRef
    issuance: LeafHashHex | None
    reason: Text()


class ScopeRevocation(Member):
    """Every live token of a workload, an end user or a conversation; ``value`` names which."""

    scope: Literal["workload", "end_user", "conversation"]
    value: Text(256)
    reason: Text()


Revocation = Annotated[TokenRevocation | LeaseRevocation | ScopeRevocation, Field(discriminator="scope")]


class SuspensionState(Member):
    """The kill switch for one workload."""

    workload: WorkloadName
    state: OneOf("suspended", "resumed")
    reason: Text()


class EndUserRef(Member):
    """A delegated request's verified end user (RFC 8693 subject): its issuer and subject, and the
    digest of the user token when it was presented (absent when carried over from a parent token)."""

    iss: Text(2048)
    sub: Text(255)
    evidence_digest: Sha256 | None = None


class ParentRef(Member):
    """A sub-agent's parent task token: its ``jti``, the leaf hash of its issuance (``txn``), its workload."""

    jti: B64Id
    txn: LeafHashHex
    client_id: Text(64)


# -- entries ----------------------------------------------------------------------------------------


class _Entry(Member):
    """The envelope every kind shares."""

    v: Literal[1] = Field(description="entry schema version")
    time: Time
    request_id: RequestId
    # The trace of the request that wrote the entry (W3C Trace Context): absent for entries written
    # outside a request (a start, the expiry sweep) and in entries older than the member.
    trace_id: TraceId | None = None


class IssuanceEntry(_Entry):
    """A credential left the broker (durable before it did)."""

    kind: Literal["issuance"]
    workload: RegisteredWorkloadRef
    audience: Text(256)
    intent: IntentDetail
    decision: AllowDecision
    credential: Credential
    approval: IssuanceApproval | None = None
    user: EndUserRef | None = None
    parent: ParentRef | None = None


class DenialEntry(_Entry):
    """An attested workload was refused (unregistered, wrong audience, policy deny, kill switch, ...)."""

    kind: Literal["denial"]
    workload: Workload
    audience: Text(256)
    intent: IntentDetail
    decision: DenyDecision
    user: EndUserRef | None = None
    parent: ParentRef | None = None


class ApprovalEntry(_Entry):
    """A decision on an intent held for review: one approver's approval or denial, or its expiry."""

    kind: Literal["approval"]
    workload: RegisteredWorkloadRef
    audience: Text(256)
    intent: IntentDetail
    decision: ReviewDecision
    approval: ApprovalState
    user: EndUserRef | None = None


class RevocationEntry(_Entry):
    """Tokens or a Vault secret were revoked, and by whom."""

    kind: Literal["revocation"]
    actor: Actor
    revocation: Revocation


class SuspensionEntry(_Entry):
    """An operator suspended (kill switch) or resumed a workload."""

    kind: Literal["suspension"]
    actor: Actor
    suspension: SuspensionState


class PolicyLoadEntry(_Entry):
    """A policy set went live (every start and reload); ``actor`` is the operator who asked for a reload."""

    kind: Literal["policy_load"]
    policy: PolicyRef
    actor: Actor | None = None


class KeyRotationEntry(_Entry):
    """A signing key went live (public part only)."""

    kind: Literal["key_rotation"]
    key: KeyRef


ENTRY_MODELS: dict[str, type[_Entry]] = {
    "issuance": IssuanceEntry,
    "denial": DenialEntry,
    "approval": ApprovalEntry,
    "revocation": RevocationEntry,
    "suspension": SuspensionEntry,
    "policy_load": PolicyLoadEntry,
    "key_rotation": KeyRotationEntry,
}
ENTRY_KINDS = frozenset(ENTRY_MODELS)

Entry = Annotated[
    IssuanceEntry | DenialEntry | ApprovalEntry | RevocationEntry | SuspensionEntry | PolicyLoadEntry
    | KeyRotationEntry,
    Field(discriminator="kind"),
]
"""Any version 1 entry, told apart by ``kind``."""


def entry_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a version 1 entry, generated from these models."""
    schema = TypeAdapter(Entry).json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "nhi-broker ledger entry, version 1",
        "description": (
            "One leaf of the nhi-broker ledger is the RFC 8785 canonical JSON of one such object "
            "(docs/ledger.md §2-§4). Rules JSON Schema cannot state are in the descriptions and in "
            "docs/ledger.md: credential.exp > credential.iat; key.kid = key.public_jwk.kid = the RFC "
            "7638 thumbprint of the key; approval.approver is null exactly when the outcome is "
            "expired; a vault credential has exactly one of lease_id and accessor."
        ),
        **schema,
    }
