"""SQLite state store: the embedded default, correct across several worker processes.

Each store owns one connection on one dedicated thread (:class:`~broker.serial.SerialExecutor`); the
event loop hands it jobs and awaits them, so a file another process holds locked stalls only the
callers of this store, each for at most ``timeout`` seconds, and then they fail closed (503).

Group commit. The writes that queued while the thread was busy run as one group: one
``BEGIN IMMEDIATE`` .. ``COMMIT`` (a job of several statements inside its own ``SAVEPOINT``, so its
failure undoes only its own effects), answered after the commit with one hand-over to the loop. Under
load that is one write transaction per group instead of one per request.

Taking turns across processes. Worker processes sharing the file take turns through an exclusive
``flock`` on ``<file>-write.lock`` around each write transaction, taken on the store's thread: a
process waiting for its turn sleeps in the kernel and wakes the moment the other's commit returns.
Without it, the loser of the race for SQLite's write lock polls with SQLite's back-off (1, 2, 5, 10,
15 ms ...), and measured under 2 workers that stretched 4 % of the transactions by 1 to 385 ms. The
turn is held only around one transaction, whose wait for SQLite's own lock (a process that does not
take turns, such as a ``sqlite3`` shell) is bounded by ``timeout``; the kernel drops it when a
process dies. Reads do not take turns: WAL lets them read the last commit while a write is running.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from broker.clock import Clock, SystemClock
from broker.errors import StoreUnavailable
from broker.serial import ExecutorClosed, Failed, Pending, SerialExecutor
from broker.state.store import Check, ConsumeOnce, CountUp, valid_prefix

__all__ = ["OPERATIONS", "SqliteOperations", "SqliteStateFile", "SqliteStateStore", "job_for"]

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


# How a job touches the file: READ runs on its own outside any write transaction; WRITE is one
# statement (atomic on its own: a statement that fails leaves nothing behind); MULTI is several
# statements that must stand or fall together (its own SAVEPOINT inside the group's transaction).
_READ, _WRITE, _MULTI = 0, 1, 2


class _Job:
    __slots__ = ("kind", "work")

    def __init__(self, work: Callable[[sqlite3.Connection], Any], kind: int) -> None:
        self.work = work
        self.kind = kind


class _GroupLost(Exception):
    """SQLite rolled the whole transaction back (I/O error, disk full): every job in it is undone."""


def _unavailable(exc: BaseException) -> StoreUnavailable:
    log.warning("sqlite state store unavailable (%s): failing closed", type(exc).__name__)
    return StoreUnavailable(f"state store unavailable: {type(exc).__name__}")


def _check_and_mark(conn: sqlite3.Connection, now: float, todo: Sequence[Check], failed: int | None) -> int | None:
    # One job, atomic (a failed check changes nothing; an error undoes the job's savepoint), inside its
    # group's write transaction.
    for index, check in enumerate(todo):
        if not _passes(conn, check, now):
            return index
    return failed


def _count_up_op(conn: sqlite3.Connection, now: float, namespace: str, key: str, amount: int, limit: int,
                 expires_at: float) -> int | None:
    return _count_up(conn, CountUp(namespace, key, amount, limit, expires_at), now)


def _set_mark(conn: sqlite3.Connection, now: float, namespace: str, key: str, value: float,
              expires_at: float | None) -> None:
    conn.execute(_SET_MARK, {"ns": namespace, "key": key, "value": float(value),
                             "expires_at": None if expires_at is None else float(expires_at), "now": now})


def _get_marks(conn: sqlite3.Connection, now: float, items: Sequence[tuple[str, str]]) -> list[float | None]:
    found: dict[tuple[str, str], float] = {}
    # One read transaction: the answers are a consistent snapshot.
    conn.execute("BEGIN")
    try:
        for namespace, key in items:
            row = conn.execute(
                "SELECT value FROM marks WHERE namespace = ? AND key = ? AND (expires_at IS NULL OR expires_at > ?)",
                (namespace, key, now),
            ).fetchone()
            if row is not None:
                found[(namespace, key)] = float(row[0])
    finally:
        conn.execute("COMMIT")
    return [found.get((namespace, key)) for namespace, key in items]


def _delete_mark(conn: sqlite3.Connection, now: float, namespace: str, key: str) -> bool:
    rows = conn.execute(
        "DELETE FROM marks WHERE namespace = ? AND key = ? RETURNING expires_at", (namespace, key)
    ).fetchall()
    return bool(rows) and (rows[0][0] is None or rows[0][0] > now)


def _put_record(conn: sqlite3.Connection, now: float, namespace: str, key: str, value: str,
                expires_at: float) -> bool:
    cur = conn.execute(
        "INSERT INTO records (namespace, key, value, version, expires_at) VALUES (?, ?, ?, 1, ?) "
        "ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value, version = 1, "
        "expires_at = excluded.expires_at WHERE records.expires_at <= ?",
        (namespace, key, value, float(expires_at), now),
    )
    return cur.rowcount == 1


def _get_record(conn: sqlite3.Connection, now: float, namespace: str, key: str) -> tuple[str, int] | None:
    row = conn.execute(
        "SELECT value, version FROM records WHERE namespace = ? AND key = ? AND expires_at > ?",
        (namespace, key, now),
    ).fetchone()
    return None if row is None else (str(row[0]), int(row[1]))


def _swap_record(conn: sqlite3.Connection, now: float, namespace: str, key: str, version: int, value: str,
                 expires_at: float) -> bool:
    cur = conn.execute(
        "UPDATE records SET value = ?, version = version + 1, expires_at = ? "
        "WHERE namespace = ? AND key = ? AND version = ? AND expires_at > ?",
        (value, float(expires_at), namespace, key, int(version), now),
    )
    return cur.rowcount == 1


def _list_records(conn: sqlite3.Connection, now: float, namespace: str, limit: int) -> list[tuple[str, str, int]]:
    rows = conn.execute(
        "SELECT key, value, version FROM records WHERE namespace = ? AND expires_at > ? "
        "ORDER BY expires_at, key LIMIT ?",
        (namespace, now, int(limit)),
    ).fetchall()
    return [(str(k), str(v), int(n)) for k, v, n in rows]


def _ping(conn: sqlite3.Connection, now: float) -> None:
    conn.execute("SELECT 1").fetchone()


#: The store's operations by name: (how the job touches the file, ``work(conn, now, *args)``). The
#: threaded store and the storage process (:mod:`broker.storaged`) run the same work functions.
OPERATIONS: dict[str, tuple[int, Callable[..., Any]]] = {
    "run_checks": (_MULTI, _check_and_mark),  # _WRITE when there is one check (see job_for)
    "count_up": (_WRITE, _count_up_op),
    "set_mark": (_WRITE, _set_mark),
    "get_marks": (_READ, _get_marks),
    "delete_mark": (_WRITE, _delete_mark),
    "put_record": (_WRITE, _put_record),
    "get_record": (_READ, _get_record),
    "swap_record": (_WRITE, _swap_record),
    "list_records": (_READ, _list_records),
    "ping": (_READ, _ping),
}


def job_for(op: str, now: float, args: tuple[Any, ...]) -> _Job:
    """The job running operation ``op`` at clock time ``now`` (:class:`KeyError` for an unknown one)."""
    kind, work = OPERATIONS[op]
    if op == "run_checks" and len(args[0]) == 1:
        kind = _WRITE  # one statement is atomic on its own: no savepoint needed
    return _Job(lambda conn: work(conn, now, *args), kind)


class SqliteStateFile:
    """The state file's one connection and the group-commit logic, for the one thread that uses it.

    Not thread-safe: :class:`SqliteStateStore` drives it from its own thread, the storage process
    (:mod:`broker.storaged`) from its only thread.
    """

    def __init__(self, path: Path | str, clock: Clock, timeout: float) -> None:
        self._path = str(path)
        self._clock = clock
        self._timeout = timeout
        self._connection: sqlite3.Connection | None = None
        self._turn_fd: int | None = None
        self._writes = 0

    def create_schema(self) -> None:
        self.guarded(lambda conn: conn.executescript(_SCHEMA))

    def _conn(self) -> sqlite3.Connection:
        if self._connection is None:
            conn = sqlite3.connect(self._path, timeout=self._timeout, isolation_level=None,
                                   check_same_thread=False)
            try:
                conn.execute(f"PRAGMA busy_timeout={int(self._timeout * 1000)}")
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                if self._turn_fd is None:
                    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
                    self._turn_fd = os.open(self._path + "-write.lock", flags, 0o600)
            except BaseException:
                conn.close()
                raise
            self._connection = conn
        return self._connection

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """Hold this file's cross-process write turn (see the module docstring)."""
        fd = self._turn_fd
        if fd is None:
            raise sqlite3.OperationalError("state store is closed")
        # Blocks until the process holding the turn commits (bounded: see the module docstring).
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def guarded(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``work`` outside any group; SQLite and OS errors become :class:`StoreUnavailable`."""
        try:
            return work(self._conn())
        except (sqlite3.Error, OSError) as exc:
            conn = self._connection
            if conn is not None and conn.in_transaction:
                conn.rollback()
            raise _unavailable(exc) from None

    def run_group(self, group: Sequence[Pending]) -> list[object]:
        """A :data:`~broker.serial.Runner`: reads one by one, each run of consecutive writes as one transaction."""
        outcomes: list[object] = [None] * len(group)
        i = 0
        while i < len(group):
            job: _Job = group[i].job
            if job.kind == _READ:
                if group[i].claim():
                    try:
                        outcomes[i] = self.guarded(job.work)
                    except BaseException as exc:
                        outcomes[i] = Failed(exc)
                i += 1
                continue
            j = i + 1
            while j < len(group) and group[j].job.kind != _READ:
                j += 1
            outcomes[i:j] = self._write_group(group[i:j])
            i = j
        return outcomes

    def _write_group(self, group: Sequence[Pending]) -> list[object]:
        outcomes: list[object] = [None] * len(group)
        try:
            conn = self._conn()
            with self._turn():
                conn.execute("BEGIN IMMEDIATE")  # waits up to ``timeout`` for SQLite's write lock
                try:
                    written = 0
                    # Alone in its transaction, a job needs no savepoint: an error undoes the transaction.
                    alone = len(group) == 1
                    for i, pending in enumerate(group):
                        if pending.claim():  # after the wait for the lock: skip callers who gave up
                            outcomes[i] = self._write_one(conn, pending.job, alone)
                            written += 1
                    if conn.in_transaction:  # not if the job alone in it failed
                        if written:
                            self._wrote(conn, written)
                        conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.rollback()
                    raise
        except (sqlite3.Error, OSError, _GroupLost) as exc:
            # Nothing of the group was committed: every caller in it fails closed.
            failed = Failed(_unavailable(exc.__cause__ or exc if isinstance(exc, _GroupLost) else exc))
            for pending in group:
                if not pending.claimed:
                    pending.claim()
            return [failed] * len(group)
        return outcomes

    @staticmethod
    def _write_one(conn: sqlite3.Connection, job: _Job, alone: bool) -> object:
        """One job inside the group's transaction; its outcome (a :class:`Failed` undid its effects)."""
        if alone:
            try:
                return job.work(conn)
            except BaseException as exc:
                if conn.in_transaction:
                    conn.rollback()  # the transaction holds nothing else
                return Failed(_unavailable(exc) if isinstance(exc, sqlite3.Error) else exc)
        savepoint = job.kind == _MULTI
        if savepoint:
            conn.execute("SAVEPOINT job")
        try:
            result = job.work(conn)
        except BaseException as exc:
            if not conn.in_transaction:
                raise _GroupLost from exc
            if savepoint:
                conn.execute("ROLLBACK TO job")
                conn.execute("RELEASE job")
            return Failed(_unavailable(exc) if isinstance(exc, sqlite3.Error) else exc)
        if savepoint:
            conn.execute("RELEASE job")
        return result

    def _wrote(self, conn: sqlite3.Connection, count: int) -> None:
        before = self._writes
        self._writes += count
        if self._writes // _PURGE_EVERY != before // _PURGE_EVERY:
            now = self._clock.now()
            conn.execute("DELETE FROM single_use WHERE expires_at <= ?", (now,))
            conn.execute("DELETE FROM counters WHERE expires_at <= ?", (now,))
            conn.execute("DELETE FROM marks WHERE expires_at <= ?", (now,))
            conn.execute("DELETE FROM records WHERE expires_at <= ?", (now,))

    def close(self) -> None:
        """Close the connection and the turn's file (on the thread that uses this file)."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self._turn_fd is not None:
            os.close(self._turn_fd)
            self._turn_fd = None


class SqliteOperations(ABC):
    """The :class:`~broker.state.store.StateStore` methods as calls of :data:`OPERATIONS`: subclasses
    say where an operation runs (:meth:`_call`): on this process's store thread, or in the state
    storage process (:class:`~broker.state.remote.RemoteStateStore`)."""

    @abstractmethod
    async def _call(self, op: str, *args: Any) -> Any:
        """Run operation ``op`` (a key of :data:`OPERATIONS`) with ``args`` at this clock's time."""

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
        result: int | None = await self._call("run_checks", todo, failed)
        return result

    async def set_mark(self, namespace: str, key: str, value: float, expires_at: float | None) -> None:
        await self._call("set_mark", namespace, key, value, expires_at)

    async def get_marks(self, items: Sequence[tuple[str, str]]) -> list[float | None]:
        if not items:
            return []
        result: list[float | None] = await self._call("get_marks", items)
        return result

    async def delete_mark(self, namespace: str, key: str) -> bool:
        return bool(await self._call("delete_mark", namespace, key))

    async def put_record(self, namespace: str, key: str, value: str, expires_at: float) -> bool:
        return bool(await self._call("put_record", namespace, key, value, expires_at))

    async def get_record(self, namespace: str, key: str) -> tuple[str, int] | None:
        result: tuple[str, int] | None = await self._call("get_record", namespace, key)
        return result

    async def swap_record(self, namespace: str, key: str, version: int, value: str, expires_at: float) -> bool:
        return bool(await self._call("swap_record", namespace, key, version, value, expires_at))

    async def list_records(self, namespace: str, limit: int) -> list[tuple[str, str, int]]:
        result: list[tuple[str, str, int]] = await self._call("list_records", namespace, limit)
        return result

    async def ping(self) -> None:
        await self._call("ping")


class SqliteStateStore(SqliteOperations):
    """Shared state in one SQLite file (WAL).

    Uniqueness comes from primary keys and every check-and-update is one statement, so two processes
    racing on the same key get exactly one winner. Commits use ``synchronous=NORMAL``: durable across
    a process crash; a power loss may forget the last moments of state, which lives only as long as
    short-lived tokens (budgets and revocations included: prefer Redis with persistence when that
    matters). A caller is answered only after the transaction holding its write committed.
    """

    def __init__(self, path: Path | str, clock: Clock | None = None, *, timeout: float = 1.0,
                 max_group: int = 256) -> None:
        self._clock = clock or SystemClock()
        # A caller waits at most this long (SQLite's busy handler included) before it fails closed.
        self._timeout = timeout
        self._file = SqliteStateFile(path, self._clock, timeout)
        # One connection on one thread per store: SQLite serialises writers anyway, and per-thread
        # connections would contend through SQLite's sleeping busy handler (milliseconds per collision).
        self._thread = SerialExecutor("state-sqlite", runner=self._file.run_group, max_group=max_group)
        try:
            self._thread.call(self._file.create_schema)
        except BaseException:
            self._thread.close(final=self._file.close)
            raise

    async def _call(self, op: str, *args: Any) -> Any:
        job = job_for(op, self._clock.now(), args)
        try:
            # The margin lets SQLite's own busy timeout answer first when the file is locked.
            return await self._thread.run(job, self._timeout + 0.25)
        except TimeoutError:
            log.warning("sqlite state store did not answer within %.1f s: failing closed", self._timeout)
            raise StoreUnavailable("state store unavailable: it did not answer in time") from None
        except ExecutorClosed:
            raise StoreUnavailable("state store unavailable: it is closed") from None

    async def close(self) -> None:
        await self._thread.aclose(final=self._file.close, timeout=self._close_timeout())

    def close_now(self) -> None:
        """:meth:`close` for synchronous shutdown code (never on the event loop)."""
        self._thread.close(final=self._file.close, timeout=self._close_timeout())

    def _close_timeout(self) -> float:
        # What is queued finishes first, each group within ``timeout`` once it has its turn; a sibling
        # process stopped while holding the turn (SIGSTOP, a debugger) must not hang shutdown forever.
        return 4 * self._timeout + 5.0
