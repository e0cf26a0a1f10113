"""SQLite state store: the embedded default, correct across several worker processes."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from broker.clock import Clock, SystemClock
from broker.errors import StoreUnavailable

__all__ = ["SqliteStateStore"]

log = logging.getLogger("nhi_broker.store")

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS single_use (
    namespace  TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    expires_at REAL    NOT NULL,
    PRIMARY KEY (namespace, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS single_use_expiry ON single_use (expires_at);
CREATE TABLE IF NOT EXISTS counters (
    namespace  TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    value      INTEGER NOT NULL,
    expires_at REAL    NOT NULL,
    PRIMARY KEY (namespace, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS records (
    namespace  TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    value      TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    expires_at REAL    NOT NULL,
    PRIMARY KEY (namespace, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS records_expiry ON records (namespace, expires_at);
CREATE TABLE IF NOT EXISTS marks (
    namespace  TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    value      REAL    NOT NULL,
    expires_at REAL,
    PRIMARY KEY (namespace, key)
) WITHOUT ROWID;
"""

# Purge expired rows once every this many writes, so the tables stay the size of the live window.
_PURGE_EVERY = 1024

# One statement each, so every check-and-update is atomic across processes without explicit transactions.
_COUNT_UP = """
INSERT INTO counters (namespace, key, value, expires_at) VALUES (:ns, :key, :amount, :expires_at)
ON CONFLICT (namespace, key) DO UPDATE SET
    value = CASE WHEN counters.expires_at <= :now THEN excluded.value ELSE counters.value + excluded.value END,
    expires_at = CASE WHEN counters.expires_at <= :now THEN excluded.expires_at ELSE counters.expires_at END
WHERE counters.expires_at <= :now OR counters.value + excluded.value <= :limit
RETURNING value
"""
_SET_MARK = """
INSERT INTO marks (namespace, key, value, expires_at) VALUES (:ns, :key, :value, :expires_at)
ON CONFLICT (namespace, key) DO UPDATE SET
    value = CASE WHEN marks.expires_at IS NOT NULL AND marks.expires_at <= :now THEN excluded.value
                 ELSE max(marks.value, excluded.value) END,
    expires_at = excluded.expires_at
"""


class SqliteStateStore:
    """Shared state in one SQLite file (WAL).

    Uniqueness comes from primary keys and every update is one statement, so two processes racing on
    the same key get exactly one winner. Commits use ``synchronous=NORMAL``: durable across a process
    crash; a power loss may forget the last moments of state, which lives only as long as short-lived
    tokens (budgets and revocations included: prefer Redis with persistence when that matters).
    """

    def __init__(self, path: Path | str, clock: Clock | None = None) -> None:
        self._path = str(path)
        self._clock = clock or SystemClock()
        # One connection per process behind a lock: SQLite serialises writers anyway, and per-thread
        # connections would contend through SQLite's sleeping busy handler (milliseconds per collision).
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._writes = 0
        self._run(lambda conn: conn.executescript(_SCHEMA))

    def _conn(self) -> sqlite3.Connection:
        if self._connection is None:
            conn = sqlite3.connect(self._path, timeout=10.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=10000")
            self._connection = conn
        return self._connection

    def _run(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        try:
            with self._lock:
                return work(self._conn())
        except sqlite3.Error as exc:
            log.warning("sqlite state store unavailable (%s): failing closed", type(exc).__name__)
            raise StoreUnavailable(f"state store unavailable: {type(exc).__name__}") from None

    def _wrote(self, conn: sqlite3.Connection, now: float) -> None:
        self._writes += 1
        if self._writes % _PURGE_EVERY == 0:
            conn.execute("DELETE FROM single_use WHERE expires_at <= ?", (now,))
            conn.execute("DELETE FROM counters WHERE expires_at <= ?", (now,))
            conn.execute("DELETE FROM marks WHERE expires_at <= ?", (now,))
            conn.execute("DELETE FROM records WHERE expires_at <= ?", (now,))

    def consume_once(self, namespace: str, key: str, expires_at: float) -> bool:
        now = self._clock.now()

        def work(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "INSERT INTO single_use (namespace, key, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (namespace, key) DO UPDATE SET expires_at = excluded.expires_at "
                "WHERE single_use.expires_at <= ?",
                (namespace, key, float(expires_at), now),
            )
            self._wrote(conn, now)
            return cur.rowcount == 1

        return self._run(work)

    def count_up(self, namespace: str, key: str, amount: int, limit: int, expires_at: float) -> int | None:
        if amount < 0 or amount > limit:
            return None
        now = self._clock.now()
        params = {"ns": namespace, "key": key, "amount": int(amount), "limit": int(limit),
                  "expires_at": float(expires_at), "now": now}

        def work(conn: sqlite3.Connection) -> int | None:
            rows = conn.execute(_COUNT_UP, params).fetchall()
            self._wrote(conn, now)
            return int(rows[0][0]) if rows else None

        return self._run(work)

    def set_mark(self, namespace: str, key: str, value: float, expires_at: float | None) -> None:
        now = self._clock.now()
        params = {"ns": namespace, "key": key, "value": float(value),
                  "expires_at": None if expires_at is None else float(expires_at), "now": now}

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(_SET_MARK, params)
            self._wrote(conn, now)

        self._run(work)

    def get_marks(self, items: Sequence[tuple[str, str]]) -> list[float | None]:
        if not items:
            return []
        now = self._clock.now()

        def work(conn: sqlite3.Connection) -> list[float | None]:
            found: dict[tuple[str, str], float] = {}
            # One read transaction: the answers are a consistent snapshot.
            conn.execute("BEGIN")
            try:
                for namespace, key in items:
                    row = conn.execute(
                        "SELECT value FROM marks WHERE namespace = ? AND key = ? "
                        "AND (expires_at IS NULL OR expires_at > ?)",
                        (namespace, key, now),
                    ).fetchone()
                    if row is not None:
                        found[(namespace, key)] = float(row[0])
            finally:
                conn.execute("COMMIT")
            return [found.get(item) for item in items]

        return self._run(work)

    def delete_mark(self, namespace: str, key: str) -> bool:
        now = self._clock.now()

        def work(conn: sqlite3.Connection) -> bool:
            rows = conn.execute(
                "DELETE FROM marks WHERE namespace = ? AND key = ? RETURNING expires_at", (namespace, key)
            ).fetchall()
            return bool(rows) and (rows[0][0] is None or rows[0][0] > now)

        return self._run(work)

    def put_record(self, namespace: str, key: str, value: str, expires_at: float) -> bool:
        now = self._clock.now()

        def work(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "INSERT INTO records (namespace, key, value, version, expires_at) VALUES (?, ?, ?, 1, ?) "
                "ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value, version = 1, "
                "expires_at = excluded.expires_at WHERE records.expires_at <= ?",
                (namespace, key, value, float(expires_at), now),
            )
            self._wrote(conn, now)
            return cur.rowcount == 1

        return self._run(work)

    def get_record(self, namespace: str, key: str) -> tuple[str, int] | None:
        now = self._clock.now()

        def work(conn: sqlite3.Connection) -> tuple[str, int] | None:
            row = conn.execute(
                "SELECT value, version FROM records WHERE namespace = ? AND key = ? AND expires_at > ?",
                (namespace, key, now),
            ).fetchone()
            return None if row is None else (str(row[0]), int(row[1]))

        return self._run(work)

    def swap_record(self, namespace: str, key: str, version: int, value: str, expires_at: float) -> bool:
        now = self._clock.now()

        def work(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE records SET value = ?, version = version + 1, expires_at = ? "
                "WHERE namespace = ? AND key = ? AND version = ? AND expires_at > ?",
                (value, float(expires_at), namespace, key, int(version), now),
            )
            self._wrote(conn, now)
            return cur.rowcount == 1

        return self._run(work)

    def list_records(self, namespace: str, limit: int) -> list[tuple[str, str, int]]:
        now = self._clock.now()

        def work(conn: sqlite3.Connection) -> list[tuple[str, str, int]]:
            rows = conn.execute(
                "SELECT key, value, version FROM records WHERE namespace = ? AND expires_at > ? "
                "ORDER BY expires_at, key LIMIT ?",
                (namespace, now, int(limit)),
            ).fetchall()
            return [(str(k), str(v), int(n)) for k, v, n in rows]

        return self._run(work)

    def ping(self) -> None:
        self._run(lambda conn: conn.execute("SELECT 1").fetchone())

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None
