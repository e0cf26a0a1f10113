"""SQLite ledger storage: the embedded default, one file shared by every worker process.

Durability: WAL journal with ``synchronous=FULL``, so a returned :meth:`append_batch` has been
fsynced and survives a power loss, not only a process crash. Ordering: the next index is read
inside a ``BEGIN IMMEDIATE`` transaction, which holds SQLite's single write lock, so several
processes appending to the same file get disjoint, gapless index ranges. Append-only: triggers
refuse ``UPDATE`` and ``DELETE`` on the table, whoever connects.

Group commit across processes. Each process's ledger writer already commits everything that queued
during its last fsync as one batch. Worker processes sharing the file take turns through an
exclusive ``flock`` on ``<file>-append.lock`` around each append transaction: a process waiting for
its turn sleeps in the kernel and wakes the moment the other's commit returns, while its own batch
keeps growing. Without it, the loser of the race for SQLite's write lock polls with SQLite's
back-off (1, 2, 5, 10, ... ms), which idles the disk between fsyncs and stretches the tail. The
kernel drops the lock when a process dies, so a killed worker never blocks the others.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from broker.errors import InvalidRequest, LedgerUnavailable
from broker.ledger.merkle import HASH_SIZE, leaf_hash
from broker.ledger.storage import DuplicateLeaf, MissingEntry

__all__ = ["SqliteLedgerStorage"]

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS entries (
    idx       INTEGER PRIMARY KEY CHECK (idx >= 0),
    leaf      BLOB    NOT NULL,
    leaf_hash BLOB    NOT NULL CHECK (length(leaf_hash) = {HASH_SIZE})
);
CREATE UNIQUE INDEX IF NOT EXISTS entries_leaf_hash ON entries (leaf_hash);
CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries
BEGIN SELECT RAISE(ABORT, 'ledger entries are append-only'); END;
CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries
BEGIN SELECT RAISE(ABORT, 'ledger entries are append-only'); END;
CREATE TABLE IF NOT EXISTS tiles (
    idx  INTEGER PRIMARY KEY CHECK (idx >= 0),
    root BLOB    NOT NULL CHECK (length(root) = {HASH_SIZE})
);
CREATE TABLE IF NOT EXISTS checkpoints (
    size INTEGER PRIMARY KEY CHECK (size >= 0),
    root BLOB    NOT NULL CHECK (length(root) = {HASH_SIZE}),
    note TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS cosignatures (
    size INTEGER NOT NULL REFERENCES checkpoints (size),
    name TEXT    NOT NULL,
    line TEXT    NOT NULL,
    PRIMARY KEY (size, name)
);
"""


def _describe(exc: sqlite3.Error) -> str:
    # The SQLite error name (SQLITE_BUSY, SQLITE_IOERR_FSYNC, ...) tells an operator what broke
    # without exposing the file path or the SQL text.
    return getattr(exc, "sqlite_errorname", None) or type(exc).__name__


@contextmanager
def _sqlite_errors() -> Iterator[None]:
    """The one place where sqlite3 exceptions become ledger errors."""
    try:
        yield
    except sqlite3.IntegrityError as exc:
        if getattr(exc, "sqlite_errorname", "") == "SQLITE_CONSTRAINT_UNIQUE":
            raise DuplicateLeaf("ledger already holds an identical entry") from None
        raise LedgerUnavailable(f"ledger storage refused the write ({_describe(exc)})") from None
    except sqlite3.Error as exc:
        raise LedgerUnavailable(f"ledger storage unavailable ({_describe(exc)})") from None


class SqliteLedgerStorage:
    """Leaves in one SQLite file (see the module docstring for the guarantees).

    Thread-safe: one connection writes and one reads, each behind its own lock; WAL lets readers
    see the last commit while a write is in progress.
    """

    def __init__(self, path: Path | str, *, busy_timeout: float = 10.0) -> None:
        """Open (or create) the ledger file at ``path``.

        ``busy_timeout`` is how long, in seconds, a write waits for another process's write lock
        before the append fails with :class:`LedgerUnavailable`.
        """
        self._path = str(path)
        self._busy_timeout_ms = max(0, int(busy_timeout * 1000))
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._closed = False
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._append_lock_fd: int | None = None
        with _sqlite_errors():
            try:
                self._writer = self._connect()
                self._writer.executescript(_SCHEMA)
                self._reader = self._connect()
                self._append_lock_fd = self._open_append_lock()
            except BaseException:
                self._close_connections()
                raise

    def _open_append_lock(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        try:
            return os.open(self._path + "-append.lock", flags, 0o600)
        except OSError as exc:
            raise LedgerUnavailable(f"ledger append lock cannot be opened ({exc.strerror})") from None

    @contextmanager
    def _appending(self) -> Iterator[None]:
        """Hold the cross-process append turn (see the module docstring); called on the writer thread."""
        fd = self._append_lock_fd
        if fd is None:
            raise LedgerUnavailable("ledger storage is closed")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            raise LedgerUnavailable(f"ledger append lock failed ({exc.strerror})") from None
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a transaction is exactly
        # one batch.
        conn = sqlite3.connect(
            self._path, timeout=self._busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout={self._busy_timeout_ms}")
            (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
            if str(mode).lower() != "wal":
                # Without WAL, readers block writers and the durability argument above changes:
                # refuse rather than run weaker than documented.
                raise LedgerUnavailable("ledger storage cannot use write-ahead logging")
            conn.execute("PRAGMA synchronous=FULL")
        except BaseException:
            conn.close()
            raise
        return conn

    def _conn(self, which: sqlite3.Connection | None) -> sqlite3.Connection:
        if self._closed or which is None:
            raise LedgerUnavailable("ledger storage is closed")
        return which

    def append_batch(self, leaves: list[bytes]) -> int:
        """Store ``leaves`` at consecutive indexes in one fsynced transaction; the first index."""
        rows = []
        for leaf in leaves:
            if not isinstance(leaf, bytes):
                raise TypeError("ledger leaves are bytes")
            rows.append((leaf, leaf_hash(leaf)))
        with self._write_lock, _sqlite_errors():
            conn = self._conn(self._writer)
            if not rows:
                return self._count(conn)
            with self._appending():
                # IMMEDIATE takes the write lock now, so no other process can append between reading
                # the next index and inserting at it.
                conn.execute("BEGIN IMMEDIATE")
                try:
                    first = self._count(conn)
                    conn.executemany(
                        "INSERT INTO entries (idx, leaf, leaf_hash) VALUES (?, ?, ?)",
                        ((first + i, leaf, digest) for i, (leaf, digest) in enumerate(rows)),
                    )
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            return first

    @staticmethod
    def _count(conn: sqlite3.Connection) -> int:
        # Indexes are gapless from 0 and never deleted, so MAX + 1 is the size (O(log n) on the key).
        (n,) = conn.execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM entries").fetchone()
        return int(n)

    def size(self) -> int:
        """Number of committed leaves, as seen by a fresh read."""
        with self._read_lock, _sqlite_errors():
            return self._count(self._conn(self._reader))

    def _range(self, column: str, start: int, end: int) -> list[bytes]:
        if not (isinstance(start, int) and isinstance(end, int)) or not 0 <= start <= end:
            raise InvalidRequest("entry range must satisfy 0 <= start <= end")
        with self._read_lock, _sqlite_errors():
            rows = (
                self._conn(self._reader)
                .execute(
                    f"SELECT idx, {column} FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx",  # noqa: S608 -- column is ours
                    (start, end),
                )
                .fetchall()
            )
        if len(rows) != end - start:
            # Name the first hole: an operator (and `serve`'s refusal) must say which row is gone.
            missing = next((start + i for i, row in enumerate(rows) if row[0] != start + i), start + len(rows))
            raise MissingEntry(missing)
        return [bytes(row[1]) for row in rows]

    def leaf_hashes(self, start: int, end: int) -> list[bytes]:
        """Leaf hashes of ``[start, end)``."""
        return self._range("leaf_hash", start, end)

    def entries(self, start: int, end: int) -> list[bytes]:
        """Leaves of ``[start, end)``."""
        return self._range("leaf", start, end)

    def record_tile_roots(self, start: int, roots: list[bytes]) -> None:
        """Keep tile roots (one fsynced transaction); a tile already recorded keeps its first root."""
        if not roots:
            return
        with self._write_lock, _sqlite_errors():
            conn = self._conn(self._writer)
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany("INSERT OR IGNORE INTO tiles (idx, root) VALUES (?, ?)",
                                 [(start + i, root) for i, root in enumerate(roots)])
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def tile_roots(self, start: int, end: int) -> list[bytes]:
        """Recorded roots of tiles ``[start, end)``, stopping at the first one not recorded."""
        with self._read_lock, _sqlite_errors():
            rows = (
                self._conn(self._reader)
                .execute("SELECT idx, root FROM tiles WHERE idx >= ? AND idx < ? ORDER BY idx", (start, end))
                .fetchall()
            )
        roots: list[bytes] = []
        for expected, (idx, root) in enumerate(rows, start):
            if idx != expected:
                break
            roots.append(bytes(root))
        return roots

    def record_checkpoint(self, size: int, root: bytes, note: str) -> None:
        """Remember a checkpoint (fsynced) before it is published; the first one per size stays."""
        with self._write_lock, _sqlite_errors():
            self._conn(self._writer).execute(
                "INSERT OR IGNORE INTO checkpoints (size, root, note) VALUES (?, ?, ?)", (size, root, note)
            )

    def published_checkpoints(self, limit: int) -> list[tuple[int, bytes]]:
        """``(size, root)`` of the ``limit`` largest recorded checkpoints, largest first."""
        with self._read_lock, _sqlite_errors():
            rows = (
                self._conn(self._reader)
                .execute("SELECT size, root FROM checkpoints ORDER BY size DESC LIMIT ?", (limit,))
                .fetchall()
            )
        return [(int(size), bytes(root)) for size, root in rows]

    def record_cosignatures(self, size: int, lines: dict[str, str]) -> None:
        """Keep the newest cosignature line of each witness (by name) for the checkpoint of ``size``."""
        with self._write_lock, _sqlite_errors():
            conn = self._conn(self._writer)
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "INSERT OR REPLACE INTO cosignatures (size, name, line) VALUES (?, ?, ?)",
                    [(size, name, line) for name, line in lines.items()],
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def cosignatures(self, size: int | None) -> tuple[str, list[str]] | None:
        """``(log note, cosignature lines)`` for ``size``, or for the largest cosigned size if ``None``."""
        with self._read_lock, _sqlite_errors():
            conn = self._conn(self._reader)
            if size is None:
                row = conn.execute("SELECT MAX(size) FROM cosignatures").fetchone()
                if row is None or row[0] is None:
                    return None
                size = int(row[0])
            note = conn.execute("SELECT note FROM checkpoints WHERE size = ?", (size,)).fetchone()
            lines = conn.execute("SELECT line FROM cosignatures WHERE size = ? ORDER BY name", (size,)).fetchall()
        if note is None or not lines:
            return None
        return str(note[0]), [str(line[0]) for line in lines]

    def index_of(self, leaf_hash: bytes) -> int | None:
        """The index of the leaf with this hash, or ``None``."""
        if not isinstance(leaf_hash, bytes) or len(leaf_hash) != HASH_SIZE:
            return None
        with self._read_lock, _sqlite_errors():
            row = (
                self._conn(self._reader)
                .execute("SELECT idx FROM entries WHERE leaf_hash = ?", (leaf_hash,))
                .fetchone()
            )
        return None if row is None else int(row[0])

    def close(self) -> None:
        """Close both connections; idempotent."""
        with self._write_lock, self._read_lock:
            self._closed = True
            self._close_connections()

    def _close_connections(self) -> None:
        for conn in (self._writer, self._reader):
            if conn is not None:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass  # closing is best effort; the connection is unusable either way
        self._writer = self._reader = None
        if self._append_lock_fd is not None:
            os.close(self._append_lock_fd)
            self._append_lock_fd = None
