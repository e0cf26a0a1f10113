"""Frozen value types that flow through the broker: attest -> authorize -> mint -> ledger.

Trusted types are produced only by the stage that checked them:
:class:`WorkloadIdentity` by an attestor, :class:`RegisteredWorkload` by the registry,
:class:`Grant` by the policy engine, :class:`Receipt` by the ledger.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Delegation",
    "EndUser",
    "Grant",
    "Held",
    "Intent",
    "Issued",
    "Receipt",
    "RegisteredWorkload",
    "ReviewTerms",
    "WorkloadIdentity",
]


@dataclass(frozen=True, slots=True)
class WorkloadIdentity:
    """A workload identity proven by a verified subject token.

    ``evidence_digest`` is ``sha256:<hex>`` of the presented token: enough to match evidence later,
    never the token itself.
    """

    spiffe_id: str
    issuer: str
    method: str  # "kubernetes" | "spiffe-jwt" | "oidc" | "dev"
    subject: str  # the token's own ``sub``
    evidence_digest: str
    expires_at: int
    jti: str | None = None
    #: RFC 7638 thumbprint of the key the identity token is bound to (its ``cnf``), if any.
    cnf_jkt: str | None = None


@dataclass(frozen=True, slots=True)
class EndUser:
    """An end user proven by a verified token of a configured user issuer (``[[user_issuers]]``).

    Built only by :class:`broker.attest.users.UserTokenVerifier` (or carried over, already verified,
    from a parent task token this broker signed). ``claims`` are the issuer's claims mapped to policy
    terms (``user.<name>``), strings, numbers or booleans only. ``evidence_digest`` is ``sha256:<hex>``
    of the user token, ``None`` when the user was carried over from a parent task token.
    """

    issuer: str
    subject: str
    claims: dict[str, Any] = field(default_factory=dict)
    evidence_digest: str | None = None

    def sub_id(self) -> dict[str, str]:
        """The RFC 9493 ``iss_sub`` subject identifier of this user."""
        return {"format": "iss_sub", "iss": self.issuer, "sub": self.subject}

    def policy_terms(self) -> dict[str, Any]:
        """The ``user.*`` terms policy conditions see: ``user.sub``, ``user.iss`` and mapped claims."""
        terms = {f"user.{name}": value for name, value in self.claims.items()}
        terms["user.sub"] = self.subject
        terms["user.iss"] = self.issuer
        return terms

    def ledger_json(self) -> dict[str, Any]:
        """The ``user`` member of a ledger entry: issuer and subject, and the evidence digest if any."""
        record: dict[str, Any] = {"iss": self.issuer, "sub": self.subject}
        if self.evidence_digest is not None:
            record["evidence_digest"] = self.evidence_digest
        return record


@dataclass(frozen=True, slots=True)
class Delegation:
    """A sub-agent acting on a parent task token (agent-to-agent attenuation), built only by
    :mod:`broker.delegation` from a task token this broker signed and verified.

    ``subject`` is the parent token's ``sub`` (the party everybody acts for), ``act`` the parent's
    ``act`` claim (``None`` when the parent acted for itself), ``parent_client_id`` the parent's
    registry name, and ``jti``/``txn``/``exp`` identify the parent token and its ledger entry.
    """

    subject: str
    act: dict[str, Any] | None
    parent_client_id: str
    parent_spiffe_id: str
    jti: str
    txn: str
    exp: int
    audience: str
    intent: Intent
    #: The parent's ``num_uses`` (an N-use token): issuing the child consumes one use, which it inherits.
    num_uses: int | None = None
    #: The parent's verified claims (for the shared token state: uses, revocation).
    claims: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def ledger_json(self) -> dict[str, Any]:
        """The ``parent`` member of a ledger entry: the parent token and its issuance entry's leaf hash."""
        return {"jti": self.jti, "txn": self.txn, "client_id": self.parent_client_id}


@dataclass(frozen=True, slots=True)
class Intent:
    """One RFC 9396 ``authorization_details`` entry of ``"type": "intent"``, validated."""

    action: str
    resource: str
    context: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The intent exactly as it appears in a token and in the ledger."""
        return {"type": "intent", "action": self.action, "resource": self.resource, "context": dict(self.context)}


@dataclass(frozen=True, slots=True)
class RegisteredWorkload:
    """A registry entry matched by an attested identity."""

    name: str
    spiffe_id: str  # the attested SPIFFE ID (the registry entry may be a pattern)
    owner: str
    roles: tuple[str, ...]
    audiences: tuple[str, ...]
    #: Registry names of the workloads whose task tokens this one may narrow as a sub-agent.
    delegators: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ReviewTerms:
    """What a ``review`` rule demands before anything is issued (``policies/approvals.toml``)."""

    rule_id: str
    approvers: str  # the operator group whose members may decide
    approvals: int  # distinct approvals needed
    max_wait: int  # seconds a request may wait for its decision
    owner_may_approve: bool = False  # may the workload's own owner be the only approver?


@dataclass(frozen=True, slots=True)
class Grant:
    """An allow decision of the intent policy, built only by ``broker.policy``.

    ``max_ttl`` is the deciding rule's cap in seconds; the minted credential never lives longer.
    """

    identity: WorkloadIdentity
    workload: RegisteredWorkload
    intent: Intent
    audience: str
    rule_id: str
    max_ttl: int
    credential_kind: str
    policy_version: str
    #: Sender constraint the policy demands: ``optional``, ``dpop`` or ``dpop-identity-key``.
    binding: str = "optional"
    #: Set when the deciding rule is a ``review`` rule: nothing is issued before a person approves.
    review: ReviewTerms | None = None
    #: The verified end user of a delegated exchange (RFC 8693 ``sub``); ``None`` on a plain exchange.
    user: EndUser | None = None
    #: The parent task token a sub-agent narrows; ``None`` unless this is an attenuation.
    delegation: Delegation | None = None

    def act_claim(self) -> dict[str, Any] | None:
        """RFC 8693 §4.1 ``act`` of the task token: the workload, then the chain it acts within."""
        if self.user is None and self.delegation is None:
            return None
        act: dict[str, Any] = {"sub": self.identity.spiffe_id}
        # A parent that acted for someone nests its own chain; a parent that acted for itself is the
        # token's subject, not an earlier actor (RFC 8693 §4.1: the least recent actor nests deepest).
        if self.delegation is not None and self.delegation.act is not None:
            act["act"] = self.delegation.act
        return act


@dataclass(frozen=True, slots=True)
class Receipt:
    """Proof that an entry is durable in the ledger: its index and RFC 6962 leaf hash (hex)."""

    index: int
    leaf_hash: str


@dataclass(frozen=True, slots=True)
class Issued:
    """A credential that left the broker, with its ledger receipt."""

    access_token: str
    issued_token_type: str
    token_type: str
    expires_in: int
    jti: str
    receipt: Receipt
    grant: Grant
    # Kind-specific response fields (Vault: username, release token, ...); empty for task tokens.
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Held:
    """An intent held for human review (OpenID CIBA poll mode): poll with ``auth_req_id``."""

    auth_req_id: str
    expires_in: int
    interval: int
    grant: Grant
