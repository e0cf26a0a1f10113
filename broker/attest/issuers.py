"""Trusted identity issuers: one :class:`IssuerConfig` per issuer the broker accepts subject tokens from.

The set of configs is an allow-list: a token whose ``iss`` matches none of them is refused. Each
config pins what a token from that issuer must look like (audience, algorithms, key source, lifetime)
and how its subject maps to a SPIFFE ID (``kind``).
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from broker.attest.spiffe import validate_trust_domain
from broker.attest.template import SpiffeIdTemplate, TemplateError

__all__ = [
    "ALLOWED_ALGORITHMS",
    "DEFAULT_ALGORITHMS",
    "IssuerConfig",
    "IssuerKind",
    "check_algorithms",
    "check_jwks_url",
    "check_printable",
    "is_loopback_host",
]

IssuerKind = Literal["kubernetes", "spiffe-jwt", "oidc", "dev"]

#: Asymmetric JWS algorithms the broker can accept at all (RFC 7518 §3.1, RFC 8037). Symmetric (HS*)
#: algorithms are never allowed: the verifier holds only public keys, and an HMAC "key" taken from a
#: JWKS is public by definition. ``none`` is never allowed.
ALLOWED_ALGORITHMS: frozenset[str] = frozenset(
    {"ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA"}
)
DEFAULT_ALGORITHMS: tuple[str, ...] = ("ES256", "RS256", "EdDSA", "PS256")

_NO_CONTROL_RE = re.compile(r"[^\x00-\x20\x7f]{1,2048}")


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_printable(value: str) -> str:
    """An issuer or audience: 1..2048 characters without spaces or control characters."""
    if _NO_CONTROL_RE.fullmatch(value) is None:
        raise ValueError("must be 1..2048 characters without spaces or control characters")
    return value


def check_jwks_url(value: str | None) -> str | None:
    """A JWKS location: ``https://``, or ``http://`` to a loopback address; no userinfo or fragment."""
    if value is None:
        return value
    if _NO_CONTROL_RE.fullmatch(value) is None:
        raise ValueError("jwks_url must not contain spaces or control characters")
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http"):
        raise ValueError("jwks_url must use https")
    if parts.username is not None or parts.password is not None:
        raise ValueError("jwks_url must not contain userinfo")
    if parts.fragment:
        raise ValueError("jwks_url must not contain a fragment")
    host = parts.hostname or ""
    if not host:
        raise ValueError("jwks_url has no host")
    if parts.scheme == "http" and not is_loopback_host(host):
        raise ValueError("jwks_url must use https (plain http is allowed only to a loopback address)")
    return value


def check_algorithms(value: tuple[str, ...]) -> tuple[str, ...]:
    """A per-issuer algorithm allow-list: a non-empty subset of :data:`ALLOWED_ALGORITHMS`."""
    if not value:
        raise ValueError("algorithms must not be empty")
    for alg in value:
        if alg.lower() == "none":
            raise ValueError("algorithm 'none' is never allowed")
        if alg.upper().startswith("HS"):
            raise ValueError(f"symmetric algorithm {alg} is never allowed")
        if alg not in ALLOWED_ALGORITHMS:
            raise ValueError(f"algorithm {alg} is not supported (allowed: {sorted(ALLOWED_ALGORITHMS)})")
    if len(set(value)) != len(value):
        raise ValueError("algorithms contains duplicates")
    return value


class IssuerConfig(BaseModel):
    """One trusted issuer of workload identity tokens.

    - ``issuer``: the exact ``iss`` value (compared byte for byte).
    - ``kind``: how the token's subject becomes a SPIFFE ID (``kubernetes``: from the
      ``kubernetes.io`` claim; ``spiffe-jwt``: ``sub`` is a JWT-SVID SPIFFE ID; ``oidc``: through
      ``spiffe_id_template``; ``dev``: the trial-only local issuer, like ``spiffe-jwt``).
    - ``audience``: the broker's own audience; the token's ``aud`` must contain it.
    - ``jwks_file`` / ``jwks_url``: exactly one, where the issuer's public keys are (``https://``, or
      ``http://`` to a loopback address only). A ``dev`` issuer may have neither: its keys are then
      handed to the attestor in memory.
    - ``algorithms``: the allow-list for this issuer, a subset of :data:`ALLOWED_ALGORITHMS`.
    - ``trust_domain``: required for ``kubernetes`` and ``spiffe-jwt``; for ``spiffe-jwt`` and
      ``dev`` the SVID's trust domain must equal it (``dev`` without one accepts any trust domain);
      for ``oidc`` it must equal the template's trust domain when given.
    - ``spiffe_id_template``: ``oidc`` only, e.g. ``spiffe://example.org/oidc/{sub}``; see
      :mod:`broker.attest.template`.
    - ``max_lifetime``: longest accepted token lifetime in seconds (``exp - iat``, and ``exp - now``).
    - ``require_jti``: the token must carry a ``jti`` and is single-use. When false, ``jti`` is not
      required and tokens are *not* single-use (use for issuers whose tokens are reused by design).
    - ``leeway``: clock skew tolerated on ``exp``/``nbf``/``iat``, in seconds.
    - ``jwks_refresh_min_interval``: at most one key fetch per this many seconds, however many
      unknown ``kid`` values arrive. ``jwks_cache_ttl``: how long fetched keys are trusted.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    issuer: str = Field(description="The exact `iss` of its tokens (compared byte for byte).")
    kind: IssuerKind = Field(description="How a subject becomes a SPIFFE ID: kubernetes, spiffe-jwt, oidc, dev.")
    audience: str = Field(description="The broker's audience; the token's `aud` must contain it.")
    jwks_file: Path | None = Field(None, description="A file with the issuer's JWKS (or jwks_url, not both).")
    jwks_url: str | None = Field(None, description="The issuer's JWKS URL: https, or http to loopback only.")
    algorithms: tuple[str, ...] = Field(DEFAULT_ALGORITHMS, description="Allowed JWS algorithms (asymmetric only).")
    trust_domain: str | None = Field(
        None, description="Trust domain of the SPIFFE IDs; required for kubernetes and spiffe-jwt."
    )
    spiffe_id_template: str | None = Field(None, description="oidc only: e.g. spiffe://example.org/oidc/{sub}.")
    max_lifetime: int = Field(default=3600, ge=1, le=86400, description="Longest accepted token lifetime, seconds.")
    require_jti: bool = Field(True, description="Tokens must carry a `jti` and are single-use.")
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
    def _allowed_algorithms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return check_algorithms(value)

    @field_validator("trust_domain")
    @classmethod
    def _trust_domain(cls, value: str | None) -> str | None:
        return None if value is None else validate_trust_domain(value)

    @model_validator(mode="after")
    def _consistent(self) -> IssuerConfig:
        if self.jwks_file is not None and self.jwks_url is not None:
            raise ValueError("set exactly one of jwks_file and jwks_url, not both")
        if self.jwks_file is None and self.jwks_url is None and self.kind != "dev":
            raise ValueError(f"a {self.kind} issuer needs jwks_file or jwks_url")
        if self.kind in ("kubernetes", "spiffe-jwt") and self.trust_domain is None:
            raise ValueError(f"a {self.kind} issuer needs trust_domain")
        if self.kind == "oidc":
            if self.spiffe_id_template is None:
                raise ValueError("an oidc issuer needs spiffe_id_template")
            try:
                template = SpiffeIdTemplate.compile(self.spiffe_id_template)
            except TemplateError as exc:
                raise ValueError(f"spiffe_id_template: {exc}") from None
            if self.trust_domain is not None and template.trust_domain != self.trust_domain:
                raise ValueError("spiffe_id_template's trust domain differs from trust_domain")
        elif self.spiffe_id_template is not None:
            raise ValueError("spiffe_id_template is only for oidc issuers")
        if self.jwks_refresh_min_interval > self.jwks_cache_ttl:
            raise ValueError("jwks_refresh_min_interval must not exceed jwks_cache_ttl")
        return self

    def compiled_template(self) -> SpiffeIdTemplate | None:
        """The compiled SPIFFE ID template (``oidc`` only)."""
        if self.spiffe_id_template is None:
            return None
        return SpiffeIdTemplate.compile(self.spiffe_id_template)
