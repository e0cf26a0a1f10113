"""The shared-state interface: single-use values (identity ``jti``, later DPoP ``jti``).

Two implementations keep the same semantics: SQLite for one machine (safe across worker processes)
and Redis for replicas. A store that cannot answer raises :class:`~broker.errors.StoreUnavailable`,
so the broker fails closed.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["StateStore"]


class StateStore(Protocol):
    """Shared state the broker's replicas agree on."""

    def consume_once(self, namespace: str, key: str, expires_at: float) -> bool:
        """Record ``key`` as used until ``expires_at``; True on first use, False if seen before."""
        ...

    def ping(self) -> None:
        """Raise :class:`~broker.errors.StoreUnavailable` unless the store answers."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...
