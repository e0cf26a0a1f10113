"""SQLite state store: the embedded default, correct across several worker processes.

Each store owns one connection on one dedicated thread (:class:`~broker.serial.SerialExecutor`); the
event loop hands it jobs and awaits them, so a file another process holds locked stalls only the
callers of this store, each for at most ``timeout`` seconds, and then they fail closed (503).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from broker.clock import Clock, SystemClock
from broker.errors import StoreUnavailable
from broker.serial import ExecutorClosed, SerialExecutor
from broker.state.store import Check, ConsumeOnce, CountUp, valid_prefix

__all__ = ["SqliteStateStore"]

log = logging.getLogger("nhi_broker.state")

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


def _count_up(conn: sqlite3.Connection, check: CountUp, now: float) -> int | None:
    params = {"ns": check.namespace, "key": check.key, "amount": int(check.amount), "limit": int(check.limit),
              "expires_at": float(check.expires_at), "now": now}
    rows = conn.execute(_COUNT_UP, params).fetchall()
    return int(rows[0][0]) if rows else None


def _passes(conn: sqlite3.Connection, check: Check, now: float) -> bool:
    """Apply one check; whether it passed (a failed check changed nothing)."""
    if isinstance(check, ConsumeOnce):
        cur = conn.execute(
            "INSERT INTO single_use (namespace, key, expires_at) VALUES (?, ?, ?) "
            "ON CONFLICT (namespace, key) DO UPDATE SET expires_at = excluded.expires_at "
            "WHERE single_use.expires_at <= ?",
            (check.namespace, check.key, float(check.expires_at), now),
        )
        return cur.rowcount == 1
    if isinstance(check, CountUp):
        return _count_up(conn, check, now) is not None
    row = conn.execute(
        "SELECT 1 FROM marks WHERE namespace = ? AND key = ? AND (expires_at IS NULL OR expires_at > ?)",
        (check.namespace, check.key, now),
    ).fetchone()
    return row is None


class SqliteStateStore:
    """Shared state in one SQLite file (WAL).

    Uniqueness comes from primary keys and every update is one statement, so two processes racing on
    the same key get exactly one winner. Commits use ``synchronous=NORMAL``: durable across a process
    crash; a power loss may forget the last moments of state, which lives only as long as short-lived
    tokens (budgets and revocations included: prefer Redis with persistence when that matters).
    """

    def __init__(self, path: Path | str, clock: Clock | None = None, *, timeout: float = 1.0) -> None:
        self._path = str(path)
        self._clock = clock or SystemClock()
        # A caller waits at most this long (SQLite's busy handler included) before it fails closed.
        self._timeout = timeout
        self._connection: sqlite3.Connection | None = None
        self._writes = 0
        # One connection on one thread per store: SQLite serialises writers anyway, and per-thread
        # connections would contend through SQLite's sleeping busy handler (milliseconds per collision).
        self._thread = SerialExecutor("state-sqlite")
        try:
            self._thread.call(lambda: self._guarded(lambda conn: conn.executescript(_SCHEMA)))
        except BaseException:
            self._thread.close()
            raise

    def _conn(self) -> sqlite3.Connection:
        # Only ever called on the store's thread.
        if self._connection is None:
            conn = sqlite3.connect(self._path, timeout=self._timeout, isolation_level=None,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={int(self._timeout * 1000)}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._connection = conn
        return self._connection

    def _guarded(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        try:
            return work(self._conn())
        except sqlite3.Error as exc:
            conn = self._connection
            if conn is not None and conn.in_transaction:
                conn.rollback()
            log.warning("sqlite state store unavailable (%s): failing closed", type(exc).__name__)
            raise StoreUnavailable(f"state store unavailable: {type(exc).__name__}") from None

    async def _run(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        try:
            # The margin lets SQLite's own busy timeout answer first when the file is locked.
            return await self._thread.run(lambda: self._guarded(work), self._timeout + 0.25)
        except TimeoutError:
            log.warning("sqlite state store did not answer within %.1f s: failing closed", self._timeout)
            raise StoreUnavailable("state store unavailable: it did not answer in time") from None
        except ExecutorClosed:
            raise StoreUnavailable("state store unavailable: it is closed") from None

    def _wrote(self, conn: sqlite3.Connection, now: float) -> None:
        self._writes += 1
        if self._writes % _PURGE_EVERY == 0:
            conn.execute("DELETE FROM single_use WHERE expires_at <= ?", (now,))
            conn.execute("DELETE FROM counters WHERE expires_at <= ?", (now,))
            conn.execute("DELETE FROM marks WHERE expires_at <= ?", (now,))
            conn.execute("DELETE FROM records WHERE expires_at <= ?", (now,))

    async def consume_once(self, namespace: str, key: str, expires_at: float) -> bool:
        return await self.run_checks([ConsumeOnce(namespace, key, expires_at)]) is None

    async def count_up(self, namespace: str, key: str, amount: int, limit: int, expires_at: float) -> int | None:
        if amount < 0 or amount > limit:
            return None
        now = self._clock.now()

        def work(conn: sqlite3.Connection) -> int | None:
            total = _count_up(conn, CountUp(namespace, key, amount, limit, expires_at), now)
            self._wrote(conn, now)
            return total

        return await self._run(work)

    async def run_checks(self, checks: Sequence[Check]) -> int | None:
        todo, failed = valid_prefix(checks)
        if not todo:
            return failed
        now = self._clock.now()

        def work(conn: sqlite3.Connection) -> int | None:
            # One job and one write transaction: atomic, and one hop to the store's thread.
            if len(todo) > 1:
                conn.execute("BEGIN IMMEDIATE")
            result = failed
            try:
                for index, check in enumerate(todo):
                    if not _passes(conn, check, now):
                        result = index
                        break
            except BaseException:
                if conn.in_transaction:
                    conn.rollback()
                raise
            if conn.in_transaction:
                conn.execute("COMMIT")
            self._wrote(conn, now)
            return result

        return await self._run(work)

    async def set_mark(self, namespace: str, key: str, value: float, expires_at: float | None) -> None:
        now = self._clock.now()
        params = {"ns": namespace, "key": key, "value": float(value),
                  "expires_at": None if expires_at is None else float(expires_at), "now": now}

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(_SET_MARK, params)
            self._wrote(conn, now)

        await self._run(work)

    async def get_marks(self, items: Sequence[tuple[str, str]]) -> list[float | None]:
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

        return await self._run(work)

    async def delete_mark(self, namespace: str, key: str) -> bool:
        now = self._clock.now()

        def work(conn: sqlite3.Connection) -> bool:
            rows = conn.execute(
                "DELETE FROM marks WHERE namespace = ? AND key = ? RETURNING expires_at", (namespace, key)
            ).fetchall()
            return bool(rows) and (rows[0][0] is None or rows[0][0] > now)

        return await self._run(work)

    async def put_record(self, namespace: str, key: str, value: str, expires_at: float) -> bool:
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

        return await self._run(work)

    async def get_record(self, namespace: str, key: str) -> tuple[str, int] | None:
        now = self._clock.now()

        def work(conn: sqlite3.Connection) -> tuple[str, int] | None:
            row = conn.execute(
                "SELECT value, version FROM records WHERE namespace = ? AND key = ? AND expires_at > ?",
                (namespace, key, now),
            ).fetchone()
            return None if row is None else (str(row[0]), int(row[1]))

        return await self._run(work)

    async def swap_record(self, namespace: str, key: str, version: int, value: str, expires_at: float) -> bool:
        now = self._clock.now()

        def work(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE records SET value = ?, version = version + 1, expires_at = ? "
                "WHERE namespace = ? AND key = ? AND version = ? AND expires_at > ?",
                (value, float(expires_at), namespace, key, int(version), now),
            )
            self._wrote(conn, now)
            return cur.rowcount == 1

        return await self._run(work)

    async def list_records(self, namespace: str, limit: int) -> list[tuple[str, str, int]]:
        now = self._clock.now()

        def work(conn: sqlite3.Connection) -> list[tuple[str, str, int]]:
            rows = conn.execute(
                "SELECT key, value, version FROM records WHERE namespace = ? AND expires_at > ? "
                "ORDER BY expires_at, key LIMIT ?",
                (namespace, now, int(limit)),
            ).fetchall()
            return [(str(k), str(v), int(n)) for k, v, n in rows]

        return await self._run(work)

    async def ping(self) -> None:
        await self._run(lambda conn: conn.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        await self._thread.aclose(final=self._close_connection)

    def close_now(self) -> None:
        """:meth:`close` for synchronous shutdown code (never on the event loop)."""
        self._thread.close(final=self._close_connection)

    def _close_connection(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
