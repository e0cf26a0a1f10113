"""RFC 7662 introspection and RFC 7009 revocation of the broker's own task tokens.

A token is verified with the broker's own signing keys (signature, ``typ``, issuer, types and
lifetime, in one call: :func:`verify_task_token`), then checked against the shared state: revoked,
suspended, cut off by a scoped revocation, or out of uses. Only a resource server configured for the
token's audience learns anything about it; everyone else sees ``{"active": false}``.
"""

from __future__ import annotations

import logging
from typing import Any

import jwt

from broker.clock import Clock
from broker.mint.keys import KeySet
from broker.operators import AuthenticatedClient
from broker.policy import MAX_TTL
from broker.state.tokens import TokenState

__all__ = ["INACTIVE", "Introspector", "InvalidTaskToken", "verify_task_token"]

log = logging.getLogger("nhi_broker.introspection")

INACTIVE: dict[str, Any] = {"active": False}
MAX_TOKEN_BYTES = 16384
_LEEWAY = 5
_REQUIRED = ("iss", "sub", "aud", "iat", "nbf", "exp", "jti", "client_id", "authorization_details")


class InvalidTaskToken(Exception):
    """Not a live task token of this broker; the text is for logs only."""


def verify_task_token(token: str, keys: KeySet, issuer: str, now: float) -> dict[str, Any]:
    """The claims of ``token`` if this broker signed it and it is within its lifetime at ``now``."""
    # (1) size and header before any cryptography.
    if len(token) > MAX_TOKEN_BYTES:
        raise InvalidTaskToken("token too large")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise InvalidTaskToken("not a JWS") from None
    if header.get("typ") != "at+jwt":
        raise InvalidTaskToken("typ is not at+jwt")
    key = next((k for k in keys.keys if k.kid == header.get("kid")), None)
    if key is None or header.get("alg") != key.alg:
        raise InvalidTaskToken("unknown kid or alg")
    # (2) signature, issuer and presence of claims in one call; times are checked against our clock.
    try:
        claims = jwt.decode(
            token, key.private_key.public_key(), algorithms=[key.alg], issuer=issuer,
            options={"require": list(_REQUIRED), "verify_aud": False, "verify_exp": False,
                     "verify_nbf": False, "verify_iat": False},
        )
    except jwt.PyJWTError as exc:
        raise InvalidTaskToken(type(exc).__name__) from None
    # (3) types and lifetime.
    times = [claims[name] for name in ("iat", "nbf", "exp")]
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in times):
        raise InvalidTaskToken("iat, nbf and exp must be integers")
    iat, nbf, exp = times
    if not (iat <= nbf < exp and exp - iat <= MAX_TTL):
        raise InvalidTaskToken("impossible lifetime")
    if now >= exp or now + _LEEWAY < nbf:
        raise InvalidTaskToken("expired or not yet valid")
    if not isinstance(claims["jti"], str) or not isinstance(claims["client_id"], str):
        raise InvalidTaskToken("jti and client_id must be strings")
    uses = claims.get("num_uses")
    if uses is not None and (isinstance(uses, bool) or not isinstance(uses, int) or uses < 1):
        raise InvalidTaskToken("num_uses must be a positive integer")
    return claims


class Introspector:
    """Answers RFC 7662 introspection and performs RFC 7009 revocation for authenticated clients."""

    def __init__(self, keys: KeySet, issuer: str, tokens: TokenState, clock: Clock) -> None:
        self._keys = keys
        self._issuer = issuer
        self._tokens = tokens
        self._clock = clock

    def _claims_for(self, token: str, client: AuthenticatedClient) -> dict[str, Any] | None:
        try:
            claims = verify_task_token(token, self._keys, self._issuer, self._clock.now())
        except InvalidTaskToken as exc:
            log.info("introspection by %s: inactive (%s)", client.client_id, exc)
            return None
        if not client.may_see(claims["aud"]):
            log.info("introspection by %s: inactive (audience not configured)", client.client_id)
            return None
        return claims

    async def introspect(self, token: str, client: AuthenticatedClient) -> dict[str, Any]:
        """The RFC 7662 response; consumes one use of an N-use token when it is active."""
        claims = self._claims_for(token, client)
        if claims is None:
            return dict(INACTIVE)
        status = await self._tokens.status(claims, consume_use=True)
        if not status.active:
            log.info("introspection by %s: jti=%s inactive (%s)", client.client_id, claims["jti"], status.reason)
            return dict(INACTIVE)
        response = {"active": True, "token_type": "Bearer", **claims}
        if status.uses is not None:
            response["uses_remaining"] = int(claims["num_uses"]) - status.uses
        return response

    async def revoke(self, token: str, client: AuthenticatedClient) -> dict[str, Any] | None:
        """Revoke ``token`` if it is a live token this client may see; returns its claims, else ``None``.

        RFC 7009 §2.2: an invalid or unknown token is not an error for the caller.
        """
        claims = self._claims_for(token, client)
        if claims is None:
            return None
        await self._tokens.revoke_token(str(claims["jti"]), float(claims["exp"]))
        return claims
