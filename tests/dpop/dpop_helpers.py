"""Build DPoP proofs for tests with pyjwt directly (not with the SDK under test)."""

from __future__ import annotations

import secrets
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from broker.mint.keys import public_jwk

HTU = "https://broker.example/v1/token"


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def jwk_of(key: Any) -> dict[str, Any]:
    """The bare public JWK (no kid/use/alg) as a client would embed it."""
    if isinstance(key, rsa.RSAPrivateKey):
        return {k: v for k, v in jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True).items()
                if k in ("kty", "n", "e")}
    full = public_jwk(key)
    return {k: v for k, v in full.items() if k in ("kty", "crv", "x", "y")}


def proof(
    key: Any,
    *,
    htm: str = "POST",
    htu: str = HTU,
    iat: float,
    alg: str | None = None,
    header: dict[str, Any] | None = None,
    drop: tuple[str, ...] = (),
    **claims: Any,
) -> str:
    if alg is None:
        alg = "EdDSA" if isinstance(key, ed25519.Ed25519PrivateKey) else ("RS256" if isinstance(key, rsa.RSAPrivateKey)
                                                                           else "ES256")
    hdr: dict[str, Any] = {"typ": "dpop+jwt", "jwk": jwk_of(key)}
    hdr.update(header or {})
    body: dict[str, Any] = {"jti": secrets.token_urlsafe(16), "htm": htm, "htu": htu, "iat": iat}
    body.update(claims)
    for name in drop:
        body.pop(name, None)
        hdr.pop(name, None)
    hdr = {k: v for k, v in hdr.items() if v is not None}
    return jwt.encode(body, key, algorithm=alg, headers=hdr)
