"""Workload attestation: a subject token in, a :class:`~broker.models.WorkloadIdentity` out, or an error.

:meth:`Attestor.verify` is the only way the broker obtains a ``WorkloadIdentity``. It runs the
numbered steps below in order and raises at the first failure:

- :class:`~broker.errors.InvalidRequest` for an unsupported ``subject_token_type`` (RFC 8693 §2.2.2);
- :class:`~broker.errors.AttestationError` (``invalid_grant``) for every token that does not prove an
  identity, with a precise description that never contains the token;
- :class:`~broker.errors.ReplayDetected` for a single-use token presented again;
- :class:`~broker.errors.TemporarilyUnavailable` when the issuer's keys or the replay store cannot be
  reached (fail closed: 503, never an allow).

The token is parsed once, strictly (no duplicate names, canonical base64url), and the signature is
checked with the allow-listed algorithm over exactly those bytes
(:func:`~broker.attest.jwt_checks.verify_signature`: pyjwt's implementation, or for ES256 the same
cryptography calls made directly); ``iss``, ``aud``, required claims, claim types,
time (against the injected :class:`~broker.clock.Clock`), lifetime, ``typ`` and size are checked
here, inside the same private function, so no caller can skip them (DESIGN "Library notes").
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from broker.attest.cnf import identity_key_thumbprint
from broker.attest.issuers import IssuerConfig
from broker.attest.jwks import JwksSource
from broker.attest.jwt_checks import (
    check_header,
    check_shape,
    check_times,
    peek_unverified,
    verify_claims,
    verify_signature,
)
from broker.attest.methods import REGISTRY
from broker.attest.methods.base import AttestationMethod, TokenMethod, VerifiedJwt
from broker.attest.template import SpiffeIdTemplate
from broker.clock import Clock
from broker.cpu_batch import TurnBatch
from broker.errors import AttestationError, ConfigError, InvalidRequest, ReplayDetected
from broker.models import WorkloadIdentity
from broker.state.store import ConsumeOnce, StateStore

__all__ = ["JTI_NAMESPACE", "SUBJECT_TOKEN_TYPES", "Attestor"]

logger = logging.getLogger(__name__)

SUBJECT_TOKEN_TYPES = frozenset(
    {"urn:ietf:params:oauth:token-type:jwt", "urn:ietf:params:oauth:token-type:id_token"}
)
#: The replay-store namespace of identity token ``jti`` values.
JTI_NAMESPACE = "identity-jti"

_DEFAULT_MAX_TOKEN_BYTES = 8192
_JTI_RE = re.compile(r"[\x21-\x7e]{1,256}")


@dataclass(frozen=True, slots=True)
class _Issuer:
    config: IssuerConfig
    keys: JwksSource
    template: SpiffeIdTemplate | None


class Attestor:
    """Verifies subject tokens from a fixed allow-list of issuers.

    ``replay`` records single-use ``jti`` values; ``clock`` is the only source of time;
    ``jwks_sources`` maps an issuer string to its key source (required for ``dev`` issuers without a
    JWKS location; otherwise built from the config). Sources built here are closed by :meth:`close`.
    """

    def __init__(
        self,
        issuers: Sequence[IssuerConfig],
        replay: StateStore,
        clock: Clock,
        *,
        max_token_bytes: int = _DEFAULT_MAX_TOKEN_BYTES,
        jwks_sources: Mapping[str, JwksSource] | None = None,
        request_methods: Sequence[AttestationMethod] = (),
    ) -> None:
        if not 1024 <= max_token_bytes <= 65536:
            raise ConfigError("max_token_bytes must be 1024..65536")
        given = dict(jwks_sources or {})
        self._owned: list[JwksSource] = []
        self._issuers: dict[str, _Issuer] = {}
        for config in issuers:
            if config.issuer in self._issuers:
                raise ConfigError(f"issuer {config.issuer!r} is configured twice")
            source = given.pop(config.issuer, None)
            if source is None:
                source = JwksSource.for_issuer(config, clock)
                self._owned.append(source)
            if config.kind == "dev":
                logger.warning(
                    "dev issuer %r is trusted: for trials only, never in production", config.issuer
                )
            self._issuers[config.issuer] = _Issuer(config, source, config.compiled_template())
        if given:
            raise ConfigError(f"JWKS sources given for unconfigured issuers: {sorted(given)!r}")
        self._replay = replay
        self._clock = clock
        self._max_token_bytes = max_token_bytes
        # Request methods configured for this broker; the registry's own instances refuse as unconfigured.
        self._request_methods = {method.name: method for method in request_methods}
        # The signature checks of the requests that reach step (7) in one event-loop turn run back to back.
        self._signatures = TurnBatch()

    def request_method(self, token_type: str | None) -> AttestationMethod | None:
        """The request method (X.509-SVID, WIMSE) a token type selects, ``None`` for a JWT.

        The method verifies the whole :class:`~broker.attest.evidence.Evidence` of the request itself.
        """
        method = REGISTRY.for_evidence_type(token_type)
        if method is None:
            return None
        return self._request_methods.get(method.name, method)

    def close(self) -> None:
        """Release the HTTP clients of the key sources this attestor built."""
        for source in self._owned:
            source.close()
        for method in self._request_methods.values():
            close = getattr(method, "close", None)
            if close is not None:
                close()

    async def verify(
        self, subject_token: str, subject_token_type: str, *, label: str = "subject_token"
    ) -> WorkloadIdentity:
        """Verify ``subject_token`` and return the workload identity it proves (see module docstring).

        ``label`` names the token in error descriptions: ``actor_token`` when the workload's identity
        is the actor of a delegated exchange (RFC 8693 §2.1).
        """
        identity, single_use = await self.verify_signed(subject_token, subject_token_type, label=label)
        if single_use is not None and not await self._replay.consume_once(
            single_use.namespace, single_use.key, single_use.expires_at
        ):
            raise ReplayDetected(f"{label} has already been used")
        return identity

    async def verify_signed(
        self, subject_token: str, subject_token_type: str, *, label: str = "subject_token"
    ) -> tuple[WorkloadIdentity, ConsumeOnce | None]:
        """Steps (1)-(11) except consuming the ``jti``: the identity and its single-use check.

        The caller MUST apply the returned check before it acts on the identity and raise
        :class:`~broker.errors.ReplayDetected` if it fails: the token path folds it into its one
        state-store round trip (:meth:`~broker.state.guard.IssuanceGuard.admit`); :meth:`verify`
        applies it at once.
        """
        # (1) Only JWT-shaped subject tokens are supported (RFC 8693 §3 type URIs).
        if subject_token_type not in SUBJECT_TOKEN_TYPES:
            raise InvalidRequest(
                f"unsupported {label}_type: use urn:ietf:params:oauth:token-type:jwt or "
                "urn:ietf:params:oauth:token-type:id_token"
            )
        if not isinstance(subject_token, str):
            raise InvalidRequest(f"{label} must be a string")

        # (2) Size cap before any decoding; (3) compact JWS: three unpadded base64url parts, nothing else.
        check_shape(subject_token, self._max_token_bytes, label)

        # (4) Peek at header and claims (strict JSON, no duplicate names) to choose issuer and key.
        _unverified_header, _unverified_claims = peek_unverified(subject_token, label)
        alg = check_header(_unverified_header, label)

        # (5) The issuer must be on the allow-list, and allow this algorithm.
        unverified_iss = _unverified_claims.get("iss")
        if unverified_iss is None:
            raise AttestationError("missing required claim 'iss'")
        if not isinstance(unverified_iss, str):
            raise AttestationError("claim 'iss' must be a string")
        issuer = self._issuers.get(unverified_iss)
        if issuer is None:
            raise AttestationError("unknown issuer")
        cfg = issuer.config
        if alg not in cfg.algorithms:
            raise AttestationError(f"algorithm {alg} is not allowed for this issuer")

        # (6) The issuer's key named by kid (a one-key JWKS may be used without kid), fit for alg.
        key = await issuer.keys.get_key_async(_unverified_header.get("kid"))
        key.check_algorithm(alg)

        # (7)+(8) Signature, iss, aud, required claims; then types, time and lifetime.
        claims = await self._decode(subject_token, _unverified_claims, key.key, alg, cfg, label)
        exp = claims["exp"]

        # (9) A key the identity token is bound to (RFC 7800 cnf): rules may demand DPoP with it.
        cnf_jkt = None
        if "cnf" in claims:
            try:
                cnf_jkt = identity_key_thumbprint(claims["cnf"])
            except ValueError as exc:
                raise AttestationError(str(exc)) from None

        # (10) The method the issuer's kind names (broker.attest.methods) decides the SPIFFE ID; the
        # identity carries a digest of the evidence, never the token itself.
        jti = claims.get("jti")
        if jti is not None and (not isinstance(jti, str) or _JTI_RE.fullmatch(jti) is None):
            raise AttestationError("claim 'jti' must be 1..256 printable ASCII characters")
        digest = "sha256:" + hashlib.sha256(subject_token.encode("ascii")).hexdigest()
        verified = VerifiedJwt(config=cfg, claims=claims, evidence_digest=digest, template=issuer.template,
                               cnf_jkt=cnf_jkt)
        method = REGISTRY.get(cfg.kind)
        if not isinstance(method, TokenMethod):
            raise AttestationError(f"issuer kind {cfg.kind} is not a token attestation method")
        identity = method.identity(verified)

        # (11) Single use: the jti is consumed last (by the caller), so a token refused above is not burnt.
        if jti is None and cfg.require_jti:
            raise AttestationError("missing required claim 'jti'")
        # Remember it for as long as the token could still be accepted (exp + leeway).
        single_use = ConsumeOnce(JTI_NAMESPACE, f"{cfg.issuer}\x00{jti}", exp + cfg.leeway) if cfg.require_jti else None
        return identity, single_use

    async def _decode(
        self, token: str, _unverified_claims: dict[str, Any], key: Any, alg: str, cfg: IssuerConfig, label: str
    ) -> dict[str, Any]:
        # (7) The signature with the one allow-listed alg over the exact bytes the claims were strictly
        # parsed from (pyjwt's algorithm, not a second parse), then exact iss, our aud, required claims.
        # Run in this turn's batch of signature checks (broker.cpu_batch): same call, same errors.
        await self._signatures.run(verify_signature, token, key, alg, label)
        claims = _unverified_claims  # verified from here on
        verify_claims(claims, issuer=cfg.issuer, audience=cfg.audience, required=("iss", "aud", "exp", "sub"))

        # (8) Types and time, against the injected clock.
        if not claims["sub"]:
            raise AttestationError("claim 'sub' is empty")
        check_times(claims, now=self._clock.now(), leeway=cfg.leeway, max_lifetime=cfg.max_lifetime, label=label)
        return claims
