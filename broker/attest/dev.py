"""The trial-only local identity issuer: lets someone try the broker without Kubernetes or SPIRE.

:class:`DevIssuer` keeps one ES256 key in ``<data_dir>/dev-issuer-key.pem`` (mode 0600) and mints
JWT-SVID-like tokens (``iss``, ``sub`` = a SPIFFE ID, ``aud``, ``iat``, ``exp``, ``jti``) that the
attestor accepts through an issuer of kind ``dev``. Anyone who can read the key file can claim any
identity the dev issuer config allows: never configure it in production.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any, Self

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker.attest.issuers import IssuerConfig
from broker.attest.jwks import JwksSource, jwk_thumbprint
from broker.attest.spiffe import parse_spiffe_id
from broker.attest.users import UserIssuerConfig
from broker.clock import Clock
from broker.errors import ConfigError

__all__ = ["DEV_ISSUER", "DEV_KEY_FILE", "DEV_USER_ISSUER", "DEV_USER_KEY_FILE", "DevIssuer", "DevUserIssuer"]

DEV_ISSUER = "urn:nhi-broker:dev-issuer"
DEV_KEY_FILE = "dev-issuer-key.pem"
#: The trial end-user issuer (delegated exchanges on the embedded defaults), with its own key.
DEV_USER_ISSUER = "urn:nhi-broker:dev-user-issuer"
DEV_USER_KEY_FILE = "dev-user-issuer-key.pem"
_USER_SUBJECT_RE = re.compile(r"[\x21-\x7e]{1,255}")
_MAX_KEY_FILE_BYTES = 16 * 1024
_MAX_TTL = 3600


def _b64url_uint(value: int, size: int) -> str:
    return base64.urlsafe_b64encode(value.to_bytes(size, "big")).rstrip(b"=").decode("ascii")


class DevIssuer:
    """A local ES256 issuer of development workload identities."""

    issuer: str = DEV_ISSUER
    key_file: str = DEV_KEY_FILE

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private_key, ec.EllipticCurvePrivateKey) or not isinstance(
            private_key.curve, ec.SECP256R1
        ):
            raise ConfigError("the dev issuer key must be an EC P-256 private key")
        self._key = private_key
        numbers = private_key.public_key().public_numbers()
        public = {
            "kty": "EC",
            "crv": "P-256",
            "x": _b64url_uint(numbers.x, 32),
            "y": _b64url_uint(numbers.y, 32),
        }
        self._kid = jwk_thumbprint(public)
        self._public_jwk = {**public, "kid": self._kid, "use": "sig", "alg": "ES256"}

    def __repr__(self) -> str:
        return f"DevIssuer(kid={self._kid!r})"

    @classmethod
    def load_or_create(cls, data_dir: Path) -> Self:
        """Load the key from ``data_dir``, creating it (mode 0600) on first use.

        Creation is atomic across processes: the key is written to a private temporary file
        (``O_CREAT | O_EXCL``, 0600), synced, then published with ``link()``, which fails if
        another process published first; the loser loads the winner's key. A reader never sees a
        partly written key.
        """
        data_dir = Path(data_dir)
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = data_dir / cls.key_file
        try:
            return cls._load(path)
        except FileNotFoundError:
            pass
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        tmp = data_dir / f".{cls.key_file}.{secrets.token_hex(8)}.tmp"
        flags = (
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        )
        fd = os.open(tmp, flags, 0o600)
        try:
            os.fchmod(fd, 0o600)  # the umask can only narrow 0600, but say it explicitly
            view = memoryview(pem)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
            dir_fd = os.open(data_dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        finally:
            tmp.unlink(missing_ok=True)
        return cls._load(path)

    @classmethod
    def _load(cls, path: Path) -> Self:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise
        except OSError as exc:
            # ELOOP: a symlink where the key should be; refuse rather than follow it.
            raise ConfigError(f"{path} cannot be opened as a key file: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ConfigError(f"{path} is not a regular file")
            if info.st_mode & 0o077:
                raise ConfigError(f"{path} must not be accessible by group or others (chmod 600)")
            with os.fdopen(os.dup(fd), "rb") as fh:
                pem = fh.read(_MAX_KEY_FILE_BYTES + 1)
        finally:
            os.close(fd)
        if len(pem) > _MAX_KEY_FILE_BYTES:
            raise ConfigError(f"{path} is too large to be a key")
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError):
            raise ConfigError(f"{path} is not an unencrypted PEM private key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{path} is not an EC P-256 private key")
        return cls(key)

    @property
    def kid(self) -> str:
        """The key id: the RFC 7638 thumbprint of the public key."""
        return self._kid

    def jwks(self) -> dict[str, Any]:
        """The public JWK Set (RFC 7517)."""
        return {"keys": [dict(self._public_jwk)]}

    def jwks_source(self) -> JwksSource:
        """An in-memory key source for the attestor."""
        return JwksSource.from_jwks(self.jwks())

    def issuer_config(self, audience: str, trust_domain: str | None = None) -> IssuerConfig:
        """An ``IssuerConfig`` of kind ``dev`` for this issuer (``trust_domain=None``: any trust domain)."""
        return IssuerConfig(
            issuer=self.issuer,
            kind="dev",
            audience=audience,
            trust_domain=trust_domain,
            algorithms=("ES256",),
        )

    def mint(
        self,
        spiffe_id: str,
        audience: str,
        *,
        ttl: int = 300,
        clock: Clock,
        jti: str | None = None,
        cnf_jwk: dict[str, Any] | None = None,
    ) -> str:
        """Mint a subject token for ``spiffe_id`` (validated) and ``audience``, valid ``ttl`` seconds.

        ``jti`` defaults to 128 random bits. ``cnf_jwk`` binds the identity to a public key (RFC 7800).
        """
        sub = str(parse_spiffe_id(spiffe_id))
        if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= _MAX_TTL:
            raise ValueError(f"ttl must be an integer of 1..{_MAX_TTL} seconds")
        iat = int(clock.now())
        claims = {
            "iss": self.issuer,
            "sub": sub,
            "aud": audience,
            "iat": iat,
            "exp": iat + ttl,
            "jti": jti if jti is not None else secrets.token_urlsafe(16),
        }
        if cnf_jwk is not None:
            claims["cnf"] = {"jwk": dict(cnf_jwk)}
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"typ": "JWT", "kid": self._kid})


class DevUserIssuer(DevIssuer):
    """The trial end-user issuer: ``nhi-broker dev user <subject>`` prints its tokens.

    It stands in for an organisation's login (OIDC) on the embedded defaults, so a delegated exchange
    can be tried without one; it is on only while no ``[[user_issuers]]`` are configured. Anyone who
    can read its key file can claim to be any user: never use it in production.
    """

    issuer: str = DEV_USER_ISSUER
    key_file: str = DEV_USER_KEY_FILE

    def __repr__(self) -> str:
        return f"DevUserIssuer(kid={self.kid!r})"

    def user_issuer_config(self, audience: str) -> UserIssuerConfig:
        """A ``UserIssuerConfig`` of kind ``dev`` for this issuer (``user.tenant`` from ``tenant``)."""
        return UserIssuerConfig(
            issuer=self.issuer, audience=audience, kind="dev", algorithms=("ES256",), max_lifetime=3600,
            claims={"tenant": "tenant"},
        )

    def mint_user(
        self,
        subject: str,
        audience: str,
        *,
        ttl: int = 300,
        clock: Clock,
        jti: str | None = None,
        claims: dict[str, Any] | None = None,
    ) -> str:
        """An end-user token for ``subject`` (printable ASCII, no spaces) and ``audience``."""
        if not isinstance(subject, str) or _USER_SUBJECT_RE.fullmatch(subject) is None:
            raise ValueError("subject must be 1..255 printable ASCII characters without spaces")
        if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= _MAX_TTL:
            raise ValueError(f"ttl must be an integer of 1..{_MAX_TTL} seconds")
        iat = int(clock.now())
        body: dict[str, Any] = dict(claims or {})
        body.update({
            "iss": self.issuer, "sub": subject, "aud": audience, "iat": iat, "exp": iat + ttl,
            "jti": jti if jti is not None else secrets.token_urlsafe(16),
        })
        return jwt.encode(body, self._key, algorithm="ES256", headers={"typ": "JWT", "kid": self.kid})
