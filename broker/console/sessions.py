"""Console sessions in the shared state store: any broker process serves any logged-in operator.

The cookie carries 256 random bits; the store keeps only their SHA-256 (a leaked store does not
yield usable cookies) with the operator and the session's CSRF token. Sessions end after a fixed
lifetime or at logout.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass

from broker.clock import Clock
from broker.operators import Operator
from broker.state.store import StateStore

__all__ = ["ConsoleSession", "ConsoleSessions"]

NAMESPACE = "console-session"


@dataclass(frozen=True)
class ConsoleSession:
    """A logged-in operator and the CSRF token its forms must echo."""

    operator: Operator
    csrf: str
    expires_at: float

    def csrf_ok(self, presented: str | None) -> bool:
        """True if ``presented`` is this session's CSRF token (constant-time comparison)."""
        return presented is not None and hmac.compare_digest(presented.encode(), self.csrf.encode())


def _key(cookie: str) -> str:
    return hashlib.sha256(cookie.encode("utf-8")).hexdigest()


class ConsoleSessions:
    """Create, find and end console sessions."""

    def __init__(self, store: StateStore, clock: Clock, lifetime_seconds: int) -> None:
        self._store = store
        self._clock = clock
        self.lifetime = lifetime_seconds

    async def create(self, operator: Operator) -> tuple[str, ConsoleSession]:
        """A new session for ``operator``: ``(cookie value, session)``."""
        cookie = secrets.token_urlsafe(32)
        session = ConsoleSession(operator, secrets.token_urlsafe(32), self._clock.now() + self.lifetime)
        value = json.dumps({"name": operator.name, "role": operator.role, "method": operator.method,
                            "groups": list(operator.groups), "csrf": session.csrf})
        await self._store.put_record(NAMESPACE, _key(cookie), value, session.expires_at)
        return cookie, session

    async def find(self, cookie: str | None) -> ConsoleSession | None:
        """The live session of ``cookie``, or ``None``."""
        if not cookie or len(cookie) > 128:
            return None
        found = await self._store.get_record(NAMESPACE, _key(cookie))
        if found is None:
            return None
        data = json.loads(found[0])
        operator = Operator(name=data["name"], role=data["role"], method=data["method"],
                            groups=tuple(data["groups"]))
        return ConsoleSession(operator, data["csrf"], 0.0)

    async def end(self, cookie: str | None) -> None:
        """End the session (it expires at once)."""
        if not cookie or len(cookie) > 128:
            return
        key = _key(cookie)
        found = await self._store.get_record(NAMESPACE, key)
        if found is not None:
            await self._store.swap_record(NAMESPACE, key, found[1], found[0], self._clock.now()
            )
