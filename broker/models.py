"""Frozen value types that flow through the broker: attest -> authorize -> mint -> ledger.

Trusted types are produced only by the stage that checked them:
:class:`WorkloadIdentity` by an attestor, :class:`RegisteredWorkload` by the registry,
:class:`Grant` by the policy engine, :class:`Receipt` by the ledger.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Grant", "Held", "Intent", "Issued", "Receipt", "RegisteredWorkload", "ReviewTerms", "WorkloadIdentity"]


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
