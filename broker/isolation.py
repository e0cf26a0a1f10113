"""Isolated backends: each blocking dependency gets its own threads, and a deadline.

A :class:`Lane` is a small thread pool of its own for one backend (Vault, the lease book, one
issuer's JWKS, ledger reads). The event loop hands a blocking call to the lane and awaits it; it
never runs the call itself and never waits on anyio's shared thread pool, so a backend that hangs
fills only its own lane: requests that need it fail closed with 503 ``temporarily_unavailable``
after the lane's ``timeout``, and every other request, ``/healthz`` included, is served as before.

Why not anyio's ``to_thread.run_sync(limiter=...)``: a caller that gives up (its deadline passed)
would give its token back while its thread is still blocked in the backend, so a hanging backend
could grow the number of blocked threads without bound. A lane's slot is held until the call
really returns (the backend client's own timeout bounds that), and a call still queued when its
caller gives up is never started.

:class:`Lanes` holds the lanes of one broker process (sizes and deadlines from settings).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from broker.errors import TemporarilyUnavailable

__all__ = ["Lane", "LaneUnavailable", "Lanes"]

_T = TypeVar("_T")
_P = ParamSpec("_P")


class LaneUnavailable(TemporarilyUnavailable):
    """A backend's lane is full or its call missed the deadline: nothing was done for this request (503)."""


class Lane:
    """Runs blocking calls of one backend on ``capacity`` threads of its own, each within ``timeout``.

    At most ``capacity`` calls run and ``capacity * queue_factor`` more wait; beyond that a call
    fails at once (the backend is clearly not keeping up). Counters live on the event loop only.
    """

    def __init__(self, name: str, capacity: int, timeout: float, *, queue_factor: int = 4) -> None:
        if capacity < 1 or timeout <= 0:
            raise ValueError("a lane needs capacity >= 1 and a positive timeout")
        self.name = name
        self.capacity = capacity
        self.timeout = timeout
        self._limit = capacity * (1 + queue_factor)
        self._pool = ThreadPoolExecutor(max_workers=capacity, thread_name_prefix=f"lane-{name}")
        self._pending = 0

    @property
    def pending(self) -> int:
        """Calls handed to this lane that have not returned yet (running or waiting)."""
        return self._pending

    async def run(self, func: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """``func(*args, **kwargs)`` on a thread of this lane; :class:`LaneUnavailable` past the deadline.

        Cancelling the caller (or its deadline) skips a call that has not started; a started call
        finishes on its thread and keeps its slot until then.
        """
        if self._pending >= self._limit:
            raise LaneUnavailable(f"{self.name} is not answering (too many calls waiting)")
        loop = asyncio.get_running_loop()
        try:
            future: Future[_T] = self._pool.submit(functools.partial(func, *args, **kwargs))
        except RuntimeError:  # shut down
            raise LaneUnavailable(f"{self.name} is closed") from None
        self._pending += 1
        future.add_done_callback(lambda _: _call_soon(loop, self._finished))
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout)
        except TimeoutError:
            raise LaneUnavailable(f"{self.name} did not answer within {self.timeout:g} s") from None

    def _finished(self) -> None:
        self._pending -= 1

    def close(self) -> None:
        """Stop taking calls; calls not started are dropped, running ones end on their own."""
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class Lanes:
    """The lanes of one broker process. JWKS sources and webhooks bound themselves (one fetch per
    issuer in flight; a cap on deliveries in flight), so they have no lane here."""

    #: Ledger reads off the write path: proofs, entries, tiles, checkpoints, readiness, /metrics.
    ledger: Lane

    @classmethod
    def create(cls, *, ledger_capacity: int = 4, ledger_timeout: float = 30.0) -> Lanes:
        """The lanes with these sizes and deadlines (``ledger_read_threads``, ``ledger_read_timeout``)."""
        return cls(ledger=Lane("ledger reads", ledger_capacity, ledger_timeout))

    def close(self) -> None:
        """Close every lane."""
        self.ledger.close()


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:
        pass  # the loop is closed: nobody counts any more

