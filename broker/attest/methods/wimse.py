"""``wimse``: a WIMSE Workload Identity Token with its Workload Proof Token, bound to the token request.

Revisions: draft-ietf-wimse-workload-creds-03 (WIT) and draft-ietf-wimse-wpt-02 (WPT), verified by
:mod:`broker.attest.wimse`. The request (docs/attestation.md):

- ``subject_token`` (or ``actor_token``) is the WIT and its type :data:`WIT_TOKEN_TYPE` (a broker URN:
  the drafts register the media type ``application/wit+jwt`` but no OAuth token type URI);
- the ``Workload-Proof-Token`` header carries exactly one WPT signed with the WIT's ``cnf.jwk``, whose
  ``aud`` is the broker's token endpoint under its configured ``public_url`` (never the Host header),
  whose ``wth`` is the hash of this WIT, and whose ``jti`` is consumed once in the shared state store.

The WIT's issuer keys come per trust domain from JWKS files or URLs (:class:`~broker.attest.jwks.JwksSource`,
read in a worker thread). The workload identifier in ``sub`` must be a SPIFFE ID: the registry of
workloads names SPIFFE IDs, so a ``wimse://`` identifier is refused rather than mapped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jwt
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from broker.attest.evidence import Evidence
from broker.attest.jwks import JwksSource, VerificationKey
from broker.attest.methods.base import VerifiedJwt, register
from broker.attest.spiffe import parse_spiffe_id, validate_trust_domain
from broker.attest.wimse import verify_wit, verify_wpt
from broker.clock import Clock
from broker.errors import AttestationError, ReplayDetected
from broker.models import WorkloadIdentity
from broker.state.store import StateStore

__all__ = ["WIT_TOKEN_TYPE", "WPT_HEADER", "WimseMethod", "WimseSettings", "WimseTrustAnchor"]

WIT_TOKEN_TYPE = "urn:nhi-broker:token-type:wimse-wit"
WPT_HEADER = "workload-proof-token"
#: The replay-store namespace of WPT ``jti`` values.
WPT_JTI_NAMESPACE = "wimse-wpt-jti"
_PROOF_LEEWAY = 5


class WimseTrustAnchor(BaseModel):
    """The keys that sign the WITs of one trust domain (``[[wimse.trust_anchors]]``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    trust_domain: str
    jwks_file: Path | None = None
    jwks_url: str | None = None

    @field_validator("trust_domain")
    @classmethod
    def _trust_domain(cls, value: str) -> str:
        return validate_trust_domain(value)

    @model_validator(mode="after")
    def _one_source(self) -> WimseTrustAnchor:
        if (self.jwks_file is None) == (self.jwks_url is None):
            raise ValueError(f"WIMSE trust anchor {self.trust_domain}: give exactly one of jwks_file and jwks_url")
        if self.jwks_url is not None and not self.jwks_url.startswith("https://"):
            raise ValueError(f"WIMSE trust anchor {self.trust_domain}: jwks_url must be https")
        return self


class WimseSettings(BaseModel):
    """``[wimse]``: trust anchors per trust domain and lifetime caps."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    trust_anchors: list[WimseTrustAnchor] = Field(description="One entry per trust domain whose WITs are accepted.")
    max_wit_lifetime: int = Field(86_400, ge=60, le=7 * 86_400, description="Longest WIT lifetime accepted (s).")
    max_proof_lifetime: int = Field(300, ge=10, le=3600, description="Longest WPT lifetime accepted (s).")

    @field_validator("trust_anchors")
    @classmethod
    def _distinct(cls, value: list[WimseTrustAnchor]) -> list[WimseTrustAnchor]:
        if not value:
            raise ValueError("wimse.trust_anchors needs at least one trust domain")
        domains = [anchor.trust_domain for anchor in value]
        if len(set(domains)) != len(domains):
            raise ValueError("a trust domain is listed twice in wimse.trust_anchors")
        return value


_EC_ALGS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}


def _as_pyjwk(key: VerificationKey, alg: str) -> jwt.PyJWK | None:
    """``key`` as a PyJWK bound to ``alg``, or ``None`` when it cannot verify ``alg``."""
    try:
        key.check_algorithm(alg)
    except AttestationError:
        return None
    public: Any = key.key
    if key.kty == "EC":
        data: dict[str, Any] = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
    elif key.kty == "OKP":
        data = jwt.algorithms.OKPAlgorithm.to_jwk(public, as_dict=True)
    else:
        data = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
    if key.kid is not None:
        data = {**data, "kid": key.kid}
    return jwt.PyJWK(data, algorithm=alg)


class WimseMethod:
    """WIT + WPT pairs of configured trust domains (see the module docstring).

    The instance in the registry refuses every request ("not configured"); the runtime builds a
    configured one with :meth:`configured`.
    """

    name = "wimse"
    evidence_types = frozenset({WIT_TOKEN_TYPE})

    def __init__(
        self,
        sources: Mapping[str, JwksSource] | None = None,
        store: StateStore | None = None,
        clock: Clock | None = None,
        *,
        token_endpoint: str = "",
        max_wit_lifetime: int = 86_400,
        max_proof_lifetime: int = 300,
    ) -> None:
        self._sources = dict(sources or {})
        self._store = store
        self._clock = clock
        self._audience = token_endpoint
        self._max_wit_lifetime = max_wit_lifetime
        self._max_proof_lifetime = max_proof_lifetime

    @classmethod
    def configured(cls, settings: WimseSettings, store: StateStore, clock: Clock, token_endpoint: str) -> WimseMethod:
        """A method over ``settings``' trust anchors; ``token_endpoint`` is the WPT's required ``aud``."""
        sources = {
            anchor.trust_domain: JwksSource(jwks_file=anchor.jwks_file, jwks_url=anchor.jwks_url, clock=clock)
            for anchor in settings.trust_anchors
        }
        return cls(sources, store, clock, token_endpoint=token_endpoint,
                   max_wit_lifetime=settings.max_wit_lifetime, max_proof_lifetime=settings.max_proof_lifetime)

    def close(self) -> None:
        """Release the key sources' HTTP clients."""
        for source in self._sources.values():
            source.close()

    async def _anchors(self, token: str) -> dict[str, Sequence[jwt.PyJWK]]:
        """The keys of the trust domain the WIT names, for the algorithm its header names."""
        # The peek only chooses which keys to load; verify_wit checks the token itself.
        try:
            header_b64, claims_b64 = token.split(".")[:2]
            _unverified_header = json.loads(jwt.utils.base64url_decode(header_b64))
            _unverified_claims = json.loads(jwt.utils.base64url_decode(claims_b64))
            _unverified_sub = str(_unverified_claims.get("sub", ""))
            alg = str(_unverified_header.get("alg", ""))
        except (ValueError, AttributeError, TypeError):
            return {}  # verify_wit names what is wrong with the token
        scheme, _, rest = _unverified_sub.partition("://")
        source = self._sources.get(rest.partition("/")[0]) if scheme in ("spiffe", "wimse") else None
        if source is None:
            return {}
        keys = await source.keys_async()  # single-flight, on the trust domain's own fetch thread
        usable = [k for k in (_as_pyjwk(key, alg) for key in keys) if k is not None]
        return {rest.partition("/")[0]: usable}

    async def verify(self, evidence: Evidence, token: VerifiedJwt | None = None) -> WorkloadIdentity:
        """The identity a WIT proves, with a WPT made for it and for this token request."""
        if self._store is None or self._clock is None or not self._sources:
            raise AttestationError("WIMSE attestation is not configured on this broker ([wimse] trust_anchors)")
        wit_token = evidence.token
        if not wit_token:
            raise AttestationError(f"{evidence.label} must be a workload identity token")
        now = self._clock.now()
        # (1) The WIT: signature by its trust domain's keys, times, key binding.
        wit = verify_wit(wit_token, await self._anchors(wit_token), now=now, max_lifetime=self._max_wit_lifetime)
        # (2) Its subject must be a workload the registry can name.
        if not wit.workload_id.startswith("spiffe://"):
            raise AttestationError(
                "the WIT's workload identifier must be a spiffe:// ID (the registry names SPIFFE IDs)"
            )
        spiffe_id = parse_spiffe_id(wit.workload_id)
        # (3) The proof: exactly one header field value, for this WIT, for this broker's token endpoint.
        raw = evidence.headers.get(WPT_HEADER)
        if raw is None:
            raise AttestationError("the Workload-Proof-Token header is missing (a WIT is never a bearer token)")
        proof = verify_wpt(
            [value.strip() for value in raw.split(",")], wit, audience=self._audience, now=now,
            leeway=_PROOF_LEEWAY, max_lifetime=self._max_proof_lifetime,
        )
        # (4) Single use of the proof, for as long as it could be accepted.
        if not await self._store.consume_once(WPT_JTI_NAMESPACE, f"{wit.trust_domain}\x00{proof.jti}",
                                        proof.expires_at + _PROOF_LEEWAY):
            raise ReplayDetected("the Workload-Proof-Token has already been used")
        return WorkloadIdentity(
            spiffe_id=str(spiffe_id),
            issuer=wit.issuer or f"spiffe://{wit.trust_domain}",
            method=self.name,
            subject=wit.workload_id,
            evidence_digest=wit.evidence_digest,
            expires_at=wit.expires_at,
            jti=wit.jti,
        )


register(WimseMethod())
