"""End-user tokens of a delegated exchange: a user token in, a verified :class:`~broker.models.EndUser` out.

RFC 8693 §2.1: when a token request carries an ``actor_token`` (the workload's identity), its
``subject_token`` names the party the workload acts for. The broker accepts an end user there only
from an issuer configured in ``[[user_issuers]]`` (an allow-list, like ``[[trust]]`` for workloads),
and verifies the token with exactly the hardening workload identities get
(:mod:`broker.attest.jwt_checks`): size cap, compact JWS, strict JSON, algorithm allow-list, no
self-keying header, a ``typ`` allow-list, audience, integer times against the injected clock, a
lifetime cap, and single use of a token that carries a ``jti`` (unless the issuer is configured with
``single_use = false``, for session tokens that are reused by design).

:meth:`UserTokenVerifier.verify` is the only way the broker obtains an ``EndUser``; it raises
:class:`~broker.errors.AttestationError` (``invalid_grant``), :class:`~broker.errors.ReplayDetected`,
:class:`~broker.errors.InvalidRequest` (a token type the issuer does not accept) or
:class:`~broker.errors.TemporarilyUnavailable` (keys or replay store unreachable).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jwt
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from broker.attest.issuers import DEFAULT_ALGORITHMS, check_algorithms, check_jwks_url, check_printable
from broker.attest.jwks import JwksSource
from broker.attest.jwt_checks import (
    ACCEPTED_JWT_TYP,
    check_header,
    check_shape,
    check_times,
    peek_unverified,
    printable,
    pyjwt_errors,
)
from broker.clock import Clock
from broker.errors import AttestationError, ConfigError, InvalidRequest, ReplayDetected
from broker.models import EndUser
from broker.state.store import StateStore

__all__ = ["USER_JTI_NAMESPACE", "USER_TOKEN_TYPES", "UserIssuerConfig", "UserTokenVerifier"]

#: The replay-store namespace of user token ``jti`` values (apart from workload identities').
USER_JTI_NAMESPACE = "user-jti"
#: RFC 8693 §3 token type URIs a user token may be presented as.
USER_TOKEN_TYPES = (
    "urn:ietf:params:oauth:token-type:id_token",
    "urn:ietf:params:oauth:token-type:jwt",
    "urn:ietf:params:oauth:token-type:access_token",
)
_TERM_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_CLAIM_NAME_RE = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")
# A user subject goes into task tokens and the ledger: printable, no spaces or controls, bounded.
_SUBJECT_RE = re.compile(r"[\x21-\x7e]{1,255}")
_JTI_RE = re.compile(r"[\x21-\x7e]{1,256}")
_MAX_TERM_STRING = 256
_RESERVED_TERMS = frozenset({"sub", "iss"})
#: RFC 9068 access tokens (at+jwt) are user tokens too; RFC 7519 JWT and OIDC ID tokens have JWT or none.
_DEFAULT_TYP = (*sorted(ACCEPTED_JWT_TYP), "at+jwt", "application/at+jwt")


class UserIssuerConfig(BaseModel):
    """One trusted issuer of end-user tokens (``[[user_issuers]]``).

    - ``issuer``: the exact ``iss`` (byte for byte); never the broker itself, never a workload issuer.
    - ``audience``: the ``aud`` the user token must contain (the broker, or the assistant's client id
      at that issuer).
    - ``jwks_file`` / ``jwks_url``: exactly one (``kind = "dev"``, the trial issuer, has neither).
    - ``algorithms``: the allow-list for this issuer. ``token_types``: the ``subject_token_type``
      URIs accepted. ``typ``: accepted JOSE ``typ`` headers (a missing ``typ`` is accepted).
    - ``claims``: policy term -> claim name, e.g. ``{ tenant = "tid" }`` gives conditions
      ``user.tenant``. Only string, number and boolean claims map; ``sub`` and ``iss`` are always there.
    - ``max_lifetime``: longest accepted lifetime (``exp - iat`` and ``exp - now``), seconds.
    - ``single_use``: a token carrying a ``jti`` is accepted once (default). ``require_jti``: refuse
      tokens without one.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    issuer: str = Field(description="The exact `iss` (never the broker itself, never a workload issuer).")
    audience: str = Field(description="The `aud` the user token must contain.")
    kind: Literal["oidc", "dev"] = Field("oidc", description="oidc, or dev (the trial end-user issuer).")
    jwks_file: Path | None = Field(None, description="A file with the issuer's JWKS (or jwks_url, not both).")
    jwks_url: str | None = Field(None, description="The issuer's JWKS URL: https, or http to loopback only.")
    algorithms: tuple[str, ...] = Field(DEFAULT_ALGORITHMS, description="Allowed JWS algorithms (asymmetric only).")
    token_types: tuple[str, ...] = Field(USER_TOKEN_TYPES[:2], description="Accepted `subject_token_type` URIs.")
    typ: tuple[str, ...] = Field(_DEFAULT_TYP, description="Accepted JOSE `typ` headers (a missing `typ` is accepted).")
    claims: dict[str, str] = Field(
        default_factory=dict, description="Policy term -> claim name, e.g. { tenant = \"tid\" } gives user.tenant."
    )
    max_lifetime: int = Field(default=3600, ge=1, le=86400, description="Longest accepted token lifetime, seconds.")
    single_use: bool = Field(True, description="A token carrying a `jti` is accepted once.")
    require_jti: bool = Field(False, description="Refuse tokens without a `jti`.")
    leeway: int = Field(default=30, ge=0, le=300, description="Clock skew tolerated on exp/nbf/iat, seconds.")
    jwks_refresh_min_interval: float = Field(
        default=30.0, gt=0, le=3600, description="At most one key fetch per this many seconds."
    )
    jwks_cache_ttl: float = Field(default=300.0, gt=0, le=86400, description="How long fetched keys are trusted (s).")
    jwks_timeout: float = Field(
        default=5.0, gt=0, le=60,
        description="Seconds a JWKS fetch may take in all; requests waiting for it then fail with 503.",
    )

    @field_validator("issuer", "audience")
    @classmethod
    def _printable(cls, value: str) -> str:
        return check_printable(value)

    @field_validator("jwks_url")
    @classmethod
    def _safe_url(cls, value: str | None) -> str | None:
        return check_jwks_url(value)

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return check_algorithms(value)

    @field_validator("token_types")
    @classmethod
    def _token_types(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or any(t not in USER_TOKEN_TYPES for t in value):
            raise ValueError(f"token_types must be a non-empty subset of {list(USER_TOKEN_TYPES)}")
        return value

    @field_validator("typ")
    @classmethod
    def _typ(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or any(not _CLAIM_NAME_RE.fullmatch(t) for t in value):
            raise ValueError("typ must list JOSE typ values")
        return tuple(t.lower() for t in value)

    @field_validator("claims")
    @classmethod
    def _claims(cls, value: dict[str, str]) -> dict[str, str]:
        for term, claim in value.items():
            if _TERM_RE.fullmatch(term) is None or term in _RESERVED_TERMS:
                raise ValueError(f"claims: {term!r} must be a lower-case identifier other than sub and iss")
            if _CLAIM_NAME_RE.fullmatch(claim) is None:
                raise ValueError(f"claims: {claim!r} is not a claim name")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> UserIssuerConfig:
        if self.jwks_file is not None and self.jwks_url is not None:
            raise ValueError("set exactly one of jwks_file and jwks_url, not both")
        if self.jwks_file is None and self.jwks_url is None and self.kind != "dev":
            raise ValueError("a user issuer needs jwks_file or jwks_url")
        if self.jwks_refresh_min_interval > self.jwks_cache_ttl:
            raise ValueError("jwks_refresh_min_interval must not exceed jwks_cache_ttl")
        return self

    def key_source(self, clock: Clock) -> JwksSource:
        """The key source this config names, with its cache settings."""
        if self.jwks_url is None and self.jwks_file is None:
            raise ConfigError(f"user issuer {self.issuer!r} has no JWKS; pass its keys to the verifier")
        return JwksSource(
            jwks_url=self.jwks_url, jwks_file=self.jwks_file, clock=clock,
            cache_ttl=self.jwks_cache_ttl, refresh_min_interval=self.jwks_refresh_min_interval,
            timeout=self.jwks_timeout,
        )


@dataclass(frozen=True, slots=True)
class _UserIssuer:
    config: UserIssuerConfig
    keys: JwksSource


def _term_value(value: Any, term: str, claim: str) -> str | int | float | bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and math.isfinite(value):
        return value
    if isinstance(value, str) and len(value) <= _MAX_TERM_STRING and value.isprintable():
        return value
    raise AttestationError(
        f"claim '{printable(claim)}' (user.{term}) must be a string of at most {_MAX_TERM_STRING} "
        "printable characters, a number or a boolean"
    )


class UserTokenVerifier:
    """Verifies end-user tokens from a fixed allow-list of user issuers (see the module docstring).

    ``key_sources`` maps an issuer to its keys (required for ``dev`` issuers; otherwise built from
    the config and closed by :meth:`close`).
    """

    def __init__(
        self,
        issuers: Sequence[UserIssuerConfig],
        replay: StateStore,
        clock: Clock,
        *,
        max_token_bytes: int = 8192,
        key_sources: Mapping[str, JwksSource] | None = None,
    ) -> None:
        given = dict(key_sources or {})
        self._owned: list[JwksSource] = []
        self._issuers: dict[str, _UserIssuer] = {}
        for config in issuers:
            if config.issuer in self._issuers:
                raise ConfigError(f"user issuer {config.issuer!r} is configured twice")
            source = given.pop(config.issuer, None)
            if source is None:
                source = config.key_source(clock)
                self._owned.append(source)
            self._issuers[config.issuer] = _UserIssuer(config, source)
        if given:
            raise ConfigError(f"key sources given for unconfigured user issuers: {sorted(given)!r}")
        self._replay = replay
        self._clock = clock
        self._max_token_bytes = max_token_bytes

    @property
    def issuers(self) -> tuple[str, ...]:
        """The configured user issuers, in configuration order."""
        return tuple(self._issuers)

    def knows(self, issuer: str) -> bool:
        """True if ``issuer`` is a configured user issuer."""
        return issuer in self._issuers

    def close(self) -> None:
        """Release the HTTP clients of the key sources this verifier built."""
        for source in self._owned:
            source.close()

    async def verify(self, subject_token: str, subject_token_type: str) -> EndUser:
        """Verify an end user's ``subject_token`` and return the user it proves.

        Never blocks the event loop: issuer keys and the replay store are awaited.
        """
        label = "subject_token"
        # (1) Size cap, then compact JWS shape.
        check_shape(subject_token, self._max_token_bytes, label)
        # (2) Peek (strict JSON) to choose the issuer; the header's alg must be allow-listed.
        _unverified_header, _unverified_claims = peek_unverified(subject_token, label)
        unverified_iss = _unverified_claims.get("iss")
        if not isinstance(unverified_iss, str):
            raise AttestationError("missing required claim 'iss'" if unverified_iss is None
                                   else "claim 'iss' must be a string")
        issuer = self._issuers.get(unverified_iss)
        if issuer is None:
            raise AttestationError("unknown user issuer")
        cfg = issuer.config
        # (3) The token type must be one this issuer's tokens are presented as.
        if subject_token_type not in cfg.token_types:
            raise InvalidRequest(
                f"subject_token_type must be one of {', '.join(cfg.token_types)} for this user issuer"
            )
        # (4) Header: algorithm allow-lists (global and the issuer's), typ allow-list, no self-keying.
        alg = check_header(_unverified_header, label, accepted_typ=cfg.typ)
        if alg not in cfg.algorithms:
            raise AttestationError(f"algorithm {alg} is not allowed for this issuer")
        key = await issuer.keys.get_key_async(_unverified_header.get("kid"))
        key.check_algorithm(alg)
        # (5) Signature, iss, aud, required claims in one call; time against the injected clock.
        with pyjwt_errors(label):
            claims: dict[str, Any] = jwt.decode(
                subject_token, key=key.key, algorithms=[alg], audience=cfg.audience, issuer=cfg.issuer,
                options={
                    "verify_signature": True, "verify_aud": True, "verify_iss": True, "verify_sub": True,
                    "verify_jti": True, "verify_exp": False, "verify_nbf": False, "verify_iat": False,
                    "require": ["iss", "aud", "exp", "sub"], "strict_aud": False,
                    "enforce_minimum_key_length": True,
                },
            )
        exp = check_times(claims, now=self._clock.now(), leeway=cfg.leeway, max_lifetime=cfg.max_lifetime,
                          label=label)
        sub = claims["sub"]
        if _SUBJECT_RE.fullmatch(sub) is None:
            raise AttestationError("claim 'sub' must be 1..255 printable ASCII characters without spaces")
        # (6) Mapped claims become policy terms (user.<term>); a claim of another shape is refused.
        terms = {
            term: _term_value(claims[claim], term, claim) for term, claim in cfg.claims.items() if claim in claims
        }
        # (7) Single use of a token that carries a jti; consumed last, so a refused token is not burnt.
        jti = claims.get("jti")
        if jti is None:
            if cfg.require_jti:
                raise AttestationError("missing required claim 'jti'")
        elif not isinstance(jti, str) or _JTI_RE.fullmatch(jti) is None:
            raise AttestationError("claim 'jti' must be 1..256 printable ASCII characters")
        elif cfg.single_use and not await self._replay.consume_once(
            USER_JTI_NAMESPACE, f"{cfg.issuer}\x00{jti}", exp + cfg.leeway
        ):
            raise ReplayDetected("subject_token has already been used")
        digest = hashlib.sha256(subject_token.encode("ascii")).hexdigest()
        return EndUser(issuer=cfg.issuer, subject=sub, claims=terms, evidence_digest=f"sha256:{digest}")
