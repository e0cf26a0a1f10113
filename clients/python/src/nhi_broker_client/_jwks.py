"""The broker's public keys (RFC 7517 JWKS), cached, refetched on an unknown ``kid`` (rate limited)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import httpx

from ._errors import InvalidTokenError, KeysUnavailableError
from ._jose import SECRET_MEMBERS, public_key_from_jwk

__all__ = ["JwksCache"]

_MAX_JWKS_BYTES = 64 * 1024


class JwksCache:
    """Keys by ``kid`` from ``url``: trusted for ``cache_ttl`` s; an unknown ``kid`` refetches at most once
    per ``refresh_min_interval`` s (a flood of random ``kid`` values cannot hammer the broker); a failed
    fetch keeps a still-valid cache, and with nothing valid raises :class:`KeysUnavailableError`."""

    def __init__(
        self,
        url: str,
        client: httpx.Client,
        *,
        algorithms: tuple[str, ...],
        clock: Callable[[], float],
        cache_ttl: float = 300.0,
        refresh_min_interval: float = 30.0,
    ) -> None:
        self._url = url
        self._client = client
        self._algorithms = algorithms
        self._clock = clock
        self._ttl = cache_ttl
        self._min_interval = refresh_min_interval
        self._keys: dict[str, tuple[str, Any]] = {}
        self._fetched_at: float | None = None
        self._last_attempt: float | None = None
        self._lock = threading.Lock()

    def get(self, kid: str, alg: str) -> Any:
        """The public key for ``kid`` usable with ``alg``, or raise."""
        now = self._clock()
        if self._fetched_at is None or now - self._fetched_at >= self._ttl:
            self._refresh(now, unknown_kid=False)
        entry = self._keys.get(kid)
        if entry is None:
            self._refresh(now, unknown_kid=True)  # (rotation) a key published since we last looked
            entry = self._keys.get(kid)
        if entry is None:
            raise InvalidTokenError("no broker key matches the token's kid")
        key_alg, key = entry
        if key_alg != alg:
            raise InvalidTokenError("the token's alg does not match its key")
        return key

    def _refresh(self, now: float, *, unknown_kid: bool) -> None:
        with self._lock:
            valid = self._fetched_at is not None and now - self._fetched_at < self._ttl
            if valid and not unknown_kid:
                return
            if self._last_attempt is not None and now - self._last_attempt < self._min_interval:
                if valid:
                    return
                raise KeysUnavailableError("broker keys unavailable")
            self._last_attempt = now
            try:
                keys = self._fetch()
            except (httpx.HTTPError, ValueError):
                if valid:
                    return
                raise KeysUnavailableError("broker keys unavailable") from None
            self._keys, self._fetched_at = keys, now

    def _fetch(self) -> dict[str, tuple[str, Any]]:
        with self._client.stream("GET", self._url, headers={"Accept": "application/json"}) as response:
            if response.status_code != 200:
                raise ValueError("JWKS fetch failed")
            body = b""
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > _MAX_JWKS_BYTES:
                    raise ValueError("JWKS too large")
        document = json.loads(body)
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise ValueError("not a JWKS")
        keys: dict[str, tuple[str, Any]] = {}
        for entry in entries:
            if not isinstance(entry, dict) or SECRET_MEMBERS & set(entry):
                raise ValueError("JWKS with private key material")  # refuse the whole set
            kid, alg = entry.get("kid"), entry.get("alg")
            if not isinstance(kid, str) or alg not in self._algorithms or entry.get("use", "sig") != "sig":
                continue
            try:
                keys[kid] = (alg, public_key_from_jwk(entry, alg))
            except ValueError:
                continue
        return keys
