"""The shared-state interface the broker's replicas agree on.

Four primitives cover every shared decision:

- :meth:`StateStore.consume_once` -- single-use values (identity ``jti``, DPoP ``jti``);
- :meth:`StateStore.count_up` -- a bounded counter: N-use task tokens, request rates, value budgets;
- :meth:`StateStore.set_mark` / :meth:`StateStore.get_marks` / :meth:`StateStore.delete_mark` --
  timestamps and flags: revoked ``jti``, revocation cut-offs per workload, end user or conversation,
  suspended workloads;
- :meth:`StateStore.put_record` / :meth:`StateStore.get_record` / :meth:`StateStore.swap_record` /
  :meth:`StateStore.list_records` -- small JSON documents changed by compare-and-swap on a version:
  pending approval requests and console sessions.

:meth:`StateStore.run_checks` applies a sequence of the first two (plus "no live mark") in one round
trip, so the token path's replay, suspension, rate and budget checks cost one store call.

Two implementations keep the same semantics, checked by one shared test suite: SQLite for one
machine (safe across worker processes) and Redis for replicas. Every check-and-update is one atomic
step (one SQL statement or transaction, one Lua script), so racing processes never both win. A store
that cannot answer raises :class:`~broker.errors.StoreUnavailable`, so the broker fails closed.

Every method is a coroutine and never blocks the event loop: Redis through ``redis.asyncio``, SQLite
through one dedicated thread per store (:class:`~broker.serial.SerialExecutor`).

Expiry times are absolute seconds on the broker's clock; a value is gone once ``now >= expires_at``.
``None`` means "until deleted".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Check", "ConsumeOnce", "CountUp", "NoMark", "StateStore", "valid_prefix"]


@dataclass(frozen=True, slots=True)
class ConsumeOnce:
    """Passes on the first use of ``key`` (remembered until ``expires_at``); fails if seen before."""

    namespace: str
    key: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class NoMark:
    """Passes when ``key`` has no live mark (e.g. the workload is not suspended); changes nothing."""

    namespace: str
    key: str


@dataclass(frozen=True, slots=True)
class CountUp:
    """Adds ``amount`` to a counter unless the total would exceed ``limit`` (then fails, unchanged)."""

    namespace: str
    key: str
    amount: int
    limit: int
    expires_at: float


#: One step of :meth:`StateStore.run_checks`.
Check = ConsumeOnce | NoMark | CountUp


def valid_prefix(checks: Sequence[Check]) -> tuple[Sequence[Check], int | None]:
    """The checks a backend must run, and the index that fails without asking it.

    A count that can never pass (negative, or more than its limit) fails where it stands, as
    :meth:`StateStore.count_up` answers ``None`` for it without touching the store.
    """
    for index, check in enumerate(checks):
        if isinstance(check, CountUp) and (check.amount < 0 or check.amount > check.limit):
            return checks[:index], index
    return checks, None


class StateStore(Protocol):
    """Shared state the broker's replicas agree on (every method a coroutine)."""

    async def consume_once(self, namespace: str, key: str, expires_at: float) -> bool:
        """Record ``key`` as used until ``expires_at``; True on first use, False if seen before."""
        ...

    async def count_up(self, namespace: str, key: str, amount: int, limit: int, expires_at: float) -> int | None:
        """Add ``amount`` to a counter unless the total would exceed ``limit``.

        Returns the new total, or ``None`` (and leaves the counter unchanged) when it would exceed the
        limit. A new counter lives until ``expires_at``; adding does not extend it.
        """
        ...

    async def run_checks(self, checks: Sequence[Check]) -> int | None:
        """Apply ``checks`` in order, atomically and in one round trip; stop at the first that fails.

        Returns the index of the failing check (it and the ones after it had no effect; the ones
        before it keep theirs, exactly as separate calls would), or ``None`` when all passed.
        """
        ...

    async def set_mark(self, namespace: str, key: str, value: float, expires_at: float | None) -> None:
        """Set a mark to ``value``, keeping the larger value when one exists (cut-offs only move forward)."""
        ...

    async def get_marks(self, items: Sequence[tuple[str, str]]) -> list[float | None]:
        """The live value of each ``(namespace, key)`` mark, ``None`` where there is none; one round trip."""
        ...

    async def delete_mark(self, namespace: str, key: str) -> bool:
        """Remove a mark; True if one was live."""
        ...

    async def put_record(self, namespace: str, key: str, value: str, expires_at: float) -> bool:
        """Create a record (version 1) unless a live one exists; True if created."""
        ...

    async def get_record(self, namespace: str, key: str) -> tuple[str, int] | None:
        """The live record's ``(value, version)``, or ``None``."""
        ...

    async def swap_record(self, namespace: str, key: str, version: int, value: str, expires_at: float) -> bool:
        """Replace the live record if its version is still ``version`` (it becomes ``version + 1``);
        False if it changed or is gone, so two racing writers never both win."""
        ...

    async def list_records(self, namespace: str, limit: int) -> list[tuple[str, str, int]]:
        """Up to ``limit`` live records of ``namespace`` as ``(key, value, version)``, soonest expiry first."""
        ...

    async def ping(self) -> None:
        """Raise :class:`~broker.errors.StoreUnavailable` unless the store answers."""
        ...

    async def close(self) -> None:
        """Release connections and threads. Idempotent."""
        ...
