"""One dedicated thread per blocking resource, driven from the event loop.

A :class:`SerialExecutor` owns one thread and runs the jobs given to it in order. The event loop
hands a job over through a queue and awaits an asyncio future the thread settles, so neither the
loop nor anyio's shared thread pool ever waits on the resource (a SQLite file another process holds
locked, a disk that stalls): only callers of that one resource wait, and only for ``timeout``.

Group execution. The thread takes every job that queued while it was busy as one group and hands
the group to a *runner* (by default: each job in turn), which may run it as one unit of work (the
SQLite state store commits a group in one transaction). The waiting coroutines of a group are
resumed with one hand-over to their event loop, not one per job, which keeps the per-job cost on
the loop small under load. This is the pattern of the ledger's writer thread (:mod:`broker.ledger.log`).

A job whose caller gave up before the runner reached it is skipped (the caller was told
"unavailable"); a job already running finishes, so a write may land after its caller heard 503: the
safe side for the single-use values, counters and marks this serves.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from queue import Empty, SimpleQueue
from typing import Any, TypeVar

__all__ = ["ExecutorClosed", "Failed", "Pending", "Runner", "SerialExecutor"]

_T = TypeVar("_T")
_STOP = object()


class ExecutorClosed(RuntimeError):
    """The executor was closed; no more jobs run."""


class Failed:
    """A runner's outcome for a job that raised ``error`` (delivered to its caller as that exception)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Pending:
    """One queued job and whoever waits for it: a thread (``future``) or a coroutine (``waiter``)."""

    __slots__ = ("claimed", "direct", "future", "job", "loop", "waiter")

    def __init__(self, job: Any, future: Future[Any] | None, waiter: asyncio.Future[Any] | None = None,
                 loop: asyncio.AbstractEventLoop | None = None, *, direct: bool = False) -> None:
        self.job = job
        self.future = future
        self.waiter = waiter
        self.loop = loop
        self.direct = direct  # run by the thread itself (start-up, closing), never by the runner
        self.claimed = False

    def claim(self) -> bool:
        """Call right before running the job: False if its caller gave up (then do not run it)."""
        if self.future is not None:
            # Once RUNNING, a concurrent future can no longer be cancelled, so settling it cannot fail.
            self.claimed = self.future.set_running_or_notify_cancel()
        else:
            # Read from the executor's thread: a cancel racing with this check only costs one job run
            # for a caller that already heard "unavailable" (the documented safe side).
            self.claimed = self.waiter is not None and not self.waiter.cancelled()
        return self.claimed


#: Runs a group of jobs on the executor's thread: claims each (:meth:`Pending.claim`) right before
#: running it and returns one outcome per job, in order (a :class:`Failed` for an exception; any
#: value for a job it did not claim). It must not raise: an exception fails every claimed job.
Runner = Callable[[Sequence[Pending]], Sequence[object]]


def _each(group: Sequence[Pending]) -> list[object]:
    """The default runner: every job on its own."""
    outcomes: list[object] = []
    for pending in group:
        if not pending.claim():
            outcomes.append(None)
            continue
        try:
            outcomes.append(pending.job())
        except BaseException as exc:  # delivered to the caller, never kills the thread
            outcomes.append(Failed(exc))
    return outcomes


def _settle(outcomes: list[tuple[asyncio.Future[Any], object]]) -> None:
    """On the event loop: hand each waiting coroutine its result or error (one call per group)."""
    for waiter, outcome in outcomes:
        if waiter.done():  # timed out or cancelled meanwhile
            continue
        if isinstance(outcome, Failed):
            waiter.set_exception(outcome.error)
        else:
            waiter.set_result(outcome)


class SerialExecutor:
    """Runs jobs one group at a time on its own daemon thread (``name`` shows in thread dumps).

    ``runner`` runs each group (see :data:`Runner`); ``max_group`` bounds a group's size.
    """

    def __init__(self, name: str, *, runner: Runner | None = None, max_group: int = 256) -> None:
        if max_group < 1:
            raise ValueError("max_group must be at least 1")
        self._queue: SimpleQueue[Any] = SimpleQueue()
        self._runner: Runner = runner or _each
        self._max_group = max_group
        self._closed = False
        self._state_lock = threading.Lock()  # taken only to enqueue: never held while a job runs
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Jobs handed over and not yet taken by the thread (a snapshot: the thread may take one now)."""
        return self._queue.qsize()

    def submit(self, job: Callable[[], _T]) -> Future[_T]:
        """Queue ``job`` to run on its own (not through the runner); its future completes with the
        job's result or exception."""
        future: Future[_T] = Future()
        with self._state_lock:
            if self._closed:
                raise ExecutorClosed("executor is closed")
            self._queue.put(Pending(job, future, direct=True))
        return future

    async def run(self, job: Any, timeout: float | None) -> Any:
        """Hand ``job`` to the runner and await its outcome; :class:`TimeoutError` after ``timeout`` seconds.

        On timeout (or cancellation) a job that has not started yet is skipped. Takes no thread lock
        (it runs on the event loop): the job is queued, then dropped again if the executor closed.
        """
        if self._closed:
            raise ExecutorClosed("executor is closed")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        self._queue.put(Pending(job, None, waiter, loop))
        if self._closed:
            waiter.cancel()  # queued behind the stop marker, or skipped by the thread: never run
            raise ExecutorClosed("executor is closed")
        async with asyncio.timeout(timeout):
            return await waiter

    def call(self, job: Callable[[], _T]) -> _T:
        """Run ``job`` on the thread and block until it is done: for start-up and CLI code, never the loop."""
        return self.submit(job).result()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            group: list[Pending] = []
            after: Pending | None = None
            stop = False
            # Everything that queued while the last group ran is the next group, up to a direct job.
            while True:
                if item.direct:
                    after = item
                    break
                group.append(item)
                if len(group) >= self._max_group:
                    break
                try:
                    item = self._queue.get_nowait()
                except Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
            if group:
                self._run_group(group)
            if after is not None:
                self._run_group([after], _each)
            if stop:
                return

    def _run_group(self, group: list[Pending], runner: Runner | None = None) -> None:
        try:
            outcomes: Sequence[object] = (runner or self._runner)(group)
            if len(outcomes) != len(group):
                raise RuntimeError("runner returned the wrong number of outcomes")
        except BaseException as exc:  # callers must never wait on a dead thread
            outcomes = [Failed(exc)] * len(group)
            for pending in group:
                if not pending.claimed:
                    pending.claim()
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], object]]] = {}
        for pending, outcome in zip(group, outcomes, strict=True):
            if not pending.claimed:
                continue
            if pending.future is not None:
                if isinstance(outcome, Failed):
                    pending.future.set_exception(outcome.error)
                else:
                    pending.future.set_result(outcome)
            elif pending.waiter is not None and pending.loop is not None:
                by_loop.setdefault(pending.loop, []).append((pending.waiter, outcome))
        for loop, settled in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, settled)
            except RuntimeError:
                pass  # the loop is closed: nobody is waiting any more

    async def aclose(self, final: Callable[[], object] | None = None, timeout: float | None = None) -> None:
        """:meth:`close` for the event loop: waits for ``final`` without joining the thread."""
        done: Future[object] = Future()
        with self._state_lock:
            if self._closed:
                return
            self._queue.put(Pending(final or (lambda: None), done, direct=True))
            self._closed = True
            self._queue.put(_STOP)
        try:
            await asyncio.wait_for(asyncio.wrap_future(done), timeout)
        except TimeoutError:
            pass  # a job is stuck on the resource: the daemon thread ends with the process

    def close(self, final: Callable[[], object] | None = None, timeout: float | None = None) -> None:
        """Run what is queued, then ``final`` (e.g. closing a connection) on the thread, and stop it.

        Idempotent. Blocks until the thread is done, or ``timeout`` seconds (then a job is stuck on
        the resource, and the daemon thread ends with the process): call it from shutdown code or a
        worker thread.
        """
        with self._state_lock:
            if self._closed:
                return
            if final is not None:
                self._queue.put(Pending(final, Future(), direct=True))
            self._closed = True
            self._queue.put(_STOP)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
