"""DPoP (RFC 9449): proofs made by the client (:class:`DPoPKey`), and checked by the resource server."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from ._errors import InvalidDPoPError
from ._jose import COMPACT_JWS_RE, b64url, jwk_thumbprint, normalize_htu, numeric_date, public_key_from_jwk
from ._jose import strict_json_segment as _strict_json_segment

__all__ = ["DPoPKey", "InMemoryReplayCache", "ReplayCache", "access_token_hash"]

_MAX_PROOF_CHARS = 8192
_JTI_RE = re.compile(r"[\x21-\x7e]{1,256}")
_REFUSED_HEADER_PARAMS = ("crit", "jku", "x5u", "x5c", "kid", "b64", "zip", "enc", "cty")


def access_token_hash(access_token: str) -> str:
    """RFC 9449 ``ath``: base64url(SHA-256(ASCII(access_token)))."""
    return b64url(hashlib.sha256(access_token.encode("ascii")).digest())


class DPoPKey:
    """A DPoP key pair held by the client. The private key never leaves this object.

    ``DPoPKey.generate()`` makes an ES256 (P-256) key; ``DPoPKey(private_key)`` wraps an existing EC
    P-256 or Ed25519 key (for example the key a workload identity is bound to).
    """

    def __init__(self, private_key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> None:
        public = private_key.public_key()
        if isinstance(private_key, ec.EllipticCurvePrivateKey):
            if not isinstance(private_key.curve, ec.SECP256R1):
                raise ValueError("EC DPoP keys must be P-256 (ES256)")
            self.alg = "ES256"
            n = public.public_numbers()  # type: ignore[union-attr]
            jwk: dict[str, str] = {"kty": "EC", "crv": "P-256", "x": b64url(n.x.to_bytes(32, "big")),
                                   "y": b64url(n.y.to_bytes(32, "big"))}
        elif isinstance(private_key, ed25519.Ed25519PrivateKey):
            self.alg = "EdDSA"
            jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64url(public.public_bytes_raw())}  # type: ignore[union-attr]
        else:
            raise TypeError("a DPoP key is an EC P-256 or Ed25519 private key")
        self._private_key = private_key
        self.public_jwk: dict[str, str] = jwk
        self.jkt: str = jwk_thumbprint(jwk)

    @classmethod
    def generate(cls) -> DPoPKey:
        """A fresh ES256 key."""
        return cls(ec.generate_private_key(ec.SECP256R1()))

    def __repr__(self) -> str:
        return f"DPoPKey(alg={self.alg!r}, jkt={self.jkt!r})"

    def proof(
        self,
        htm: str,
        htu: str,
        *,
        nonce: str | None = None,
        access_token: str | None = None,
        now: float | None = None,
    ) -> str:
        """A DPoP proof JWT for one request ``htm htu`` (query and fragment are dropped).

        ``access_token`` adds ``ath`` (required at resource servers); ``nonce`` the server's nonce.
        """
        claims: dict[str, Any] = {
            "jti": b64url(secrets.token_bytes(16)),
            "htm": htm.upper(),
            "htu": normalize_htu(htu),
            "iat": int(time.time() if now is None else now),
        }
        if nonce is not None:
            claims["nonce"] = nonce
        if access_token is not None:
            claims["ath"] = access_token_hash(access_token)
        headers = {"typ": "dpop+jwt", "jwk": self.public_jwk}
        return jwt.encode(claims, self._private_key, algorithm=self.alg, headers=headers)


class ReplayCache(Protocol):
    """Single-use values seen by a resource server (share one across replicas, e.g. in Redis)."""

    def consume_once(self, key: str, expires_at: float) -> bool:
        """Record ``key`` until ``expires_at``; True on first use, False if seen before."""
        ...


class InMemoryReplayCache:
    """A :class:`ReplayCache` for one process: a dict of live keys, purged as they expire."""

    def __init__(self, clock: Callable[[], float] = time.time, max_entries: int = 1_000_000) -> None:
        self._clock = clock
        self._max = max_entries
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def consume_once(self, key: str, expires_at: float) -> bool:
        now = self._clock()
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and seen > now:
                return False
            if len(self._seen) >= self._max:
                self._seen = {k: v for k, v in self._seen.items() if v > now}
                if len(self._seen) >= self._max:
                    return False  # full of live values: refuse rather than forget one (fail closed)
            self._seen[key] = expires_at
            return True


@dataclass(frozen=True, slots=True)
class _Proof:
    jti: str
    iat: float


def verify_resource_proof(
    proof: str,
    *,
    htm: str,
    htu: str,
    access_token: str,
    jkt: str,
    now: float,
    max_age: float,
    leeway: float,
    algorithms: tuple[str, ...],
    replay: ReplayCache,
) -> _Proof:
    """Verify a DPoP proof presented with a bound access token (RFC 9449 §7.1), or raise InvalidDPoPError."""
    # (1) shape and strict JSON before anything reads it.
    if not isinstance(proof, str) or len(proof) > _MAX_PROOF_CHARS or COMPACT_JWS_RE.fullmatch(proof) is None:
        raise InvalidDPoPError("DPoP proof is not a compact JWS")
    try:
        _unverified_header = _strict_json_segment(proof.split(".", 1)[0])
        _strict_json_segment(proof.split(".")[1])
    except ValueError:
        raise InvalidDPoPError("DPoP proof is not valid JSON") from None
    # (2) typ, alg, embedded public key.
    if _unverified_header.get("typ") != "dpop+jwt":
        raise InvalidDPoPError("DPoP proof 'typ' must be dpop+jwt")
    alg = _unverified_header.get("alg")
    if not isinstance(alg, str) or alg not in algorithms:
        raise InvalidDPoPError("DPoP proof 'alg' is not allowed")
    if any(name in _unverified_header for name in _REFUSED_HEADER_PARAMS):
        raise InvalidDPoPError("DPoP proof header names a key other than its jwk")
    jwk = _unverified_header.get("jwk")
    try:
        key = public_key_from_jwk(jwk, alg)
    except ValueError as exc:
        raise InvalidDPoPError(f"DPoP proof 'jwk' is refused: {exc}") from None
    # (3) the key is the one the token is bound to (cnf.jkt), compared in constant time.
    assert isinstance(jwk, dict)
    if not hmac.compare_digest(jwk_thumbprint(jwk), jkt):
        raise InvalidDPoPError("DPoP proof key is not the key the token is bound to")
    # (4) signature and required claims in one call; time is checked below with the injected clock.
    try:
        claims = jwt.decode(
            proof, key, algorithms=[alg],
            options={"verify_exp": False, "verify_nbf": False, "verify_iat": False, "verify_aud": False,
                     "verify_iss": False, "verify_jti": False, "require": ["jti", "htm", "htu", "iat", "ath"]},
        )
    except jwt.exceptions.InvalidSignatureError:
        raise InvalidDPoPError("DPoP proof signature verification failed") from None
    except jwt.exceptions.MissingRequiredClaimError as exc:
        raise InvalidDPoPError(f"DPoP proof is missing claim '{exc.claim}'") from None
    except jwt.exceptions.PyJWTError:
        raise InvalidDPoPError("DPoP proof is invalid") from None
    # (5) the proof is for this request and this token.
    jti = claims["jti"]
    if not isinstance(jti, str) or _JTI_RE.fullmatch(jti) is None:
        raise InvalidDPoPError("DPoP proof 'jti' must be 1..256 printable ASCII characters")
    if claims["htm"] != htm:
        raise InvalidDPoPError("DPoP proof 'htm' does not match the request method")
    try:
        same_uri = isinstance(claims["htu"], str) and normalize_htu(claims["htu"]) == normalize_htu(htu)
    except ValueError:
        same_uri = False
    if not same_uri:
        raise InvalidDPoPError("DPoP proof 'htu' does not match the request URI")
    ath = claims["ath"]
    if not isinstance(ath, str) or not hmac.compare_digest(ath, access_token_hash(access_token)):
        raise InvalidDPoPError("DPoP proof 'ath' does not match the access token")
    # (6) freshness, then single use (last, so a refused proof burns nothing).
    try:
        iat = numeric_date(claims["iat"])
    except ValueError:
        raise InvalidDPoPError("DPoP proof 'iat' must be a NumericDate") from None
    if iat > now + leeway:
        raise InvalidDPoPError("DPoP proof 'iat' is in the future")
    if iat < now - max_age:
        raise InvalidDPoPError(f"DPoP proof is older than {int(max_age)} s")
    if not replay.consume_once(f"{jkt}\x00{jti}", iat + max_age + leeway):
        raise InvalidDPoPError("DPoP proof has already been used")
    return _Proof(jti=jti, iat=iat)
