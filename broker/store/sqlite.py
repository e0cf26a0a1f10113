"""SQLite state store: the embedded default, correct across several worker processes."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from broker.clock import Clock, SystemClock
from broker.errors import StoreUnavailable

__all__ = ["SqliteStateStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS single_use (
    namespace  TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    expires_at REAL    NOT NULL,
    PRIMARY KEY (namespace, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS single_use_expiry ON single_use (expires_at);
"""

# Purge expired rows once every this many inserts, so the table stays the size of the live window.
_PURGE_EVERY = 1024


class SqliteStateStore:
    """Single-use values in one SQLite file (WAL).

    Uniqueness comes from the primary key, so two processes racing on the same key get exactly one
    ``True``. Commits use ``synchronous=NORMAL``: durable across a process crash; a power loss may
    forget the last moments of used values, which live only as long as their short-lived tokens.
    """

    def __init__(self, path: Path | str, clock: Clock | None = None) -> None:
        self._path = str(path)
        self._clock = clock or SystemClock()
        # One connection per process behind a lock: SQLite serialises writers anyway, and per-thread
        # connections would contend through SQLite's sleeping busy handler (milliseconds per collision).
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._inserts = 0
        try:
            with self._lock:
                self._conn().executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"state store unavailable: {type(exc).__name__}") from None

    def _conn(self) -> sqlite3.Connection:
        if self._connection is None:
            conn = sqlite3.connect(self._path, timeout=10.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=10000")
            self._connection = conn
        return self._connection

    def consume_once(self, namespace: str, key: str, expires_at: float) -> bool:
        now = self._clock.now()
        try:
            with self._lock:
                return self._consume(namespace, key, expires_at, now)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"state store unavailable: {type(exc).__name__}") from None

    def _consume(self, namespace: str, key: str, expires_at: float, now: float) -> bool:
        conn = self._conn()
        cur = conn.execute(
            "INSERT INTO single_use (namespace, key, expires_at) VALUES (?, ?, ?) "
            "ON CONFLICT (namespace, key) DO UPDATE SET expires_at = excluded.expires_at "
            "WHERE single_use.expires_at <= ?",
            (namespace, key, float(expires_at), now),
        )
        first_use = cur.rowcount == 1
        self._inserts += 1
        if self._inserts % _PURGE_EVERY == 0:
            conn.execute("DELETE FROM single_use WHERE expires_at <= ?", (now,))
        return first_use

    def ping(self) -> None:
        try:
            with self._lock:
                self._conn().execute("SELECT 1").fetchone()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"state store unavailable: {type(exc).__name__}") from None

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None
