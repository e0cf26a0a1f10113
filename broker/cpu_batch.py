"""Run one kind of CPU-heavy call back to back: the calls queued during one event-loop turn, in one callback.

The token path's signature work (the identity token's ES256 verification, the task token's
signature) is a few tens of microseconds of OpenSSL each, and costs two to three times that when it
runs between the requests' Python code: its code, its precomputed tables and the branch history are
cold again every time. A :class:`TurnBatch` queues the call and runs every call queued during the
same event-loop turn one after the other in a single ``call_soon`` callback, so all but the first run
warm; the callers are the requests that reached that step together (requests arrive and ledger
appends complete in groups under load). On the 2-core machine this took an exchange from about 610
to 412 µs of process CPU (``scripts/profile_exchange.py``) and from 778 to 567 µs under wrk
(``scripts/bench_exchange.py --connections 32``): the signatures run warm, and the requests then
also run the steps between them in groups.

A call still runs on the event loop thread, exactly once, with the same arguments and the same
result or exception as a direct call; a cancelled caller's queued call is skipped. The cost is one
more event-loop turn per step and one future per call: microseconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["TurnBatch"]

T = TypeVar("T")

_Queued = tuple["asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class TurnBatch:
    """Calls queued by :meth:`run` during one turn of a loop, run together in that loop's next turn.

    One instance per kind of call (verifications apart from signatures: each warms its own code).
    Safe for several loops at once (one queue per loop, e.g. a test's loop in another thread).
    """

    def __init__(self) -> None:
        self._queues: dict[asyncio.AbstractEventLoop, list[_Queued]] = {}

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """``fn(*args)`` queued for this turn's batch; await the future for its result or exception."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        queue = self._queues.get(loop)
        if queue is None:
            queue = self._queues[loop] = []
            loop.call_soon(self._drain, loop)
        queue.append((future, fn, args))
        return future

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        queue = self._queues.pop(loop, [])
        for position, (future, fn, args) in enumerate(queue):
            if future.cancelled():
                continue
            try:
                result = fn(*args)
            except Exception as exc:
                future.set_exception(exc)
            except BaseException:
                # KeyboardInterrupt or SystemExit leaves the loop: the rest still run in a later turn.
                rest = queue[position + 1 :]
                if rest:
                    self._queues.setdefault(loop, []).extend(rest)
                    loop.call_soon(self._drain, loop)
                future.cancel()
                raise
            else:
                future.set_result(result)
