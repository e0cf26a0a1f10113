"""Token state shared by all replicas: revocations, scoped cut-offs, suspensions and use counts.

Revoking "every live token of a workload, an end user or a conversation" writes one cut-off time per
scope instead of tracking every token: a token is inactive when its ``iat`` is at or before the
cut-off of its workload (``client_id``), its end user (the verified user of a delegated token, its
``sub_id``; otherwise the intent context's ``customer``) or its conversation (intent context
``conversation``). ``iat`` has one-second precision, so a token issued in the same second as a
cut-off is inactive too: the safe side. A cut-off is kept for
:data:`CUTOFF_LIFETIME`, longer than any token may live (``MAX_TTL``).

There is no per-process cache: every check reads the store (one ``MGET`` on Redis, one read
transaction on SQLite), so a suspension is visible to every replica on its next request. On Redis
each action is also published on ``<prefix>events`` for verifier caches outside the broker.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from broker.clock import Clock
from broker.policy import MAX_TTL
from broker.state.store import NoMark, StateStore

__all__ = ["CUTOFF_LIFETIME", "SCOPES", "TokenState", "TokenStatus", "token_scopes"]

CUTOFF_LIFETIME = MAX_TTL + 3600
#: Revocation scopes and where a token names them: its client_id, or a key of its intent context.
SCOPES = ("workload", "end_user", "conversation")
_NS_REVOKED = "revoked-jti"
_NS_CUTOFF = "revoked-before"
_NS_SUSPENDED = "suspended"
_NS_USES = "token-uses"


def token_scopes(claims: Mapping[str, Any]) -> dict[str, str]:
    """The revocation scopes a task token belongs to, from its verified claims.

    The end user is the *verified* one when the token has one (``sub_id``, a delegated exchange),
    else the intent context's ``customer`` (the bot's assertion).
    """
    scopes = {"workload": str(claims.get("client_id", ""))}
    details = claims.get("authorization_details")
    context = details[0].get("context", {}) if isinstance(details, list) and details else {}
    sub_id = claims.get("sub_id")
    if isinstance(sub_id, dict) and isinstance(sub_id.get("sub"), str):
        scopes["end_user"] = sub_id["sub"]
    if isinstance(context, dict):
        if "end_user" not in scopes and isinstance(context.get("customer"), str):
            scopes["end_user"] = context["customer"]
        if isinstance(context.get("conversation"), str):
            scopes["conversation"] = context["conversation"]
    return scopes


@dataclass(frozen=True, slots=True)
class TokenStatus:
    """Whether a verified token is live; ``reason`` says why not (for logs, never for the caller)."""

    active: bool
    reason: str = ""
    uses: int | None = None  # the use this introspection consumed, for N-use tokens


class TokenState:
    """Revocation, suspension and use counting on a :class:`StateStore`."""

    def __init__(self, store: StateStore, clock: Clock) -> None:
        self._store = store
        self._clock = clock

    async def _publish(self, event: dict[str, Any]) -> None:
        publish = getattr(self._store, "publish", None)
        if publish is not None:
            await publish("events", json.dumps(event, separators=(",", ":"), sort_keys=True))

    async def revoke_token(self, jti: str, expires_at: float) -> None:
        """Revoke one token until it expires anyway."""
        await self._store.set_mark(_NS_REVOKED, jti, 1.0, expires_at)
        await self._publish({"kind": "revocation", "scope": "token", "jti": jti})

    async def revoke_scope(self, scope: str, value: str) -> float:
        """Every token of ``scope`` = ``value`` issued until now becomes inactive; returns the cut-off."""
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}")
        now = self._clock.now()
        await self._store.set_mark(_NS_CUTOFF, f"{scope}\x00{value}", now, now + CUTOFF_LIFETIME)
        await self._publish({"kind": "revocation", "scope": scope, "value": value, "before": now})
        return now

    async def suspend(self, workload: str) -> float:
        """Kill switch: nothing is issued to ``workload`` and its live tokens are inactive."""
        now = self._clock.now()
        await self._store.set_mark(_NS_SUSPENDED, workload, now, None)
        # The cut-off keeps the tokens inactive after a resume.
        await self._store.set_mark(_NS_CUTOFF, f"workload\x00{workload}", now, now + CUTOFF_LIFETIME)
        await self._publish({"kind": "suspension", "workload": workload, "suspended": True, "at": now})
        return now

    async def resume(self, workload: str) -> bool:
        """Lift a suspension (tokens from before it stay inactive). True if it was suspended."""
        was = await self._store.delete_mark(_NS_SUSPENDED, workload)
        await self._publish({"kind": "suspension", "workload": workload, "suspended": False})
        return was

    @staticmethod
    def not_suspended(workload: str) -> NoMark:
        """The store check that passes while ``workload`` is not suspended (for one-trip admission)."""
        return NoMark(_NS_SUSPENDED, workload)

    async def suspended_since(self, workload: str) -> float | None:
        """When ``workload`` was suspended, or ``None``."""
        return (await self._store.get_marks([(_NS_SUSPENDED, workload)]))[0]

    async def workload_status(self, workload: str) -> dict[str, float | None]:
        """Suspension time and revocation cut-off of ``workload`` (for the admin API)."""
        return (await self.workloads_status([workload]))[workload]

    async def workloads_status(self, workloads: list[str]) -> dict[str, dict[str, float | None]]:
        """:meth:`workload_status` of several workloads in one store round trip."""
        items = [item for w in workloads for item in ((_NS_SUSPENDED, w), (_NS_CUTOFF, f"workload\x00{w}"))]
        marks = await self._store.get_marks(items)
        return {
            w: {"suspended_since": marks[2 * i], "revoked_before": marks[2 * i + 1]} for i, w in enumerate(workloads)
        }

    async def status(self, claims: Mapping[str, Any], *, consume_use: bool) -> TokenStatus:
        """Whether the verified ``claims`` are live; consumes one use of an N-use token when asked.

        A use is consumed only once every other check passed, so an inactive token wastes nothing.
        """
        jti = str(claims["jti"])
        scopes = token_scopes(claims)
        items = [(_NS_REVOKED, jti), (_NS_SUSPENDED, scopes["workload"])]
        items += [(_NS_CUTOFF, f"{scope}\x00{value}") for scope, value in scopes.items()]
        revoked, suspended, *cutoffs = await self._store.get_marks(items)
        if revoked is not None:
            return TokenStatus(False, "revoked")
        if suspended is not None:
            return TokenStatus(False, "workload suspended")
        iat = int(claims["iat"])
        for (scope, _), cutoff in zip(scopes.items(), cutoffs, strict=True):
            if cutoff is not None and iat <= cutoff:
                return TokenStatus(False, f"{scope} revoked")
        max_uses = claims.get("num_uses")
        if max_uses is None or not consume_use:
            return TokenStatus(True)
        used = await self._store.count_up(_NS_USES, jti, 1, int(max_uses), float(claims["exp"]))
        if used is None:
            return TokenStatus(False, "uses exhausted")
        return TokenStatus(True, uses=used)
