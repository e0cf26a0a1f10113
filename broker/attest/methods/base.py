"""The attestation-method interface and its registry (see :mod:`broker.attest.methods`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from broker.attest.evidence import Evidence
from broker.attest.issuers import IssuerConfig
from broker.attest.spiffe import SpiffeId
from broker.attest.template import SpiffeIdTemplate
from broker.errors import AttestationError, ConfigError
from broker.models import WorkloadIdentity

__all__ = ["REGISTRY", "AttestationMethod", "MethodRegistry", "TokenMethod", "VerifiedJwt", "register"]


@dataclass(frozen=True, slots=True)
class VerifiedJwt:
    """A JWT that passed the attestor's shared checks (issuer allow-list, key, signature, audience,
    time, lifetime, ``cnf``); built only by :class:`~broker.attest.verifier.Attestor`.

    ``claims`` are verified; ``sub`` is a non-empty string and ``exp`` an integer.
    """

    config: IssuerConfig
    claims: Mapping[str, Any]
    evidence_digest: str
    template: SpiffeIdTemplate | None = None
    cnf_jkt: str | None = None

    @property
    def subject(self) -> str:
        return str(self.claims["sub"])


class AttestationMethod(Protocol):
    """One way a workload proves its identity.

    ``name`` is what ``workloads.toml`` lists under ``attestation`` and what the ledger records.
    ``evidence_types`` are the token type URNs (or transport names) that select a request method;
    empty for token methods, which an issuer of ``kind == name`` selects.
    """

    name: str
    evidence_types: frozenset[str]

    async def verify(self, evidence: Evidence, token: VerifiedJwt | None = None) -> WorkloadIdentity:
        """The identity the evidence proves, or :class:`~broker.errors.AttestationError`.

        Token methods get ``token``, the JWT the attestor verified; request methods verify
        ``evidence`` themselves.
        """
        ...


class TokenMethod:
    """Base of the JWT methods: the shared checks are done; the subclass maps claims to a SPIFFE ID."""

    name: str = ""
    evidence_types: frozenset[str] = frozenset()

    def spiffe_id(self, token: VerifiedJwt) -> SpiffeId:
        """The SPIFFE ID the verified claims prove (raise :class:`AttestationError` if none)."""
        raise NotImplementedError  # every registered token method overrides it

    def identity(self, token: VerifiedJwt) -> WorkloadIdentity:
        """The workload identity of a verified token (synchronous; :meth:`verify` awaits nothing else)."""
        claims = token.claims
        return WorkloadIdentity(
            spiffe_id=str(self.spiffe_id(token)),
            issuer=token.config.issuer,
            method=self.name,
            subject=token.subject,
            evidence_digest=token.evidence_digest,
            expires_at=int(claims["exp"]),
            jti=claims.get("jti"),
            cnf_jkt=token.cnf_jkt,
        )

    async def verify(self, evidence: Evidence, token: VerifiedJwt | None = None) -> WorkloadIdentity:
        """See :meth:`AttestationMethod.verify`."""
        if token is None:
            raise AttestationError(f"{evidence.label} is not a token of a {self.name} issuer")
        return self.identity(token)


M = TypeVar("M", bound=AttestationMethod)


class MethodRegistry:
    """Attestation methods by name; request methods also by the evidence type that selects them."""

    def __init__(self) -> None:
        self._by_name: dict[str, AttestationMethod] = {}
        self._by_evidence: dict[str, AttestationMethod] = {}

    def register(self, method: M) -> M:
        """Add ``method``; a name or evidence type registered twice is a programming error."""
        if not method.name or method.name in self._by_name:
            raise ConfigError(f"attestation method {method.name!r} is registered twice (or has no name)")
        for kind in method.evidence_types:
            if kind in self._by_evidence:
                raise ConfigError(f"evidence type {kind!r} is claimed by two attestation methods")
        self._by_name[method.name] = method
        for kind in method.evidence_types:
            self._by_evidence[kind] = method
        return method

    @property
    def names(self) -> frozenset[str]:
        """Every registered method name."""
        return frozenset(self._by_name)

    def get(self, name: str) -> AttestationMethod:
        """The method called ``name`` (a configured issuer's ``kind``)."""
        method = self._by_name.get(name)
        if method is None:
            raise AttestationError(f"attestation method {name!r} is not available")
        return method

    def for_evidence_type(self, evidence_type: str | None) -> AttestationMethod | None:
        """The request method that answers ``evidence_type``, or ``None`` (then it is a JWT)."""
        return self._by_evidence.get(evidence_type) if evidence_type is not None else None


#: The process-wide registry the built-in methods register with.
REGISTRY = MethodRegistry()


def register(method: M) -> M:
    """Register ``method`` with :data:`REGISTRY` (use at import time of the method's module)."""
    return REGISTRY.register(method)
