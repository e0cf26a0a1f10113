"""Task tokens: short-lived RFC 9068 JWT access tokens carrying exactly the granted intent.

Minting is two steps so that the ledger entry is durable before a signature exists:
:meth:`TaskTokenMinter.prepare` fixes every claim but ``txn``; the caller appends the ledger entry
(which records ``claims_sha256`` of the prepared claims); :meth:`TaskTokenMinter.sign` adds ``txn``
(the entry's leaf hash) and signs. If the append fails, nothing was ever signed.

The JWS is assembled here rather than by ``jwt.encode``, with the bytes pyjwt writes: the header
segment (sorted members) is fixed per key and built once, the payload is the claims as
``json.dumps(separators=(",", ":"))`` in insertion order, and the ES256 signature is cryptography's
DER signature converted to the raw ``r || s`` of RFC 7518 §3.4. pyjwt and the SDK's verifier verify
the result (``tests/unit/test_task_token_mint.py``).
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from broker.clock import Clock, SystemClock
from broker.cpu_batch import TurnBatch
from broker.csprng import random_bytes
from broker.jcs import canonical_json
from broker.mint.keys import KeySet, SigningKey, b64url
from broker.models import Grant

__all__ = ["ACCESS_TOKEN_TYPE", "JWT_TOKEN_TYPE", "PreparedToken", "TaskTokenMinter"]

ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"

_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
# json.dumps(claims, separators=(",", ":")) as jwt.encode writes the payload, without a new encoder per call.
_PAYLOAD_ENCODER = json.JSONEncoder(separators=(",", ":"))
_P256_BYTES = 32


def _der_to_raw_p256(der: bytes) -> bytes:
    """RFC 7518 §3.4: the DER ``ECDSA-Sig-Value`` OpenSSL returns as ``r || s``, 32 bytes each.

    A P-256 signature is at most 72 bytes, so the DER lengths are single bytes: read them directly;
    anything else goes through cryptography's DER decoder.
    """
    size = len(der)
    if size > 8 and der[0] == 0x30 and der[1] == size - 2 and der[2] == 0x02:
        end_r = 4 + der[3]
        if end_r + 2 < size and der[end_r] == 0x02 and der[end_r + 1] == size - end_r - 2:
            r = int.from_bytes(der[4:end_r], "big")
            s = int.from_bytes(der[end_r + 2 :], "big")
            return r.to_bytes(_P256_BYTES, "big") + s.to_bytes(_P256_BYTES, "big")
    r, s = decode_dss_signature(der)
    return r.to_bytes(_P256_BYTES, "big") + s.to_bytes(_P256_BYTES, "big")


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
        # kid -> (key, "<header segment>."): the header of a key's tokens never changes.
        self._headers: dict[str, tuple[SigningKey, bytes]] = {}
        self._signatures = TurnBatch()

    def prepare(
        self, grant: Grant, *, cnf_jkt: str | None = None, extra_claims: dict[str, Any] | None = None
    ) -> PreparedToken:
        """Fix the claims for ``grant``; the lifetime is the default TTL, never above the rule's cap.

        ``cnf_jkt`` binds the token to a DPoP key (RFC 9449 §6.1: ``cnf.jkt``); an identity proven by
        an X.509-SVID binds it to that certificate (RFC 8705 §3.1: ``cnf.x5t#S256``). ``extra_claims``
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
            "jti": b64url(random_bytes(16)),  # 128 random bits
            "client_id": grant.workload.name,
            "owner": grant.workload.owner,
            "authorization_details": [grant.intent.to_json()],
        }
        if grant.user is not None:
            claims["sub_id"] = grant.user.sub_id()  # RFC 9493 iss_sub: the subject, unambiguous
        act = grant.act_claim()
        if act is not None:
            claims["act"] = act
        cnf: dict[str, str] = {}
        if cnf_jkt is not None:
            cnf["jkt"] = cnf_jkt
        if grant.identity.cnf_x5t_s256 is not None:
            # RFC 8705 §3.1: the workload authenticated with this certificate; the token is bound to it.
            cnf["x5t#S256"] = grant.identity.cnf_x5t_s256
        if cnf:
            claims["cnf"] = cnf
        for name, value in (extra_claims or {}).items():
            if name in claims:
                raise ValueError(f"extra claim {name!r} would replace a standard claim")
            claims[name] = value
        active = self._keys.active
        return PreparedToken(claims=claims, kid=active.kid, alg=active.alg)

    def _header(self, kid: str, alg: str) -> tuple[SigningKey, bytes]:
        cached = self._headers.get(kid)
        if cached is not None and cached[0].alg == alg:
            return cached
        key = next(k for k in self._keys.keys if k.kid == kid)
        private_key = key.private_key
        # What pyjwt's prepare_key checked at every encode: the key fits the algorithm (and curve).
        fits = (
            isinstance(private_key, ec.EllipticCurvePrivateKey) and isinstance(private_key.curve, ec.SECP256R1)
            if alg == "ES256"
            else alg == "EdDSA" and isinstance(private_key, ed25519.Ed25519PrivateKey)
        )
        if key.alg != alg or not fits:
            raise ValueError(f"key {kid} cannot sign {alg}")
        # The bytes pyjwt writes for these headers: sorted members, no whitespace (RFC 9068 §2.1 typ).
        header = json.dumps({"alg": alg, "kid": kid, "typ": "at+jwt"}, separators=(",", ":"), sort_keys=True)
        cached = (key, base64.urlsafe_b64encode(header.encode("ascii")).rstrip(b"=") + b".")
        self._headers[kid] = cached
        return cached

    def sign(self, prepared: PreparedToken, txn: str) -> str:
        """Sign the prepared claims with ``txn`` (the ledger leaf hash) added."""
        key, header = self._header(prepared.kid, prepared.alg)
        payload = _PAYLOAD_ENCODER.encode(dict(prepared.claims, txn=txn)).encode("utf-8")
        signing_input = header + base64.urlsafe_b64encode(payload).rstrip(b"=")
        private_key = key.private_key
        if isinstance(private_key, ec.EllipticCurvePrivateKey):  # ES256 on P-256 (checked by _header)
            signature = _der_to_raw_p256(private_key.sign(signing_input, _ECDSA_SHA256))
        else:  # EdDSA (Ed25519): the signature is already raw
            signature = private_key.sign(signing_input)
        return (signing_input + b"." + base64.urlsafe_b64encode(signature).rstrip(b"=")).decode("ascii")

    async def sign_batched(self, prepared: PreparedToken, txn: str) -> str:
        """:meth:`sign`, run with the other signatures of this event-loop turn (:mod:`broker.cpu_batch`)."""
        return await self._signatures.run(self.sign, prepared, txn)
