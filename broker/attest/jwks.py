"""Issuer public keys: JWK Sets (RFC 7517) from a file, a URL or memory, cached by ``kid``.

Only asymmetric signature keys are kept (``kty`` EC, RSA, OKP; no ``use`` other than ``sig``; no
``key_ops`` without ``verify``). A set that carries private or symmetric key material is refused
as a whole: an issuer that publishes its private key has no key worth trusting.

Fetching is fail-closed and rate limited:

- keys are trusted for ``cache_ttl`` seconds after a successful fetch;
- an unknown ``kid`` triggers a refetch (key rotation), but there is at most one fetch attempt per
  ``refresh_min_interval`` seconds, so a flood of random ``kid`` values cannot hammer the issuer;
- a failed fetch keeps a still-valid cache; with nothing valid cached it raises
  :class:`~broker.errors.TemporarilyUnavailable` (503), never an allow.

On the event loop (:meth:`JwksSource.get_key_async`) a refresh is single-flight: one fetch per
issuer is in flight, on the issuer's own thread (a :class:`~broker.isolation.Lane` of one), and
every request that needs it awaits that one fetch for at most ``timeout`` seconds. A JWKS URL that
hangs therefore costs one thread and fails only the requests of that issuer, fast, with 503.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from broker.attest.issuers import ALLOWED_ALGORITHMS, IssuerConfig
from broker.clock import Clock, SystemClock
from broker.errors import AttestationError, ConfigError, TemporarilyUnavailable
from broker.isolation import Lane
from broker.strict_json import StrictJSONError, loads_strict

__all__ = [
    "MAX_JWKS_BYTES",
    "JwksSource",
    "PublicKey",
    "VerificationKey",
    "jwk_thumbprint",
    "parse_jwks",
]

logger = logging.getLogger(__name__)

MAX_JWKS_BYTES = 64 * 1024
_MAX_KID_CHARS = 256
_MIN_RSA_BITS = 2048
# A modulus this large makes each verification slow enough to be a denial-of-service lever.
_MAX_RSA_BITS = 8192

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey

# RFC 7517/7518 members that only private or symmetric keys carry.
_SECRET_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_EC_CURVES: dict[str, tuple[ec.EllipticCurve, int]] = {
    "P-256": (ec.SECP256R1(), 32),
    "P-384": (ec.SECP384R1(), 48),
    "P-521": (ec.SECP521R1(), 66),
}
# alg -> (kty, crv or None when any supported curve of that kty fits)
_ALG_KEY_TYPES: dict[str, tuple[str, str | None]] = {
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "EdDSA": ("OKP", None),
}
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")
_THUMBPRINT_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x")}


class JwksError(ValueError):
    """A JWK Set was refused; the message says why (never includes key material)."""


def _b64url_decode(value: Any, name: str) -> bytes:
    if not isinstance(value, str) or _B64URL_RE.fullmatch(value) is None or len(value) % 4 == 1:
        raise JwksError(f"member '{name}' is not base64url")
    raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    # Refuse non-canonical encodings (stray trailing bits): one key, one spelling.
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != value:
        raise JwksError(f"member '{name}' is not canonical base64url")
    return raw


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url without padding) of a public EC, RSA or OKP key."""
    kty = jwk.get("kty")
    members = _THUMBPRINT_MEMBERS.get(kty) if isinstance(kty, str) else None
    if members is None:
        raise ValueError("thumbprints are computed for kty EC, RSA and OKP only")
    required = {}
    for name in members:
        value = jwk.get(name)
        if not isinstance(value, str):
            raise ValueError(f"JWK member '{name}' is missing")
        required[name] = value
    canonical = json.dumps(required, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    digest = hashlib.sha256(canonical.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """One usable public key of an issuer. ``alg`` is set when the JWK pinned one."""

    kid: str | None
    kty: str
    crv: str | None
    alg: str | None
    key: PublicKey = field(repr=False)

    def check_algorithm(self, alg: str) -> None:
        """Raise :class:`~broker.errors.AttestationError` unless this key may verify ``alg``."""
        wanted = _ALG_KEY_TYPES.get(alg)
        if (
            wanted is None
            or wanted[0] != self.kty
            or (wanted[1] is not None and wanted[1] != self.crv)
            or (self.alg is not None and self.alg != alg)
        ):
            raise AttestationError(f"algorithm {alg} does not match the issuer key")


def _public_key(jwk: Mapping[str, Any]) -> tuple[str, str | None, PublicKey]:
    kty = jwk.get("kty")
    if kty == "EC":
        crv = jwk.get("crv")
        if not isinstance(crv, str) or crv not in _EC_CURVES:
            raise JwksError("unsupported EC curve")
        curve, size = _EC_CURVES[crv]
        x, y = _b64url_decode(jwk.get("x"), "x"), _b64url_decode(jwk.get("y"), "y")
        if len(x) != size or len(y) != size:
            raise JwksError("EC coordinates have the wrong length")
        numbers = ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve)
        try:
            return kty, crv, numbers.public_key()  # validates the point is on the curve
        except ValueError:
            raise JwksError("EC point is not on the curve") from None
    if kty == "RSA":
        n = int.from_bytes(_b64url_decode(jwk.get("n"), "n"), "big")
        e = int.from_bytes(_b64url_decode(jwk.get("e"), "e"), "big")
        if not _MIN_RSA_BITS <= n.bit_length() <= _MAX_RSA_BITS:
            raise JwksError(f"RSA modulus must be {_MIN_RSA_BITS}..{_MAX_RSA_BITS} bits")
        if e < 3 or e % 2 == 0:
            raise JwksError("RSA exponent is invalid")
        try:
            return kty, None, rsa.RSAPublicNumbers(e, n).public_key()
        except ValueError:
            raise JwksError("RSA key is invalid") from None
    if kty == "OKP":
        crv = jwk.get("crv")
        x = _b64url_decode(jwk.get("x"), "x")
        try:
            if crv == "Ed25519":
                return kty, crv, ed25519.Ed25519PublicKey.from_public_bytes(x)
            if crv == "Ed448":
                return kty, crv, ed448.Ed448PublicKey.from_public_bytes(x)
        except ValueError:
            raise JwksError("OKP key is invalid") from None
        raise JwksError("unsupported OKP curve (signature keys are Ed25519 or Ed448)")
    raise JwksError("unsupported kty")


def _load_json(raw: bytes) -> Any:
    try:
        return loads_strict(raw)
    except StrictJSONError as exc:
        if exc.reason == "duplicate":
            raise JwksError(f"duplicate member '{exc.name}'") from None
        if exc.reason == "constant":
            raise JwksError(f"non-standard JSON constant {exc.name}") from None
        if exc.reason in ("number", "surrogate", "too_deep"):
            raise JwksError(f"JWKS is refused: {exc}") from None
        raise JwksError("JWKS is not UTF-8 JSON") from None


def parse_jwks(document: bytes | Mapping[str, Any]) -> tuple[VerificationKey, ...]:
    """Parse a JWK Set and return its usable verification keys; raise :class:`JwksError` if refused.

    Keys that are merely unusable here (encryption keys, unsupported types or curves, disallowed
    ``alg``) are skipped with a log line. A set with secret material or an ambiguous ``kid`` is refused.
    """
    data = _load_json(document) if isinstance(document, bytes) else document
    if not isinstance(data, Mapping) or not isinstance(data.get("keys"), list):
        raise JwksError("JWKS must be an object with a 'keys' array")
    entries: list[Mapping[str, Any]] = []
    for entry in data["keys"]:
        if not isinstance(entry, Mapping):
            raise JwksError("every JWKS entry must be an object")
        if _SECRET_MEMBERS & set(entry):
            raise JwksError("JWKS contains private or symmetric key material")
        entries.append(entry)

    keys: list[VerificationKey] = []
    for index, entry in enumerate(entries):
        kid = entry.get("kid")
        try:
            if kid is not None and (not isinstance(kid, str) or not 1 <= len(kid) <= _MAX_KID_CHARS):
                raise JwksError("kid must be a string of 1..256 characters")
            use = entry.get("use")
            if use is not None and use != "sig":
                raise JwksError("not a signature key (use)")
            key_ops = entry.get("key_ops")
            if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
                raise JwksError("not a verification key (key_ops)")
            alg = entry.get("alg")
            if alg is not None and (not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS):
                raise JwksError("alg is not allowed")
            kty, crv, public_key = _public_key(entry)
            key = VerificationKey(kid=kid, kty=kty, crv=crv, alg=alg, key=public_key)
            if alg is not None:
                key.check_algorithm(alg)
        except (JwksError, AttestationError) as exc:
            logger.info("JWKS key #%d skipped: %s", index, exc)
            continue
        keys.append(key)

    kids = [k.kid for k in keys if k.kid is not None]
    duplicated = {kid for kid in kids if kids.count(kid) > 1}
    if duplicated:
        # Two keys under one kid: which one a token meant is ambiguous, so neither is used.
        logger.warning("JWKS keys with a duplicated kid were dropped (%d kid values)", len(duplicated))
        keys = [k for k in keys if k.kid not in duplicated]
    return tuple(keys)


@dataclass(frozen=True, slots=True)
class _Snapshot:
    keys: tuple[VerificationKey, ...]
    fetched_at: float
    by_kid: Mapping[str, VerificationKey]

    @classmethod
    def of(cls, keys: tuple[VerificationKey, ...], fetched_at: float) -> _Snapshot:
        return cls(keys, fetched_at, {k.kid: k for k in keys if k.kid is not None})

    def find(self, kid: str | None) -> VerificationKey | None:
        if kid is not None:
            return self.by_kid.get(kid)
        # A token without kid is accepted only when the issuer has exactly one key.
        return self.keys[0] if len(self.keys) == 1 else None


class _FetchError(Exception):
    pass


def _retrieve(task: asyncio.Task[_Snapshot]) -> None:
    """Mark a fetch's exception as retrieved: every waiter may have given up already."""
    if not task.cancelled():
        task.exception()


class FetchRequired(Exception):
    """Only a network fetch of the issuer's JWKS could answer, and the caller did not allow one.

    Raised by :meth:`JwksSource.get_key` with ``may_fetch=False``, so that an event-loop caller
    can verify cached keys inline and move to a worker thread only when it must wait on the network.
    """


class JwksSource:
    """The public keys of one issuer, from ``jwks_url``, ``jwks_file`` or memory (:meth:`from_jwks`).

    ``clock`` drives the cache and the refetch rate limit; ``timeout`` bounds a whole fetch (connect,
    headers and body) and how long requests wait for one; ``transport`` is an httpx transport
    (tests and custom TLS setups). Call :meth:`close` to release the HTTP connection pool and thread.
    """

    def __init__(
        self,
        *,
        jwks_url: str | None = None,
        jwks_file: Path | None = None,
        clock: Clock | None = None,
        cache_ttl: float = 300.0,
        refresh_min_interval: float = 30.0,
        timeout: float = 5.0,
        max_bytes: int = MAX_JWKS_BYTES,
        transport: httpx.BaseTransport | None = None,
        _static: tuple[VerificationKey, ...] | None = None,
    ) -> None:
        if _static is None and (jwks_url is None) == (jwks_file is None):
            raise ConfigError("JwksSource needs exactly one of jwks_url and jwks_file")
        if cache_ttl <= 0 or refresh_min_interval <= 0:
            raise ConfigError("cache_ttl and refresh_min_interval must be positive")
        self._url = jwks_url
        self._file = jwks_file
        self._clock: Clock = clock or SystemClock()
        self._cache_ttl = float(cache_ttl)
        self._min_interval = float(refresh_min_interval)
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._transport = transport
        self._client: httpx.Client | None = None
        self._snapshot: _Snapshot | None = None
        self._last_attempt: float | None = None
        self._lock = threading.Lock()  # sync callers (threads) only; the event loop never takes it
        self._flight: asyncio.Task[_Snapshot] | None = None
        self._lane: Lane | None = None
        if _static is not None:
            # Fixed keys: never expire, never refetch.
            self._cache_ttl = self._min_interval = float("inf")
            self._snapshot = _Snapshot.of(_static, fetched_at=0.0)

    @classmethod
    def from_jwks(cls, jwks: Mapping[str, Any]) -> JwksSource:
        """A fixed in-memory key set that never expires or refetches (the dev issuer, tests).

        Raises :class:`~broker.errors.ConfigError` if the set is refused.
        """
        try:
            keys = parse_jwks(jwks)
        except JwksError as exc:
            raise ConfigError(f"JWKS refused: {exc}") from None
        return cls(_static=keys)

    @classmethod
    def for_issuer(
        cls,
        config: IssuerConfig,
        clock: Clock,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: float | None = None,
    ) -> JwksSource:
        """The key source an :class:`IssuerConfig` names, with its cache settings."""
        if config.jwks_url is None and config.jwks_file is None:
            raise ConfigError(f"issuer {config.issuer!r} has no JWKS; pass its keys to the attestor")
        return cls(
            jwks_url=config.jwks_url,
            jwks_file=config.jwks_file,
            clock=clock,
            cache_ttl=config.jwks_cache_ttl,
            refresh_min_interval=config.jwks_refresh_min_interval,
            timeout=config.jwks_timeout if timeout is None else timeout,
            transport=transport,
        )

    @property
    def _refreshable(self) -> bool:
        return self._url is not None or self._file is not None

    def get_key(self, kid: str | None, *, may_fetch: bool = True) -> VerificationKey:
        """The key for ``kid`` (``None``: the issuer's only key).

        Raises :class:`~broker.errors.AttestationError` when no key matches and
        :class:`~broker.errors.TemporarilyUnavailable` when no valid keys can be had. With
        ``may_fetch=False`` a URL source raises :class:`FetchRequired` instead of going to the network.
        """
        now = self._clock.now()
        snapshot = self._snapshot
        if snapshot is None or self._expired(snapshot, now):
            self._check_may_fetch(may_fetch)
            snapshot = self._refresh(now, unknown_kid=False)
        key = snapshot.find(kid)
        if key is None and self._refreshable:
            # (rotation) The issuer may have published a new key since we last looked.
            self._check_may_fetch(may_fetch)
            snapshot = self._refresh(now, unknown_kid=True)
            key = snapshot.find(kid)
        if key is None:
            raise AttestationError("no issuer key matches the token's kid")
        return key

    async def get_key_async(self, kid: str | None) -> VerificationKey:
        """:meth:`get_key` for the event loop: cached keys at once; a refresh is single-flight, on the
        issuer's own thread, and awaited for at most ``timeout`` seconds (then 503)."""
        now = self._clock.now()
        snapshot = self._snapshot
        if snapshot is None or self._expired(snapshot, now):
            snapshot = await self._refresh_async(now, unknown_kid=False)
        key = snapshot.find(kid)
        if key is None and self._refreshable:
            # (rotation) The issuer may have published a new key since we last looked.
            snapshot = await self._refresh_async(now, unknown_kid=True)
            key = snapshot.find(kid)
        if key is None:
            raise AttestationError("no issuer key matches the token's kid")
        return key

    async def keys_async(self) -> tuple[VerificationKey, ...]:
        """:meth:`keys` for the event loop (see :meth:`get_key_async`)."""
        now = self._clock.now()
        snapshot = self._snapshot
        if snapshot is None or self._expired(snapshot, now):
            snapshot = await self._refresh_async(now, unknown_kid=False)
        return snapshot.keys

    async def _refresh_async(self, now: float, *, unknown_kid: bool) -> _Snapshot:
        flight = self._flight
        if flight is None or flight.done() or flight.get_loop() is not asyncio.get_running_loop():
            current = self._snapshot
            valid = current if current is not None and not self._expired(current, now) else None
            if valid is not None and not unknown_kid:
                return valid
            if self._last_attempt is not None and now - self._last_attempt < self._min_interval:
                if valid is not None:
                    return valid
                raise TemporarilyUnavailable("issuer keys unavailable")
            self._last_attempt = now
            flight = asyncio.get_running_loop().create_task(self._fetch_async(now, valid))
            flight.add_done_callback(_retrieve)
            self._flight = flight
        try:
            # Shielded: a waiter that gives up does not cancel the fetch the others are waiting for.
            return await asyncio.wait_for(asyncio.shield(flight), self._timeout)
        except TimeoutError:
            current = self._snapshot
            if current is not None and not self._expired(current, now):
                return current
            raise TemporarilyUnavailable("issuer keys unavailable (the JWKS fetch is taking too long)") from None

    async def _fetch_async(self, now: float, valid: _Snapshot | None) -> _Snapshot:
        if self._lane is None:
            self._lane = Lane(f"JWKS of {self._where()}", 1, self._timeout, queue_factor=1)
        try:
            keys = await self._lane.run(lambda: parse_jwks(self._fetch()))
        except (_FetchError, JwksError, TemporarilyUnavailable) as exc:
            logger.warning("JWKS from %s refused or unreachable: %s", self._where(), exc)
            if valid is not None:
                return valid
            raise TemporarilyUnavailable("issuer keys unavailable") from None
        self._snapshot = _Snapshot.of(keys, fetched_at=now)
        return self._snapshot

    def keys(self) -> tuple[VerificationKey, ...]:
        """The currently trusted keys (fetching them if none are cached)."""
        now = self._clock.now()
        snapshot = self._snapshot
        if snapshot is None or self._expired(snapshot, now):
            snapshot = self._refresh(now, unknown_kid=False)
        return snapshot.keys

    def close(self) -> None:
        """Close the HTTP client and the fetch thread, if they were opened."""
        if self._lane is not None:
            self._lane.close()
            self._lane = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def _check_may_fetch(self, may_fetch: bool) -> None:
        if not may_fetch and self._url is not None:
            raise FetchRequired(self._url)

    def _expired(self, snapshot: _Snapshot, now: float) -> bool:
        return now - snapshot.fetched_at >= self._cache_ttl

    def _refresh(self, now: float, *, unknown_kid: bool) -> _Snapshot:
        with self._lock:
            current = self._snapshot
            valid = current if current is not None and not self._expired(current, now) else None
            if valid is not None and not unknown_kid:
                return valid  # another thread refreshed while we waited for the lock
            if self._last_attempt is not None and now - self._last_attempt < self._min_interval:
                if valid is not None:
                    return valid
                raise TemporarilyUnavailable("issuer keys unavailable")
            self._last_attempt = now
            try:
                keys = parse_jwks(self._fetch())
            except (_FetchError, JwksError) as exc:
                logger.warning("JWKS from %s refused or unreachable: %s", self._where(), exc)
                if valid is not None:
                    return valid
                raise TemporarilyUnavailable("issuer keys unavailable") from None
            self._snapshot = _Snapshot.of(keys, fetched_at=now)
            return self._snapshot

    def _where(self) -> str:
        return self._url if self._url is not None else str(self._file)

    def _fetch(self) -> bytes:
        if self._file is not None:
            try:
                with open(self._file, "rb") as fh:
                    raw = fh.read(self._max_bytes + 1)
            except OSError as exc:
                raise _FetchError(f"cannot read file: {exc.strerror}") from None
            if len(raw) > self._max_bytes:
                raise _FetchError(f"JWKS exceeds {self._max_bytes} bytes")
            return raw
        assert self._url is not None
        if self._client is None:
            self._client = httpx.Client(
                transport=self._transport,
                timeout=self._timeout,
                follow_redirects=False,
                headers={"Accept": "application/jwk-set+json, application/json"},
            )
        deadline = time.monotonic() + self._timeout
        try:
            with self._client.stream("GET", self._url) as response:
                if response.status_code != 200:
                    raise _FetchError(f"HTTP status {response.status_code}")
                declared = response.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > self._max_bytes:
                    raise _FetchError(f"JWKS exceeds {self._max_bytes} bytes")
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > self._max_bytes:
                        raise _FetchError(f"JWKS exceeds {self._max_bytes} bytes")
                    if time.monotonic() > deadline:  # a server trickling bytes meets the same deadline
                        raise _FetchError(f"JWKS fetch took longer than {self._timeout:g} s")
                return bytes(body)
        except httpx.HTTPError as exc:
            raise _FetchError(type(exc).__name__) from None
