"""The broker's own Vault identity: a token from a file or an AppRole login, kept fresh.

The token is renewed when two thirds of its TTL have passed (or AppRole logs in again when it
cannot be renewed). A token without TTL (``ttl 0``) is used as is. The token never leaves this
object: no log line, no error text.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import hvac

from broker.clock import Clock, SystemClock
from broker.errors import ConfigError

from .errors import VaultRefused, VaultUnavailable, vault_errors
from .settings import VaultSettings

__all__ = ["VaultIdentity"]

log = logging.getLogger("nhi_broker.vault")


def _read_secret_file(path: Path, what: str) -> str:
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc.strerror}") from None
    if not value or any(c.isspace() for c in value):
        raise ConfigError(f"{what} file {path} must hold exactly one value")
    return value


class VaultIdentity:
    """Holds an authenticated :class:`hvac.Client` for the broker; :meth:`client` renews as needed."""

    def __init__(self, settings: VaultSettings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        verify: bool | str = str(settings.ca_cert) if settings.ca_cert else True
        self._client = hvac.Client(url=settings.addr, timeout=settings.timeout, verify=verify)
        self._lock = threading.Lock()
        self._obtained_at = 0.0
        self._ttl = 0
        self._renewable = False
        self._logged_in = False

    def client(self) -> hvac.Client:
        """An authenticated client; logs in or renews first when due.

        A refused login or renewal is :class:`VaultUnavailable` (503): the broker's own identity is
        broken, which no client request can fix.
        """
        try:
            return self._client_locked()
        except VaultRefused as exc:
            raise VaultUnavailable(exc.description) from None

    def _client_locked(self) -> hvac.Client:
        # One login at a time; a call that waits longer than one Vault request for it fails (503)
        # instead of queueing behind a login that hangs.
        if not self._lock.acquire(timeout=self.settings.timeout):
            raise VaultUnavailable("the broker's Vault login is not answering")
        try:
            if not self._logged_in:
                self._login()
            elif self._ttl and self.clock.now() - self._obtained_at >= self._ttl * 2 / 3:
                self._refresh()
            return self._client
        finally:
            self._lock.release()

    def _login(self) -> None:
        s = self.settings
        with vault_errors("login of the broker's own Vault identity"):
            if s.token_file is not None:
                self._client.token = _read_secret_file(s.token_file, "vault token")
                data = self._client.auth.token.lookup_self()["data"]
                self._set(int(data.get("ttl") or 0), bool(data.get("renewable")))
            else:
                assert s.approle_role_id is not None and s.approle_secret_id_file is not None
                secret_id = _read_secret_file(s.approle_secret_id_file, "AppRole secret id")
                auth = self._client.auth.approle.login(s.approle_role_id, secret_id, mount_point=s.approle_mount)
                self._set(int(auth["auth"]["lease_duration"]), bool(auth["auth"]["renewable"]))
        self._logged_in = True
        log.info("vault identity ready (ttl %ss, renewable %s)", self._ttl, self._renewable)

    def _refresh(self) -> None:
        expired = self.clock.now() >= self._obtained_at + self._ttl
        if self._renewable and not expired:
            try:
                with vault_errors("renewal of the broker's own Vault token"):
                    auth = self._client.auth.token.renew_self()["auth"]
                self._set(int(auth["lease_duration"]), bool(auth["renewable"]))
                return
            except VaultRefused:
                log.warning("vault token renewal refused; logging in again")
        # Expired, not renewable, or renewal refused: log in again (a token file is re-read:
        # whoever rotates it writes a new one).
        self._logged_in = False
        self._login()

    def _set(self, ttl: int, renewable: bool) -> None:
        self._obtained_at = self.clock.now()
        self._ttl = ttl
        self._renewable = renewable

    def close(self) -> None:
        """Release the HTTP session."""
        self._client.adapter.close()
