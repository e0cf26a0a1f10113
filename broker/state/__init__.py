"""Shared state: what every broker replica must agree on, and the stores that keep it.

- :mod:`broker.state.store`: the :class:`StateStore` interface and its atomic check steps;
  backends :mod:`broker.state.sqlite` (embedded default, one dedicated thread per store) and
  :mod:`broker.state.redis` (``redis.asyncio``), chosen by :func:`open_store`;
- :mod:`broker.state.tokens`: revocation, suspension and use counts (:class:`~broker.state.tokens.TokenState`);
- :mod:`broker.state.guard`: replay, suspension, request rates and value budgets at issuance, in one
  store round trip (:class:`~broker.state.guard.IssuanceGuard`);
- :mod:`broker.state.introspection`: RFC 7662 introspection and RFC 7009 revocation;
- :mod:`broker.state.services`: the services of one process (:class:`~broker.state.services.StateServices`).

Every store method is a coroutine: no store call ever blocks the event loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.clock import Clock
from broker.state.store import Check, ConsumeOnce, CountUp, NoMark, StateStore

if TYPE_CHECKING:
    from broker.config import Settings

__all__ = ["Check", "ConsumeOnce", "CountUp", "NoMark", "StateStore", "open_store"]


def open_store(settings: Settings, clock: Clock) -> StateStore:
    """The configured backend: SQLite under ``data_dir`` (default) or Redis at ``redis_url``."""
    if settings.state_backend == "redis":
        from broker.state.redis import RedisStateStore

        return RedisStateStore(settings.redis_url, prefix=settings.redis_prefix, clock=clock)
    from broker.state.sqlite import SqliteStateStore

    return SqliteStateStore(settings.data_dir / "state.sqlite3", clock=clock)
