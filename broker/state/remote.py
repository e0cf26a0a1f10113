"""The SQLite state store of a worker of ``nhi-broker serve``: its storage process, over a Unix socket.

Same file, same operations and the same answers as :class:`~broker.state.sqlite.SqliteStateStore`
(the storage process runs :data:`broker.state.sqlite.OPERATIONS`), but the writes of every worker are
committed together by one process (:mod:`broker.storaged`), and a worker spends no thread on them.
Each call carries the worker's clock time, so expiry is judged as the worker sees it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from broker.clock import Clock, SystemClock
from broker.errors import StoreUnavailable
from broker.state.store import Check, ConsumeOnce, valid_prefix
from broker.storaged.client import StorageChannel
from broker.storaged.handlers import checks_to_wire

__all__ = ["RemoteStateStore"]


class RemoteStateStore:
    """A :class:`~broker.state.store.StateStore` served by the state storage process at ``socket_path``.

    A call that the storage process cannot answer within ``timeout`` seconds fails closed
    (:class:`~broker.errors.StoreUnavailable`)."""

    def __init__(self, socket_path: str, clock: Clock | None = None, *, timeout: float = 1.25) -> None:
        self._clock = clock or SystemClock()
        self._channel = StorageChannel(socket_path, timeout=timeout, unavailable=_unavailable)

    async def _call(self, op: str, *args: Any) -> Any:
        return await self._channel.call(op, (self._clock.now(), *args))

    async def consume_once(self, namespace: str, key: str, expires_at: float) -> bool:
        return await self.run_checks([ConsumeOnce(namespace, key, expires_at)]) is None

    async def count_up(self, namespace: str, key: str, amount: int, limit: int, expires_at: float) -> int | None:
        if amount < 0 or amount > limit:
            return None
        result: int | None = await self._call("count_up", namespace, key, int(amount), int(limit), float(expires_at))
        return result

    async def run_checks(self, checks: Sequence[Check]) -> int | None:
        todo, failed = valid_prefix(checks)
        if not todo:
            return failed
        result: int | None = await self._call("run_checks", checks_to_wire(todo), failed)
        return result

    async def set_mark(self, namespace: str, key: str, value: float, expires_at: float | None) -> None:
        await self._call("set_mark", namespace, key, float(value), None if expires_at is None else float(expires_at))

    async def get_marks(self, items: Sequence[tuple[str, str]]) -> list[float | None]:
        if not items:
            return []
        result: list[float | None] = await self._call("get_marks", [(ns, key) for ns, key in items])
        return result

    async def delete_mark(self, namespace: str, key: str) -> bool:
        return bool(await self._call("delete_mark", namespace, key))

    async def put_record(self, namespace: str, key: str, value: str, expires_at: float) -> bool:
        return bool(await self._call("put_record", namespace, key, value, float(expires_at)))

    async def get_record(self, namespace: str, key: str) -> tuple[str, int] | None:
        result = await self._call("get_record", namespace, key)
        return None if result is None else (str(result[0]), int(result[1]))

    async def swap_record(self, namespace: str, key: str, version: int, value: str, expires_at: float) -> bool:
        return bool(await self._call("swap_record", namespace, key, int(version), value, float(expires_at)))

    async def list_records(self, namespace: str, limit: int) -> list[tuple[str, str, int]]:
        rows = await self._call("list_records", namespace, int(limit))
        return [(str(k), str(v), int(n)) for k, v, n in rows]

    async def ping(self) -> None:
        await self._call("ping")

    async def close(self) -> None:
        self._channel.close()

    def close_now(self) -> None:
        """:meth:`close` for synchronous shutdown code."""
        self._channel.close()


def _unavailable(reason: str) -> StoreUnavailable:
    return StoreUnavailable(reason if reason.startswith("state store") else f"state store unavailable: {reason}")
