"""Shared state: :class:`StateStore` and its two backends, chosen by ``Settings.state_backend``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.clock import Clock
from broker.store.base import StateStore

if TYPE_CHECKING:
    from broker.config import Settings

__all__ = ["StateStore", "open_store"]


def open_store(settings: Settings, clock: Clock) -> StateStore:
    """The configured backend: SQLite under ``data_dir`` (default) or Redis at ``redis_url``."""
    if settings.state_backend == "redis":
        from broker.store.redis import RedisStateStore

        return RedisStateStore(settings.redis_url, prefix=settings.redis_prefix, clock=clock)
    from broker.store.sqlite import SqliteStateStore

    return SqliteStateStore(settings.data_dir / "state.sqlite3", clock=clock)
