"""One dedicated thread per blocking resource, driven from the event loop.

A :class:`SerialExecutor` owns one thread and runs the jobs given to it in order. The event loop
hands a job over through a queue and awaits its result with :func:`asyncio.wrap_future`, so neither
the loop nor anyio's shared thread pool ever waits on the resource (a SQLite file another process
holds locked, a disk that stalls): only callers of that one resource wait, and only for ``timeout``.

A job still queued when its caller gives up is skipped (the caller was told "unavailable"); a job
already running finishes, so a write may land after its caller heard 503: the safe side for the
single-use values, counters and marks this serves. This is the pattern of the ledger's writer
thread (:mod:`broker.ledger.log`), without its group commit.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future
from queue import SimpleQueue
from typing import Any, TypeVar

__all__ = ["ExecutorClosed", "SerialExecutor"]

_T = TypeVar("_T")
_STOP = object()


class ExecutorClosed(RuntimeError):
    """The executor was closed; no more jobs run."""


class SerialExecutor:
    """Runs jobs one at a time on its own daemon thread (``name`` shows in thread dumps)."""

    def __init__(self, name: str) -> None:
        self._queue: SimpleQueue[Any] = SimpleQueue()
        self._closed = False
        self._state_lock = threading.Lock()  # taken only to enqueue: never held while a job runs
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], _T]) -> Future[_T]:
        """Queue ``job``; its future completes with the job's result or exception."""
        future: Future[_T] = Future()
        with self._state_lock:
            if self._closed:
                raise ExecutorClosed("executor is closed")
            self._queue.put((job, future))
        return future

    async def run(self, job: Callable[[], _T], timeout: float | None) -> _T:
        """Run ``job`` on the thread and await it; :class:`TimeoutError` after ``timeout`` seconds.

        On timeout (or cancellation) a job that has not started yet is skipped. Takes no thread lock
        (it runs on the event loop): the job is queued, then dropped again if the executor closed.
        """
        if self._closed:
            raise ExecutorClosed("executor is closed")
        future: Future[_T] = Future()
        self._queue.put((job, future))
        if self._closed:
            future.cancel()  # queued behind the stop marker, or skipped by the thread: never run
            raise ExecutorClosed("executor is closed")
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout)

    def call(self, job: Callable[[], _T]) -> _T:
        """Run ``job`` on the thread and block until it is done: for start-up and CLI code, never the loop."""
        return self.submit(job).result()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            job, future = item
            if not future.set_running_or_notify_cancel():
                continue  # its caller gave up before it started
            try:
                result = job()
            except BaseException as exc:  # delivered to the caller, never kills the thread
                future.set_exception(exc)
            else:
                future.set_result(result)

    async def aclose(self, final: Callable[[], object] | None = None) -> None:
        """:meth:`close` for the event loop: waits for ``final`` without joining the thread."""
        done: Future[object] = Future()
        with self._state_lock:
            if self._closed:
                return
            self._queue.put((final or (lambda: None), done))
            self._closed = True
            self._queue.put(_STOP)
        await asyncio.wrap_future(done)

    def close(self, final: Callable[[], object] | None = None) -> None:
        """Run what is queued, then ``final`` (e.g. closing a connection) on the thread, and stop it.

        Idempotent. Blocks until the thread is done: call it from shutdown code or a worker thread.
        """
        with self._state_lock:
            if self._closed:
                return
            if final is not None:
                self._queue.put((final, Future()))
            self._closed = True
            self._queue.put(_STOP)
        if threading.current_thread() is not self._thread:
            self._thread.join()
