"""Task tokens: short-lived RFC 9068 JWT access tokens carrying exactly the granted intent.

Minting is two steps so that the ledger entry is durable before a signature exists:
:meth:`TaskTokenMinter.prepare` fixes every claim but ``txn``; the caller appends the ledger entry
(which records ``claims_sha256`` of the prepared claims); :meth:`TaskTokenMinter.sign` adds ``txn``
(the entry's leaf hash) and signs. If the append fails, nothing was ever signed.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

import jwt

from broker.clock import Clock, SystemClock
from broker.jcs import canonical_json
from broker.mint.keys import KeySet, b64url
from broker.models import Grant

__all__ = ["ACCESS_TOKEN_TYPE", "JWT_TOKEN_TYPE", "PreparedToken", "TaskTokenMinter"]

ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"


@dataclass(frozen=True)
class PreparedToken:
    """The claims of a task token before it is signed (no ``txn`` yet)."""

    claims: dict[str, Any]
    kid: str
    alg: str

    @property
    def jti(self) -> str:
        return str(self.claims["jti"])

    @property
    def expires_in(self) -> int:
        return int(self.claims["exp"]) - int(self.claims["iat"])

    def claims_sha256(self) -> str:
        """SHA-256 of the RFC 8785 canonical claims without ``txn``: what the ledger commits to."""
        return "sha256:" + hashlib.sha256(canonical_json(self.claims)).hexdigest()


class TaskTokenMinter:
    """Mints task JWTs signed by the active key of a :class:`KeySet`."""

    def __init__(self, keys: KeySet, issuer: str, *, default_ttl: int = 300, clock: Clock | None = None) -> None:
        self._keys = keys
        self._issuer = issuer
        self._default_ttl = default_ttl
        self._clock = clock or SystemClock()

    def prepare(
        self, grant: Grant, *, cnf_jkt: str | None = None, extra_claims: dict[str, Any] | None = None
    ) -> PreparedToken:
        """Fix the claims for ``grant``; the lifetime is the default TTL, never above the rule's cap.

        ``cnf_jkt`` binds the token to a DPoP key (RFC 9449 §6.1: ``cnf.jkt``). ``extra_claims``
        (such as ``num_uses`` from the rule's limits) may add claims, never replace one.
        """
        now = int(self._clock.now())
        exp = now + min(self._default_ttl, grant.max_ttl)
        # RFC 8693 §4.1: a delegated token's subject is the verified user (or the parent's subject, for
        # a sub-agent) and the workload is the actor; a plain token's subject is the workload itself.
        sub = grant.identity.spiffe_id
        if grant.delegation is not None:
            sub = grant.delegation.subject
            exp = min(exp, grant.delegation.exp)  # a sub-agent's token never outlives its parent
            if exp <= now:
                raise ValueError("the parent token expires before a child could be issued")
        elif grant.user is not None:
            sub = grant.user.subject
        claims: dict[str, Any] = {
            "iss": self._issuer,
            "sub": sub,
            "aud": grant.audience,
            "iat": now,
            "nbf": now,
            "exp": exp,
            "jti": b64url(secrets.token_bytes(16)),
            "client_id": grant.workload.name,
            "owner": grant.workload.owner,
            "authorization_details": [grant.intent.to_json()],
        }
        if grant.user is not None:
            claims["sub_id"] = grant.user.sub_id()  # RFC 9493 iss_sub: the subject, unambiguous
        act = grant.act_claim()
        if act is not None:
            claims["act"] = act
        if cnf_jkt is not None:
            claims["cnf"] = {"jkt": cnf_jkt}
        for name, value in (extra_claims or {}).items():
            if name in claims:
                raise ValueError(f"extra claim {name!r} would replace a standard claim")
            claims[name] = value
        active = self._keys.active
        return PreparedToken(claims=claims, kid=active.kid, alg=active.alg)

    def sign(self, prepared: PreparedToken, txn: str) -> str:
        """Sign the prepared claims with ``txn`` (the ledger leaf hash) added."""
        key = next(k for k in self._keys.keys if k.kid == prepared.kid)
        claims = dict(prepared.claims, txn=txn)
        return jwt.encode(claims, key.private_key, algorithm=prepared.alg, headers={"typ": "at+jwt", "kid": key.kid})
