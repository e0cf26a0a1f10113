"""One PostgreSQL connection that a component owns, reopened after failures.

A :class:`Session` is used from threads (a ledger writer thread, worker threads), never on the event
loop; callers serialise on its lock. It does not translate errors: each component maps psycopg errors
to its own (``LedgerUnavailable``, ``StoreUnavailable``) at its own choke point.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import psycopg

from broker.pg.connection import connect

__all__ = ["Connection", "Session"]

_T = TypeVar("_T")
Connection = psycopg.Connection[tuple[object, ...]]


class Session:
    """A connection to ``url`` opened on first use and again after it failed.

    ``closed_error`` builds the exception raised once :meth:`close` was called.
    """

    def __init__(self, url: str, *, autocommit: bool, application: str,
                 closed_error: Callable[[], Exception]) -> None:
        self._url = url
        self._autocommit = autocommit
        self._application = application
        self._closed_error = closed_error
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._closed = False

    @property
    def connection(self) -> Connection | None:
        """The open connection, if any (for tests and diagnostics)."""
        return self._conn

    def _get(self) -> Connection:
        if self._closed:
            raise self._closed_error()
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._drop()
            self._conn = connect(self._url, autocommit=self._autocommit, application=self._application)
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg.Error:
                pass  # the connection is unusable either way
        self._conn = None

    def run(self, work: Callable[[Connection], _T], *, retry: bool) -> _T:
        """``work(conn)`` under the lock; on a connection failure the connection is dropped (and the
        work repeated once on a fresh one when ``retry``).

        Only work that is safe to repeat may retry: reads, and transactions that fail before ``COMMIT``
        (PostgreSQL rolled them back). A stale connection after a server restart fails on first use.
        """
        with self._lock:
            for attempt in (1, 2):
                try:
                    return work(self._get())
                except psycopg.OperationalError:
                    self._drop()
                    if not retry or attempt == 2:
                        raise
                except psycopg.Error:
                    if self._conn is not None and (self._conn.closed or self._conn.broken):
                        self._drop()
                    raise
            raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the connection; later :meth:`run` calls raise ``closed_error()``. Idempotent."""
        with self._lock:
            self._closed = True
            self._drop()
