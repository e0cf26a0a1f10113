"""Resource side: verify a task token (and its DPoP proof) with the broker's JWKS alone.

:meth:`TaskTokenVerifier.verify` is the only way to obtain a :class:`VerifiedTaskToken`. Steps, in order,
each raising a :class:`~nhi_broker_client.TokenVerificationError` subclass:

1. size cap, compact JWS, strict JSON header and payload (duplicate names refused);
2. header: ``typ`` ``at+jwt`` (RFC 9068), ``alg`` on the allow-list, a ``kid``, no other key references;
3. the broker key for ``kid`` (JWKS cached; refetched on an unknown ``kid``);
4. signature, ``iss``, ``aud`` and required claims in one pyjwt call;
5. claim types and time against the injected clock: ``exp``/``nbf``/``iat`` with a small leeway, a
   lifetime cap, one ``intent`` in ``authorization_details``;
6. sender constraint: a token with ``cnf.jkt`` needs the ``DPoP`` scheme and a proof for this request,
   made with that key, carrying ``ath`` (RFC 9449 §7); an unbound token is refused when DPoP is required;
   a token with ``cnf.x5t#S256`` (RFC 8705 §3) needs the client certificate of this request (from
   mutual TLS or the proxy that terminated it), whose SHA-256 thumbprint must be the bound one;
7. optional introspection (revocation, single use), last.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import httpx
import jwt

from ._dpop import InMemoryReplayCache, ReplayCache, verify_resource_proof
from ._errors import InvalidDPoPError, InvalidTokenError, TokenInactiveError
from ._intent import Intent
from ._jose import COMPACT_JWS_RE, numeric_date, strict_json_segment
from ._jwks import JwksCache

__all__ = ["Introspector", "TaskTokenVerifier", "VerifiedTaskToken"]

_MAX_TOKEN_CHARS = 8192
_ACCEPTED_TYP = frozenset({"at+jwt", "application/at+jwt"})
_REFUSED_HEADER_PARAMS = ("crit", "jku", "x5u", "jwk", "x5c", "b64", "zip", "enc", "cty")
_AUTHORIZATION_RE = re.compile(r"(DPoP|Bearer) ([A-Za-z0-9._~+/-]+=*)", re.IGNORECASE)
_CONSTRUCTION_KEY = object()

#: ``introspect(token) -> bool``: is this verified token still active (not revoked, not yet used)?
Introspector = Callable[["VerifiedTaskToken"], bool]


@dataclass(frozen=True)
class VerifiedTaskToken:
    """A task token that passed every check of :meth:`TaskTokenVerifier.verify` (built only there)."""

    issuer: str
    subject: str
    audience: str
    client_id: str | None
    owner: str | None
    jti: str
    issued_at: int
    expires_at: int
    intent: Intent
    txn: str | None
    cnf_jkt: str | None
    #: RFC 8705 §3.1 thumbprint of the client certificate the token is bound to, if any.
    cnf_x5t_s256: str | None
    claims: Mapping[str, Any] = field(repr=False)
    token: str = field(repr=False)
    _key: object = field(repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if self._key is not _CONSTRUCTION_KEY:
            raise TypeError("VerifiedTaskToken is built by TaskTokenVerifier.verify only")

    def require_intent(self, action: str, resource: str, context: Mapping[str, Any] | None = None) -> None:
        """Raise :class:`~nhi_broker_client.IntentMismatchError` unless the actual request is the granted
        intent (see :meth:`Intent.require_match`)."""
        self.intent.require_match(action, resource, context)


def certificate_thumbprint(certificate: bytes | str) -> str:
    """RFC 8705 §3.1 ``x5t#S256`` of a certificate given as DER bytes or PEM (str or bytes)."""
    if isinstance(certificate, bytes) and certificate.lstrip().startswith(b"-----BEGIN"):
        certificate = certificate.decode("ascii")
    if isinstance(certificate, str):
        try:
            certificate = ssl.PEM_cert_to_DER_cert(certificate.strip() + "\n")
        except ValueError:
            raise InvalidTokenError("the client certificate is not PEM") from None
    digest = hashlib.sha256(certificate).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class TaskTokenVerifier:
    """Verifies task tokens for one resource server (``audience``) issued by one broker (``issuer``).

    ``jwks_url`` defaults to ``<issuer>/.well-known/jwks.json``. ``require_dpop`` refuses unbound
    (bearer) tokens. ``replay_cache`` remembers DPoP proof ``jti`` values (in memory by default; share
    one across replicas). ``introspect`` is called last, for revocation or single use. ``clock``
    returns the time (seconds); ``http_client`` fetches the JWKS (a custom transport, TLS settings).
    """

    def __init__(
        self,
        issuer: str,
        audience: str,
        *,
        jwks_url: str | None = None,
        algorithms: tuple[str, ...] = ("ES256", "EdDSA"),
        dpop_algorithms: tuple[str, ...] = ("ES256", "EdDSA", "ES384", "PS256", "RS256"),
        leeway: float = 30.0,
        max_lifetime: int = 3600,
        require_dpop: bool = False,
        dpop_max_age: float = 60.0,
        replay_cache: ReplayCache | None = None,
        introspect: Introspector | None = None,
        clock: Callable[[], float] = time.time,
        jwks_cache_ttl: float = 300.0,
        jwks_refresh_min_interval: float = 30.0,
        http_client: httpx.Client | None = None,
        unsafe_skip_certificate_binding: bool = False,
    ) -> None:
        if any(a.upper().startswith("HS") or a.lower() == "none" for a in (*algorithms, *dpop_algorithms)):
            raise ValueError("only asymmetric signature algorithms are allowed")
        self.issuer = issuer.rstrip("/")
        self.audience = audience
        self._algorithms = tuple(algorithms)
        self._dpop_algorithms = tuple(dpop_algorithms)
        self._leeway = leeway
        self._max_lifetime = max_lifetime
        self.require_dpop = require_dpop
        # Accepting a certificate-bound token without its certificate makes it a bearer token again.
        self._skip_certificate_binding = unsafe_skip_certificate_binding
        self._dpop_max_age = dpop_max_age
        self._replay: ReplayCache = replay_cache or InMemoryReplayCache(clock)
        self._introspect = introspect
        self._clock = clock
        self._owns_client = http_client is None
        self._http = http_client or httpx.Client(timeout=5.0)
        self._jwks = JwksCache(
            jwks_url or f"{self.issuer}/.well-known/jwks.json",
            self._http,
            algorithms=self._algorithms,
            clock=clock,
            cache_ttl=jwks_cache_ttl,
            refresh_min_interval=jwks_refresh_min_interval,
        )

    def close(self) -> None:
        """Close the HTTP client if this verifier created it."""
        if self._owns_client:
            self._http.close()

    def __enter__(self) -> TaskTokenVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def verify_request(
        self, authorization: str | None, dpop: str | None, method: str, url: str,
        client_certificate: bytes | str | None = None,
    ) -> VerifiedTaskToken:
        """Verify the ``Authorization`` and ``DPoP`` header values of a request ``method url``
        (and its mutual-TLS client certificate, DER or PEM, for a certificate-bound token)."""
        if not authorization:
            raise InvalidTokenError("no Authorization header")
        match = _AUTHORIZATION_RE.fullmatch(authorization)
        if match is None:
            raise InvalidTokenError("Authorization must be 'DPoP <token>' or 'Bearer <token>'")
        return self.verify(match.group(2), scheme=match.group(1), dpop_proof=dpop, method=method, url=url,
                           client_certificate=client_certificate)

    def verify(
        self,
        token: str,
        *,
        scheme: str | None = None,
        dpop_proof: str | None = None,
        method: str | None = None,
        url: str | None = None,
        client_certificate: bytes | str | None = None,
    ) -> VerifiedTaskToken:
        """Verify ``token`` (see the module docstring) and return it, or raise.

        ``scheme`` is the ``Authorization`` scheme it came with (``DPoP`` or ``Bearer``), checked when given;
        ``dpop_proof``, ``method`` and ``url`` are required for a DPoP-bound token; ``client_certificate``
        (the request's mutual-TLS client certificate, DER bytes or PEM) for a certificate-bound one.
        """
        # (1) size and shape, then strict JSON.
        if not isinstance(token, str) or len(token) > _MAX_TOKEN_CHARS or COMPACT_JWS_RE.fullmatch(token) is None:
            raise InvalidTokenError("the token is not a compact JWS of at most 8192 characters")
        try:
            _unverified_header = strict_json_segment(token.split(".", 1)[0])
            strict_json_segment(token.split(".")[1])
        except ValueError:
            raise InvalidTokenError("the token is not valid JSON (or repeats a member)") from None
        # (2) header.
        typ = _unverified_header.get("typ")
        if not isinstance(typ, str) or typ.lower() not in _ACCEPTED_TYP:
            raise InvalidTokenError("the token's typ is not at+jwt")
        alg = _unverified_header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise InvalidTokenError("the token's alg is not allowed")
        if any(name in _unverified_header for name in _REFUSED_HEADER_PARAMS):
            raise InvalidTokenError("the token's header names a key source other than kid")
        kid = _unverified_header.get("kid")
        if not isinstance(kid, str) or not 1 <= len(kid) <= 256:
            raise InvalidTokenError("the token has no kid")
        # (3) key.
        key = self._jwks.get(kid, alg)
        # (4) signature, iss, aud, required claims; pyjwt's wall-clock checks off, (5) uses self._clock.
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key, algorithms=[alg], audience=self.audience, issuer=self.issuer,
                options={"verify_exp": False, "verify_nbf": False, "verify_iat": False, "verify_jti": False,
                         "require": ["iss", "sub", "aud", "exp", "iat", "jti", "authorization_details"]},
            )
        except jwt.exceptions.InvalidSignatureError:
            raise InvalidTokenError("signature verification failed") from None
        except jwt.exceptions.InvalidAudienceError:
            raise InvalidTokenError("the token is for another audience") from None
        except jwt.exceptions.InvalidIssuerError:
            raise InvalidTokenError("the token is from another issuer") from None
        except jwt.exceptions.MissingRequiredClaimError as exc:
            raise InvalidTokenError(f"the token is missing claim '{exc.claim}'") from None
        except jwt.exceptions.PyJWTError:
            raise InvalidTokenError("the token is invalid") from None
        now = self._clock()
        verified = self._check_claims(claims, token, now)
        # (6) sender constraint.
        if verified.cnf_jkt is not None:
            if scheme is not None and scheme.lower() != "dpop":
                raise InvalidTokenError("a DPoP-bound token must be sent with the DPoP scheme")
            if not dpop_proof or method is None or url is None:
                raise InvalidDPoPError("a DPoP-bound token needs a DPoP proof for this request")
            verify_resource_proof(
                dpop_proof, htm=method.upper(), htu=url, access_token=token, jkt=verified.cnf_jkt, now=now,
                max_age=self._dpop_max_age, leeway=self._leeway, algorithms=self._dpop_algorithms,
                replay=self._replay,
            )
        elif self.require_dpop:
            raise InvalidTokenError("this service accepts DPoP-bound tokens only")
        elif scheme is not None and scheme.lower() != "bearer":
            raise InvalidTokenError("the token is not DPoP-bound; send it with the Bearer scheme")
        if verified.cnf_x5t_s256 is not None and not self._skip_certificate_binding:
            if client_certificate is None:
                raise InvalidTokenError("a certificate-bound token needs the client certificate of this request")
            if not hmac.compare_digest(certificate_thumbprint(client_certificate), verified.cnf_x5t_s256):
                raise InvalidTokenError("the client certificate is not the one the token is bound to")
        # (7) still active?
        if self._introspect is not None and not self._introspect(verified):
            raise TokenInactiveError("the token is no longer active")
        return verified

    def _check_claims(self, claims: dict[str, Any], token: str, now: float) -> VerifiedTaskToken:
        try:
            exp, iat = int(numeric_date(claims["exp"])), int(numeric_date(claims["iat"]))
            nbf = numeric_date(claims["nbf"]) if "nbf" in claims else None
        except ValueError:
            raise InvalidTokenError("exp, iat and nbf must be NumericDates") from None
        if now >= exp + self._leeway:
            raise InvalidTokenError("the token has expired")
        if nbf is not None and nbf > now + self._leeway:
            raise InvalidTokenError("the token is not yet valid")
        if iat > now + self._leeway:
            raise InvalidTokenError("the token was issued in the future")
        if exp - iat > self._max_lifetime:
            raise InvalidTokenError(f"the token lives longer than {self._max_lifetime} s")
        sub, jti = claims["sub"], claims["jti"]
        if not isinstance(sub, str) or not sub or not isinstance(jti, str) or not jti:
            raise InvalidTokenError("sub and jti must be non-empty strings")
        details = claims["authorization_details"]
        if not isinstance(details, list) or len(details) != 1 or not isinstance(details[0], dict):
            raise InvalidTokenError("authorization_details must hold exactly one intent")
        entry = details[0]
        action, resource, context = entry.get("action"), entry.get("resource"), entry.get("context", {})
        if entry.get("type") != "intent" or not isinstance(action, str) or not isinstance(resource, str) or (
            not isinstance(context, dict)
        ):
            raise InvalidTokenError("authorization_details must hold exactly one intent")
        cnf = claims.get("cnf")
        cnf_jkt = cnf_x5t = None
        if cnf is not None:
            if (not isinstance(cnf, dict) or not cnf or not set(cnf) <= {"jkt", "x5t#S256"}
                    or any(not isinstance(v, str) or not v for v in cnf.values())):
                raise InvalidTokenError("cnf must hold jkt and/or x5t#S256 thumbprints")
            cnf_jkt, cnf_x5t = cnf.get("jkt"), cnf.get("x5t#S256")
        optional = {name: claims.get(name) for name in ("client_id", "owner", "txn")}
        if any(v is not None and not isinstance(v, str) for v in optional.values()):
            raise InvalidTokenError("client_id, owner and txn must be strings")
        return VerifiedTaskToken(
            issuer=claims["iss"], subject=sub, audience=self.audience, client_id=optional["client_id"],
            owner=optional["owner"], jti=jti, issued_at=iat, expires_at=exp,
            intent=Intent(action, resource, MappingProxyType(dict(context))), txn=optional["txn"], cnf_jkt=cnf_jkt,
            cnf_x5t_s256=cnf_x5t,
            claims=MappingProxyType(claims), token=token, _key=_CONSTRUCTION_KEY,
        )


