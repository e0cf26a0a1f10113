"""Signing keys on disk, their JWKs and RFC 7638 thumbprints.

Keys are PEM (PKCS#8) files created with mode 0600 and refused when anyone else may read them.
The token-signing key set lives in ``<data_dir>/keys/token/``, one file per key named
``<signs_from>-<kid>.pem``: ``signs_from`` (epoch seconds) is when the key starts signing. A key
rotated in while brokers run is published in the JWKS first and signs only from ``signs_from`` on,
so resource servers that cache the JWKS already hold it when the first token it signed reaches them;
the previous key stays in the JWKS until tokens it signed have expired. Running brokers pick up new
key files with :meth:`KeySet.refresh` (no restart).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from broker.clock import Clock, SystemClock
from broker.errors import ConfigError

__all__ = [
    "JWKS_MAX_AGE",
    "KeySet",
    "SigningKey",
    "b64url",
    "jwk_thumbprint",
    "load_or_create_private_key",
    "public_jwk",
]

#: Seconds a resource server may cache the JWKS (its ``Cache-Control: max-age``); a rotated key is
#: published longer than this before it signs (``keys rotate --publish-for``).
JWKS_MAX_AGE = 300

log = logging.getLogger("nhi_broker.keys")

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

# RFC 7638 §3.2: the required members of each key type, in lexicographic order.
_THUMBPRINT_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x")}
_ALG_KEY = {"ES256": "EC", "EdDSA": "OKP"}


def b64url(data: bytes) -> str:
    """Base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwk_thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url) of a public JWK."""
    members = _THUMBPRINT_MEMBERS.get(jwk.get("kty", ""))
    if members is None:
        raise ValueError(f"unsupported kty {jwk.get('kty')!r}")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


def _int_bytes(value: int, length: int) -> bytes:
    return value.to_bytes(length, "big")


def public_jwk(key: PrivateKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey) -> dict[str, Any]:
    """The public JWK of ``key`` (never private members), with ``kid`` = its RFC 7638 thumbprint."""
    pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) else key
    jwk: dict[str, Any]
    if isinstance(pub, ec.EllipticCurvePublicKey):
        if not isinstance(pub.curve, ec.SECP256R1):
            raise ValueError("only P-256 EC keys are supported")
        numbers = pub.public_numbers()
        jwk = {
            "kty": "EC",
            "crv": "P-256",
            "x": b64url(_int_bytes(numbers.x, 32)),
            "y": b64url(_int_bytes(numbers.y, 32)),
        }
        jwk["alg"] = "ES256"
    elif isinstance(pub, ed25519.Ed25519PublicKey):
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw), "alg": "EdDSA"}
    elif isinstance(pub, rsa.RSAPublicKey):  # thumbprints of foreign keys only
        n = pub.public_numbers()
        jwk = {"kty": "RSA", "n": b64url(_int_bytes(n.n, (n.n.bit_length() + 7) // 8)), "e": b64url(_int_bytes(n.e, 3))}
    else:
        raise ValueError("unsupported key type")
    jwk["use"] = "sig"
    jwk["kid"] = jwk_thumbprint(jwk)
    return jwk


def _check_private_file(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(f"{path} is readable by others (mode {mode:o}); chmod 600 it")


def _write_new_key(path: Path, key: PrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # O_EXCL: two processes starting at once never overwrite each other's key.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)


def _generate(alg: str) -> PrivateKey:
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ConfigError(f"unsupported signing algorithm {alg!r}; use ES256 or EdDSA")


def _load(path: Path, alg: str) -> PrivateKey:
    _check_private_file(path)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    expected = ec.EllipticCurvePrivateKey if alg == "ES256" else ed25519.Ed25519PrivateKey
    if not isinstance(key, expected):
        raise ConfigError(f"{path} does not hold an {alg} key")
    return key


def load_or_create_private_key(path: Path, alg: str) -> tuple[PrivateKey, bool]:
    """Load the key at ``path``, creating it (mode 0600) if absent. Returns (key, created)."""
    try:
        return _load(path, alg), False
    except FileNotFoundError:
        pass
    try:
        _write_new_key(path, _generate(alg))
        created = True
    except FileExistsError:  # another process created it first
        created = False
    return _load(path, alg), created


@dataclass(frozen=True)
class SigningKey:
    """A private signing key with its algorithm and public JWK (``kid`` = thumbprint).

    ``signs_from`` is when it starts signing (epoch seconds, from its file name); ``created_at`` when
    its file was written.
    """

    private_key: PrivateKey
    alg: str
    jwk: dict[str, Any]
    signs_from: int
    created_at: int

    @property
    def kid(self) -> str:
        return str(self.jwk["kid"])


class KeySet:
    """The token-signing keys in one directory.

    The newest key whose ``signs_from`` has come signs (:attr:`active`); the JWKS publishes the keys
    still to come, the active one and the ``publish - 1`` before it.
    """

    def __init__(self, directory: Path, alg: str = "ES256", publish: int = 2, clock: Clock | None = None) -> None:
        if alg not in _ALG_KEY:
            raise ConfigError(f"unsupported signing algorithm {alg!r}; use ES256 or EdDSA")
        self.directory = directory
        self.alg = alg
        self.publish = publish
        self.clock = clock or SystemClock()
        self.created = False
        #: Key files a refresh could not use (mode, format), by name: never retried until renamed.
        self.refused: dict[str, str] = {}
        self._keys = self._load_all({})
        if not self._keys:
            self.rotate()
            self.created = True

    def _load_all(self, known: dict[str, SigningKey], refused: dict[str, str] | None = None) -> list[SigningKey]:
        """Every key file in the directory; keys in ``known`` (by file name) are not read again.

        A file that cannot be used raises, unless ``refused`` collects it (file name -> why).
        """
        if not self.directory.exists():
            return []
        keys = []
        for path in sorted(self.directory.glob("*.pem")):
            if path.name in known:
                keys.append(known[path.name])
                continue
            if refused is not None and path.name in refused:
                continue
            stamp = path.stem.split("-", 1)[0]
            signs_from = int(stamp) if stamp.isdigit() else 0
            try:
                key = _load(path, self.alg)
            except (ConfigError, ValueError, OSError) as exc:
                if "does not hold" in str(exc):
                    continue  # a key of another algorithm (after an alg change) is simply not ours
                if refused is None:
                    raise
                refused[path.name] = str(exc)
                continue
            keys.append(SigningKey(key, self.alg, public_jwk(key), signs_from, int(path.stat().st_mtime)))
        keys.sort(key=lambda k: k.signs_from)
        return keys

    def refresh(self) -> list[SigningKey]:
        """Read key files added since the last look (``keys rotate`` on a running broker); the new ones.

        Files are read only once; the swap of the list is one assignment, so a concurrent reader
        sees the old set or the new one.
        """
        before = {k.kid for k in self._keys}
        known = {f"{k.signs_from:012d}-{k.kid}.pem": k for k in self._keys}
        refused = self.refused
        seen = set(refused)
        keys = self._load_all(known, refused)
        for name in sorted(set(refused) - seen):  # said once per file, not at every look
            log.error("key file %s is not used: %s", name, refused[name])
        if not keys:
            return []
        self._keys = keys
        return [k for k in keys if k.kid not in before]

    def rotate(self, now: float | None = None, publish_for: int = 0) -> SigningKey:
        """Create a new signing key that signs ``publish_for`` seconds after ``now``.

        Until then it is only published; the previous key keeps signing and stays published after.
        """
        created = int(now if now is not None else self.clock.now())
        stamp = created + max(0, int(publish_for))
        key = _generate(self.alg)
        jwk = public_jwk(key)
        _write_new_key(self.directory / f"{stamp:012d}-{jwk['kid']}.pem", key)
        signing = SigningKey(key, self.alg, jwk, stamp, created)
        self._keys = sorted([*self._keys, signing], key=lambda k: k.signs_from)
        return signing

    @property
    def active(self) -> SigningKey:
        """The key that signs now: the newest whose ``signs_from`` has come (the oldest if none has)."""
        now = self.clock.now()
        keys = self._keys
        live = [k for k in keys if k.signs_from <= now]
        return live[-1] if live else keys[0]

    @property
    def keys(self) -> list[SigningKey]:
        return list(self._keys)

    def state(self, key: SigningKey) -> str:
        """``pending`` (published, not signing yet), ``active``, ``published`` (verifies only) or ``retired``."""
        if key.kid == self.active.kid:
            return "active"
        if key.kid in {k["kid"] for k in self.jwks()["keys"]}:
            return "pending" if key.signs_from > self.clock.now() else "published"
        return "retired"

    def jwks(self) -> dict[str, Any]:
        """The RFC 7517 JWK Set, newest first: keys still to come, the active key, the ``publish - 1`` before it."""
        keys = self._keys
        active = self.active
        at = next(i for i, k in enumerate(keys) if k.kid == active.kid)
        shown = keys[max(0, at - self.publish + 1):]
        return {"keys": [k.jwk for k in reversed(shown)]}
