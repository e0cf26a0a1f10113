"""The SQLite state store of a worker of ``nhi-broker serve``: its storage process, over a Unix socket.

Same file, same operations and the same answers as :class:`~broker.state.sqlite.SqliteStateStore`
(the storage process runs :data:`broker.state.sqlite.OPERATIONS`), but the writes of every worker are
committed together by one process (:mod:`broker.storaged`), and a worker spends no thread on them.
Each call carries the worker's clock time, so expiry is judged as the worker sees it.
"""

from __future__ import annotations

from typing import Any

from broker.clock import Clock, SystemClock
from broker.errors import StoreUnavailable
from broker.state.sqlite import SqliteOperations
from broker.storaged.client import StorageChannel
from broker.storaged.handlers import checks_to_wire

__all__ = ["RemoteStateStore"]


class RemoteStateStore(SqliteOperations):
    """A :class:`~broker.state.store.StateStore` served by the state storage process at ``socket_path``.

    A call that the storage process cannot answer within ``timeout`` seconds fails closed
    (:class:`~broker.errors.StoreUnavailable`)."""

    def __init__(self, socket_path: str, clock: Clock | None = None, *, timeout: float = 1.25) -> None:
        self._clock = clock or SystemClock()
        self._channel = StorageChannel(socket_path, timeout=timeout, unavailable=_unavailable)

    async def _call(self, op: str, *args: Any) -> Any:
        if op == "run_checks":  # the check steps travel as plain tuples
            args = (checks_to_wire(args[0]), *args[1:])
        return await self._channel.call(op, (self._clock.now(), *args))

    async def close(self) -> None:
        self._channel.close()

    def close_now(self) -> None:
        """:meth:`close` for synchronous shutdown code."""
        self._channel.close()


def _unavailable(reason: str) -> StoreUnavailable:
    return StoreUnavailable(reason if reason.startswith("state store") else f"state store unavailable: {reason}")
