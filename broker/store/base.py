"""The shared-state interface the broker's replicas agree on.

Four primitives cover every shared decision:

- :meth:`StateStore.consume_once` -- single-use values (identity ``jti``, later DPoP ``jti``);
- :meth:`StateStore.count_up` -- a bounded counter: N-use task tokens, request rates, value budgets;
- :meth:`StateStore.set_mark` / :meth:`StateStore.get_marks` / :meth:`StateStore.delete_mark` --
  timestamps and flags: revoked ``jti``, revocation cut-offs per workload, end user or conversation,
  suspended workloads;
- :meth:`StateStore.put_record` / :meth:`StateStore.get_record` / :meth:`StateStore.swap_record` /
  :meth:`StateStore.list_records` -- small JSON documents changed by compare-and-swap on a version:
  pending approval requests and console sessions.

Two implementations keep the same semantics, checked by one shared test suite: SQLite for one
machine (safe across worker processes) and Redis for replicas. Every check-and-update is one atomic
step (one SQL statement, one Lua script), so racing processes never both win. A store that cannot
answer raises :class:`~broker.errors.StoreUnavailable`, so the broker fails closed.

Expiry times are absolute seconds on the broker's clock; a value is gone once ``now >= expires_at``.
``None`` means "until deleted".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ["StateStore"]


class StateStore(Protocol):
    """Shared state the broker's replicas agree on."""

    def consume_once(self, namespace: str, key: str, expires_at: float) -> bool:
        """Record ``key`` as used until ``expires_at``; True on first use, False if seen before."""
        ...

    def count_up(self, namespace: str, key: str, amount: int, limit: int, expires_at: float) -> int | None:
        """Add ``amount`` to a counter unless the total would exceed ``limit``.

        Returns the new total, or ``None`` (and leaves the counter unchanged) when it would exceed the
        limit. A new counter lives until ``expires_at``; adding does not extend it.
        """
        ...

    def set_mark(self, namespace: str, key: str, value: float, expires_at: float | None) -> None:
        """Set a mark to ``value``, keeping the larger value when one exists (cut-offs only move forward)."""
        ...

    def get_marks(self, items: Sequence[tuple[str, str]]) -> list[float | None]:
        """The live value of each ``(namespace, key)`` mark, ``None`` where there is none; one round trip."""
        ...

    def delete_mark(self, namespace: str, key: str) -> bool:
        """Remove a mark; True if one was live."""
        ...

    def put_record(self, namespace: str, key: str, value: str, expires_at: float) -> bool:
        """Create a record (version 1) unless a live one exists; True if created."""
        ...

    def get_record(self, namespace: str, key: str) -> tuple[str, int] | None:
        """The live record's ``(value, version)``, or ``None``."""
        ...

    def swap_record(self, namespace: str, key: str, version: int, value: str, expires_at: float) -> bool:
        """Replace the live record if its version is still ``version`` (it becomes ``version + 1``);
        False if it changed or is gone, so two racing writers never both win."""
        ...

    def list_records(self, namespace: str, limit: int) -> list[tuple[str, str, int]]:
        """Up to ``limit`` live records of ``namespace`` as ``(key, value, version)``, soonest expiry first."""
        ...

    def ping(self) -> None:
        """Raise :class:`~broker.errors.StoreUnavailable` unless the store answers."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...
