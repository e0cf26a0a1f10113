"""DPoP (RFC 9449) at the token endpoint: a proof in, a :class:`DPoPProof` out, or an error.

:meth:`DPoPVerifier.verify` is the only way the broker obtains a ``DPoPProof``; the pipeline binds
the task token to its key (``cnf.jkt``, RFC 9449 §6.1). It is :meth:`DPoPVerifier.check` (steps 1-6,
no state touched, giving a :class:`CheckedDPoPProof`) followed by :meth:`DPoPVerifier.consume`
(step 7). The token endpoint checks the proof when it reads the request but consumes its ``jti``
only after the subject token is attested (``broker.pipeline``): an unauthenticated caller, with or
without a valid proof, writes nothing to the state store. Steps, in order, each raising
:class:`InvalidDPoPProof` (``invalid_dpop_proof``, 400) with a precise description:

1. size cap, compact JWS shape, strict JSON (no duplicate names) in header and payload;
2. header: ``typ`` exactly ``dpop+jwt``; ``alg`` on the asymmetric allow-list; ``jwk`` a public
   key (private or symmetric members refused) that fits ``alg``; no other key references;
3. signature with that key, and claim types (``jti``, ``htm``, ``htu``, ``iat``);
4. ``htm`` equals the request method, ``htu`` the request URI (both normalised, §4.3);
5. ``iat`` within the acceptance window (injected clock);
6. the server nonce when one is configured (:class:`UseDPoPNonce`, ``use_dpop_nonce``, with a fresh
   nonce in the ``DPoP-Nonce`` header, §8);
7. ``jti`` single use, per key, in the shared state store (:class:`DPoPReplay`), consumed last so a
   refused proof burns nothing.

:func:`enforce_binding` applies a rule's ``binding`` column: ``dpop`` needs a proof;
``dpop-identity-key`` needs a proof made with the key the workload identity itself proved (``cnf``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from broker.attest.issuers import ALLOWED_ALGORITHMS
from broker.attest.jwks import JwksError, jwk_thumbprint, parse_jwks
from broker.clock import Clock
from broker.errors import AttestationError, BrokerError
from broker.models import Grant
from broker.policy import BINDINGS
from broker.state.store import StateStore
from broker.strict_json import StrictJSONError, b64url_decode_canonical, loads_strict

__all__ = [
    "BINDINGS",
    "DPOP_ALGORITHMS",
    "DPOP_JTI_NAMESPACE",
    "CheckedDPoPProof",
    "DPoPBindingRequired",
    "DPoPProof",
    "DPoPReplay",
    "DPoPVerifier",
    "InvalidDPoPProof",
    "NonceIssuer",
    "UseDPoPNonce",
    "enforce_binding",
    "normalize_htu",
]

#: Asymmetric JWS algorithms accepted for proofs (RFC 9449 §4.2: no MAC, no ``none``).
DPOP_ALGORITHMS: tuple[str, ...] = tuple(sorted(ALLOWED_ALGORITHMS))
DPOP_JTI_NAMESPACE = "dpop-jti"

_MAX_PROOF_BYTES = 8192
_COMPACT_JWS_RE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_JTI_RE = re.compile(r"[\x21-\x7e]{1,256}")
_HTM_RE = re.compile(r"[A-Z]{1,16}")
_NONCE_RE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,256}")  # RFC 9449 §8.1 NQCHAR
# Header parameters that would name a key other than the embedded one, or change processing.
_REFUSED_HEADER_PARAMS = ("crit", "jku", "x5u", "x5c", "kid", "b64", "zip", "enc", "cty")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


class InvalidDPoPProof(BrokerError):
    """The DPoP proof is missing where required, malformed, or does not prove this request."""

    code = "invalid_dpop_proof"
    status = 400


class DPoPReplay(InvalidDPoPProof):
    """The proof's ``jti`` was seen before for this key."""


class UseDPoPNonce(InvalidDPoPProof):
    """The proof lacks the server nonce, or its nonce is stale: retry with ``DPoP-Nonce``."""

    code = "use_dpop_nonce"

    def __init__(self, description: str, *, nonce: str) -> None:
        super().__init__(description)
        self.http_headers = {"DPoP-Nonce": nonce}


class DPoPBindingRequired(InvalidDPoPProof):
    """The deciding policy requires a DPoP-bound token (or one bound to the identity's key)."""

    def __init__(self, description: str, *, rule_id: str) -> None:
        super().__init__(description)
        self.rule_id = rule_id


@dataclass(frozen=True, slots=True)
class DPoPProof:
    """A verified DPoP proof: the key's RFC 7638 thumbprint and the proof's single-use ``jti``."""

    jkt: str
    jti: str
    iat: float
    htm: str
    htu: str


@dataclass(frozen=True, slots=True)
class CheckedDPoPProof:
    """A proof that passed every stateless check (steps 1-6) but whose ``jti`` is not yet consumed:
    not a :class:`DPoPProof` until :meth:`DPoPVerifier.consume` turns it into one."""

    proof: DPoPProof


def _pct_normalise(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def _remove_dot_segments(path: str) -> str:
    # RFC 3986 §5.2.4, on whole segments.
    out: list[str] = []
    segments = path.split("/")
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == ".":
            if last:
                out.append("")
        elif seg == "..":
            if len(out) > 1:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(seg)
    return "/".join(out)


def normalize_htu(uri: str) -> str:
    """The HTTP URI without query and fragment, normalised per RFC 9449 §4.3 (RFC 3986 §6.2.2-6.2.3).

    Lower-case scheme and host, default port dropped, empty path as ``/``, percent-encodings in
    upper case and unreserved characters decoded, dot segments removed. Raises ``ValueError``.
    """
    if not isinstance(uri, str) or len(uri) > 2048 or not uri.isprintable() or " " in uri:
        raise ValueError("not a URI")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or parts.username is not None:
        raise ValueError("not an absolute http(s) URI")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port  # raises ValueError on a bad port
    netloc = host if port is None or port == _DEFAULT_PORTS[scheme] else f"{host}:{port}"
    path = re.sub(r"%([0-9A-Fa-f]{2})", _pct_normalise, parts.path or "/")
    return urlunsplit((scheme, netloc, _remove_dot_segments(path), "", ""))


def _json_segment(segment: str, what: str) -> dict[str, Any]:
    raw = b64url_decode_canonical(segment)
    if raw is None:
        raise InvalidDPoPProof(f"DPoP proof {what} is not base64url")
    try:
        value = loads_strict(raw)
    except StrictJSONError as exc:
        if exc.reason == "duplicate":
            raise InvalidDPoPProof(f"DPoP proof {what} has a duplicated member") from None
        if exc.reason in ("number", "surrogate", "too_deep"):
            raise InvalidDPoPProof(f"DPoP proof {what} is refused: {exc}") from None
        raise InvalidDPoPProof(f"DPoP proof {what} is not valid JSON") from None
    if not isinstance(value, dict):
        raise InvalidDPoPProof(f"DPoP proof {what} is not a JSON object")
    return value


def _numeric(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and 0 <= value < 2**53 else None


class NonceIssuer:
    """Stateless server nonces (RFC 9449 §8): ``window || HMAC(secret, window)``, valid for the
    current and the previous window, so every worker sharing ``secret`` agrees without shared state."""

    def __init__(self, secret: bytes, *, window: int = 60) -> None:
        if len(secret) < 16 or window < 1:
            raise ValueError("a nonce secret of at least 16 bytes and a positive window are required")
        self._key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"nhi-broker dpop nonce").derive(
            secret
        )
        self._window = window

    def _nonce(self, window: int) -> str:
        prefix = window.to_bytes(8, "big")
        mac = hmac.new(self._key, prefix, hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(prefix + mac).rstrip(b"=").decode("ascii")

    def current(self, now: float) -> str:
        """The nonce to hand out at ``now``."""
        return self._nonce(int(now // self._window))

    def accepts(self, nonce: str, now: float) -> bool:
        """True if ``nonce`` was issued in the current or the previous window."""
        current = int(now // self._window)
        return any(hmac.compare_digest(nonce, self._nonce(w)) for w in (current, current - 1))


class DPoPVerifier:
    """Verifies DPoP proofs (see the module docstring for the steps).

    ``replay`` records proof ``jti`` values; ``clock`` is the only source of time; a proof's ``iat``
    may be up to ``max_age`` seconds old and ``leeway`` seconds in the future; ``nonces`` turns on
    server nonces.
    """

    def __init__(
        self,
        replay: StateStore,
        clock: Clock,
        *,
        algorithms: tuple[str, ...] = DPOP_ALGORITHMS,
        max_age: int = 60,
        leeway: int = 5,
        nonces: NonceIssuer | None = None,
    ) -> None:
        unknown = set(algorithms) - set(DPOP_ALGORITHMS)
        if unknown:
            raise ValueError(f"not asymmetric signature algorithms: {sorted(unknown)}")
        self._replay = replay
        self._clock = clock
        self._algorithms = tuple(algorithms)
        self._max_age = max_age
        self._leeway = leeway
        self.nonces = nonces

    @property
    def algorithms(self) -> tuple[str, ...]:
        """The accepted ``alg`` values (RFC 9449 ``dpop_signing_alg_values_supported``)."""
        return self._algorithms

    def fresh_nonce(self) -> str | None:
        """The nonce to send in ``DPoP-Nonce``, or ``None`` when nonces are off."""
        return self.nonces.current(self._clock.now()) if self.nonces else None

    async def verify(self, proof: str, *, htm: str, htu: str) -> DPoPProof:
        """Verify ``proof`` for a request ``htm htu`` and return it, or raise :class:`InvalidDPoPProof`."""
        return await self.consume(self.check(proof, htm=htm, htu=htu))

    async def consume(self, checked: CheckedDPoPProof) -> DPoPProof:
        """(7) Record the proof's ``jti``, once per key, for as long as the proof could be accepted;
        :class:`DPoPReplay` if it was seen before. Call only for an authenticated request."""
        proof = checked.proof
        expires = proof.iat + self._max_age + self._leeway
        if not await self._replay.consume_once(DPOP_JTI_NAMESPACE, f"{proof.jkt}\x00{proof.jti}", expires):
            raise DPoPReplay("DPoP proof has already been used")
        return proof

    def check(self, proof: str, *, htm: str, htu: str) -> CheckedDPoPProof:
        """Steps 1-6 for a request ``htm htu``, without touching state; raise :class:`InvalidDPoPProof`."""
        # (1) size and shape before any decoding.
        if not isinstance(proof, str) or len(proof) > _MAX_PROOF_BYTES:
            raise InvalidDPoPProof(f"DPoP proof exceeds {_MAX_PROOF_BYTES} bytes")
        if _COMPACT_JWS_RE.fullmatch(proof) is None:
            raise InvalidDPoPProof("DPoP proof is not a compact JWS")
        header_segment, payload_segment, _ = proof.split(".")
        _unverified_header = _json_segment(header_segment, "header")
        _json_segment(payload_segment, "payload")  # strict JSON before pyjwt reads it

        # (2) header: typ, alg, embedded public key.
        if _unverified_header.get("typ") != "dpop+jwt":
            raise InvalidDPoPProof("DPoP proof header 'typ' must be dpop+jwt")
        alg = _unverified_header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise InvalidDPoPProof("DPoP proof 'alg' is not an allowed asymmetric algorithm")
        for name in _REFUSED_HEADER_PARAMS:
            if name in _unverified_header:
                raise InvalidDPoPProof(f"DPoP proof header parameter '{name}' is not allowed")
        jwk = _unverified_header.get("jwk")
        if not isinstance(jwk, dict):
            raise InvalidDPoPProof("DPoP proof header 'jwk' must be a JSON object")
        try:
            keys = parse_jwks({"keys": [jwk]})
        except JwksError as exc:
            raise InvalidDPoPProof(f"DPoP proof 'jwk' is refused: {exc}") from None
        if not keys:
            raise InvalidDPoPProof("DPoP proof 'jwk' is not a usable public signature key")
        try:
            keys[0].check_algorithm(alg)
        except AttestationError:
            raise InvalidDPoPProof("DPoP proof 'alg' does not match its 'jwk'") from None

        # (3) signature and claim types, in one call; pyjwt's wall-clock checks are off.
        try:
            claims: dict[str, Any] = jwt.decode(
                proof,
                key=keys[0].key,
                algorithms=[alg],
                options={
                    "verify_signature": True,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                    "require": ["jti", "htm", "htu", "iat"],
                    "enforce_minimum_key_length": True,
                },
            )
        except jwt.exceptions.InvalidSignatureError:
            raise InvalidDPoPProof("DPoP proof signature verification failed") from None
        except jwt.exceptions.MissingRequiredClaimError as exc:
            raise InvalidDPoPProof(f"DPoP proof is missing claim '{exc.claim}'") from None
        except jwt.exceptions.InvalidJTIError:
            raise InvalidDPoPProof("DPoP proof 'jti' must be 1..256 printable ASCII characters") from None
        except jwt.exceptions.PyJWTError:
            raise InvalidDPoPProof("DPoP proof is invalid") from None
        jti, claim_htm, claim_htu = claims["jti"], claims["htm"], claims["htu"]
        iat = _numeric(claims["iat"])
        if not isinstance(jti, str) or _JTI_RE.fullmatch(jti) is None:
            raise InvalidDPoPProof("DPoP proof 'jti' must be 1..256 printable ASCII characters")
        if iat is None:
            raise InvalidDPoPProof("DPoP proof 'iat' must be a NumericDate")

        # (4) the proof is for this request.
        if not isinstance(claim_htm, str) or _HTM_RE.fullmatch(claim_htm) is None or claim_htm != htm:
            raise InvalidDPoPProof("DPoP proof 'htm' does not match the request method")
        try:
            matches = isinstance(claim_htu, str) and normalize_htu(claim_htu) == normalize_htu(htu)
        except ValueError:
            matches = False
        if not matches:
            raise InvalidDPoPProof("DPoP proof 'htu' does not match the request URI")

        # (5) freshness.
        now = self._clock.now()
        if iat > now + self._leeway:
            raise InvalidDPoPProof("DPoP proof 'iat' is in the future")
        if iat < now - self._max_age:
            raise InvalidDPoPProof(f"DPoP proof is older than {self._max_age} s")

        # (6) server nonce.
        if self.nonces is not None:
            nonce = claims.get("nonce")
            if nonce is None:
                raise UseDPoPNonce("DPoP proof must carry the server nonce", nonce=self.nonces.current(now))
            if not isinstance(nonce, str) or _NONCE_RE.fullmatch(nonce) is None or not self.nonces.accepts(nonce, now):
                raise UseDPoPNonce("DPoP nonce is stale or invalid", nonce=self.nonces.current(now))

        return CheckedDPoPProof(
            DPoPProof(jkt=jwk_thumbprint(jwk), jti=jti, iat=iat, htm=claim_htm, htu=normalize_htu(htu))
        )


def enforce_binding(grant: Grant, proof: DPoPProof | None) -> None:
    """Raise :class:`DPoPBindingRequired` unless ``proof`` satisfies the grant's ``binding``."""
    if grant.binding == "optional":
        return
    if proof is None:
        raise DPoPBindingRequired(
            f"rule {grant.rule_id} requires a DPoP-bound token: send a DPoP proof", rule_id=grant.rule_id
        )
    if grant.binding == "dpop-identity-key" and (
        grant.identity.cnf_jkt is None or not hmac.compare_digest(grant.identity.cnf_jkt, proof.jkt)
    ):
        raise DPoPBindingRequired(
            f"rule {grant.rule_id} requires the DPoP key to be the key the workload identity is bound to",
            rule_id=grant.rule_id,
        )
