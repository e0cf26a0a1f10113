"""A worker's side of a storage process: calls over its Unix socket, batched per event-loop turn.

:meth:`StorageChannel.call` queues the call and returns its awaited reply. Every call made during one
turn of the event loop leaves in one frame (one ``write``), and the replies of a batch come back in
one frame: no thread, no lock, no hand-off between threads in the worker. A connection serves the
event loop that opened it (a process normally has one); it is opened on first use and again after it
was lost. A call fails with the channel's ``unavailable`` error (the broker answers 503) when the
storage process cannot be reached, drops the connection, reports an error, or does not answer in
``timeout`` seconds; a write may still land after its caller heard that (the safe side for
single-use values, counters and ledger entries).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from typing import Any, cast

from broker.storaged.wire import FrameReader, WireError, encode

__all__ = ["StorageChannel"]

log = logging.getLogger("nhi_broker.storaged")

# How often a connection looks for calls past their deadline: a call fails at most this much late.
_SWEEP_EVERY = 0.1


class _Link(asyncio.Protocol):
    """One connection to the storage process, on one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, unavailable: Callable[[str], Exception],
                 timeout: float) -> None:
        self._loop = loop
        self._unavailable = unavailable
        self._timeout = timeout
        self._transport: asyncio.Transport | None = None
        self._reader = FrameReader()
        # In call order, so the oldest calls come first (dicts keep insertion order); each call's
        # error factory (its channel's, or the call's own).
        self._waiting: dict[int, tuple[asyncio.Future[Any], float, Callable[[str], Exception]]] = {}
        self._outbox: list[tuple[int, str, tuple[Any, ...]]] = []
        self._next_id = 0
        self._sweeping: asyncio.TimerHandle | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._reader.feed(data)
        except WireError:
            log.error("storage process sent a malformed frame: dropping the connection")
            self.abort()
            return
        waiting = self._waiting
        for frame in frames:
            for call_id, ok, value in frame:
                found = waiting.pop(call_id, None)
                if found is None or found[0].done():
                    continue  # its caller gave up
                future = found[0]
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(found[2](str(value)))

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        waiting, self._waiting = self._waiting, {}
        self._outbox.clear()
        if self._sweeping is not None:
            self._sweeping.cancel()
            self._sweeping = None
        for future, _, unavailable in waiting.values():
            if not future.done():
                future.set_exception(unavailable("storage process connection lost"))

    def submit(self, op: str, args: tuple[Any, ...],
               unavailable: Callable[[str], Exception] | None = None) -> tuple[int, asyncio.Future[Any]]:
        call_id = self._next_id
        self._next_id = call_id + 1
        loop = self._loop
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting[call_id] = (future, loop.time() + self._timeout, unavailable or self._unavailable)
        if not self._outbox:
            loop.call_soon(self._flush)
        self._outbox.append((call_id, op, args))
        if self._sweeping is None:
            self._sweeping = loop.call_later(_SWEEP_EVERY, self._sweep)
        return call_id, future

    def forget(self, call_id: int) -> None:
        self._waiting.pop(call_id, None)

    def _sweep(self) -> None:
        """Fail the calls past their deadline (one timer per connection, not one per call)."""
        self._sweeping = None
        now = self._loop.time()
        expired = []
        for call_id, (_, deadline, _) in self._waiting.items():
            if deadline > now:
                break  # the rest are younger
            expired.append(call_id)
        for call_id in expired:
            future = self._waiting.pop(call_id)[0]
            if not future.done():
                future.set_exception(TimeoutError())
        if self._waiting and not self.closed:
            self._sweeping = self._loop.call_later(_SWEEP_EVERY, self._sweep)

    def _flush(self) -> None:
        batch, self._outbox = self._outbox, []
        if not batch or self.closed or self._transport is None:
            return
        try:
            self._transport.write(encode(batch))
        except (WireError, ValueError) as exc:
            # A value marshal cannot carry is a bug in the caller: fail its batch, keep the connection.
            for call_id, _, _ in batch:
                found = self._waiting.pop(call_id, None)
                if found is not None and not found[0].done():
                    found[0].set_exception(found[2](f"storage call not sendable ({type(exc).__name__})"))

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
        else:
            self.connection_lost(None)


class StorageChannel:
    """Calls to one storage process listening on the Unix socket ``path``.

    ``unavailable`` builds the error a failed call raises (:class:`~broker.errors.StoreUnavailable`
    for the state store, :class:`~broker.errors.LedgerUnavailable` for the ledger).
    """

    def __init__(self, path: str, *, timeout: float, unavailable: Callable[[str], Exception]) -> None:
        self._path = path
        self._timeout = timeout
        self._unavailable = unavailable
        self._links: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Link] = weakref.WeakKeyDictionary()
        self._opening: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Future[_Link]] = (
            weakref.WeakKeyDictionary())
        self._closed = False

    async def call(self, op: str, args: tuple[Any, ...], *,
                   unavailable: Callable[[str], Exception] | None = None) -> Any:
        """Run ``op(*args)`` in the storage process; its result, or the ``unavailable`` error (the
        channel's, unless the call names its own: a call that writes two files tells which one failed)."""
        loop = asyncio.get_running_loop()
        link = self._links.get(loop)
        if link is None or link.closed:
            link = await self._open(loop)
        call_id, future = link.submit(op, args, unavailable)
        try:
            return await future  # the link fails it with TimeoutError after ``timeout`` seconds
        except TimeoutError:
            link.forget(call_id)
            log.warning("storage process did not answer within %.1f s: failing closed", self._timeout)
            raise (unavailable or self._unavailable)("storage process did not answer in time") from None
        except asyncio.CancelledError:
            link.forget(call_id)
            raise

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _Link:
        if self._closed:
            raise self._unavailable("storage channel is closed")
        opening = self._opening.get(loop)
        if opening is None:
            opening = loop.create_future()
            self._opening[loop] = opening
            try:
                async with asyncio.timeout(self._timeout):
                    _, link = await loop.create_unix_connection(
                        lambda: _Link(loop, self._unavailable, self._timeout), self._path)
            except BaseException as exc:
                error = self._unavailable(f"storage process unreachable ({type(exc).__name__})")
                opening.set_exception(error)
                opening.exception()  # retrieved here; coroutines waiting on it get it too
                if isinstance(exc, (OSError, TimeoutError)):
                    raise error from None
                raise
            finally:
                self._opening.pop(loop, None)
            self._links[loop] = link
            opening.set_result(link)
            return link
        return await asyncio.shield(opening)

    def close(self) -> None:
        """Drop every connection (calls in flight fail with ``unavailable``); later calls fail too."""
        self._closed = True
        for link in list(self._links.values()):
            link.abort()
        self._links.clear()
