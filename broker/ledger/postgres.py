"""PostgreSQL ledger storage: one log for any number of broker replicas.

Ordering. Indexes are assigned inside the database: a batch first moves the one-row
``ledger_sequencer`` forward by its length (``UPDATE ... RETURNING``), which locks that row until the
transaction ends, then inserts its leaves at the returned range. Batches from every replica therefore
serialise on the row and get disjoint, gapless ranges; a batch that fails rolls the sequencer back
with it, so no index is ever skipped (a ``SEQUENCE`` would leave gaps).

Group commit. Each process's :class:`~broker.ledger.log.Ledger` writer thread already gathers the
appends that queued during the previous commit into one batch; here a batch is one transaction (the
sequencer ``UPDATE``, one binary ``COPY`` of its rows) and one ``COMMIT`` (one WAL flush), whatever
its length. Batches of several replicas queue on the sequencer row, so while one commits the others'
batches grow: the commit rate stays bounded by the WAL flush, the append rate by the batch size.

Durability. :func:`broker.pg.connect` sets ``synchronous_commit = on`` on the connection, so
:meth:`append_batch` returns only after PostgreSQL has flushed the commit (and, with synchronous
standbys configured, after they have it). An error during ``COMMIT`` is ambiguous and is reported as
:class:`LedgerUnavailable`: the caller does not issue, which at worst leaves an extra entry, never a
missing one.

Append-only. Triggers and privileges (``broker.pg.migrations``); leaf hashes are ``UNIQUE``.

Concurrency. The ledger's writer thread and request threads share one writing connection under a
lock; reads use a second connection (autocommit, each read one statement) under its own lock. Neither
is ever used on the event loop: the API runs ledger reads in worker threads and appends go through
the writer thread. A connection that failed is dropped and reopened on the next call, so service
resumes by itself after PostgreSQL restarts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import psycopg
from psycopg import errors as pg_errors

from broker.errors import InvalidRequest, LedgerUnavailable
from broker.ledger.merkle import HASH_SIZE, leaf_hash
from broker.ledger.storage import DuplicateLeaf, MissingEntry
from broker.pg import describe, redact, require_schema
from broker.pg.session import Connection as _Conn
from broker.pg.session import Session

__all__ = ["PostgresLedgerStorage"]

_T = TypeVar("_T")


@contextmanager
def _pg_errors() -> Iterator[None]:
    """The one place where psycopg exceptions become ledger errors (never with the URL or SQL)."""
    try:
        yield
    except pg_errors.UniqueViolation as exc:
        if exc.diag.constraint_name == "ledger_entries_leaf_hash_key":
            raise DuplicateLeaf("ledger already holds an identical entry") from None
        raise LedgerUnavailable(f"ledger storage refused the write ({describe(exc)})") from None
    except psycopg.Error as exc:
        raise LedgerUnavailable(f"ledger storage unavailable ({describe(exc)})") from None


def _int(value: object) -> int:
    if not isinstance(value, int):
        raise LedgerUnavailable("ledger storage returned a malformed row")
    return value


def _bytes(value: object) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise LedgerUnavailable("ledger storage returned a malformed row")
    return bytes(value)


class PostgresLedgerStorage:
    """Leaves in PostgreSQL, shared by every replica (see the module docstring for the guarantees)."""

    def __init__(self, url: str) -> None:
        """Connect to ``url`` and check the schema version; :class:`LedgerUnavailable` or
        :class:`~broker.pg.SchemaOutdated` (which names ``nhi-broker db upgrade``) when it cannot run.
        """
        def closed() -> LedgerUnavailable:
            return LedgerUnavailable("ledger storage is closed")

        self._writer = Session(url, autocommit=False, application="nhi-broker ledger writer", closed_error=closed)
        self._reader = Session(url, autocommit=True, application="nhi-broker ledger reader", closed_error=closed)
        shown = redact(url)
        with _pg_errors():
            self._reader.run(lambda conn: require_schema(conn, shown), retry=False)

    # -- writes ----------------------------------------------------------------------------------

    def append_batch(self, leaves: list[bytes]) -> int:
        """Store ``leaves`` at consecutive indexes in one durable transaction; the first index."""
        hashes: list[bytes] = []
        for leaf in leaves:
            if not isinstance(leaf, bytes):
                raise TypeError("ledger leaves are bytes")
            hashes.append(leaf_hash(leaf))
        if not leaves:
            return self.size()

        def work(conn: _Conn) -> int:
            try:
                cur = conn.cursor()
                # (1) take the next range: locks the sequencer row until COMMIT or ROLLBACK.
                cur.execute(
                    "UPDATE ledger_sequencer SET next_idx = next_idx + %s WHERE singleton RETURNING next_idx - %s",
                    (len(leaves), len(leaves)),
                )
                row = cur.fetchone()
                if row is None:
                    raise LedgerUnavailable("the ledger sequencer row is missing (run `nhi-broker db upgrade`)")
                first = _int(row[0])
                # (2) the leaves at first, first + 1, ...: binary COPY, the cheapest bulk path.
                with cur.copy("COPY ledger_entries (idx, leaf, leaf_hash) FROM STDIN (FORMAT BINARY)") as copy:
                    copy.set_types(["int8", "bytea", "bytea"])
                    for offset, (leaf, digest) in enumerate(zip(leaves, hashes, strict=True)):
                        copy.write_row((first + offset, leaf, digest))
            except BaseException:
                # Nothing was committed; a connection failure here is retried once by the session.
                if not conn.broken:
                    conn.rollback()
                raise
            # (3) durable: synchronous_commit=on, set by broker.pg.connect.
            try:
                conn.commit()
            except psycopg.OperationalError as exc:
                # The commit may or may not have happened: never retry (that could log the batch
                # twice under new indexes); the callers get no receipt and issue nothing.
                raise LedgerUnavailable(f"ledger commit outcome unknown ({describe(exc)})") from None
            except BaseException:
                if not conn.broken:
                    conn.rollback()
                raise
            return first

        with _pg_errors():
            return self._writer.run(work, retry=True)

    def record_tile_roots(self, start: int, roots: list[bytes]) -> None:
        """Keep the roots of complete tiles ``start, start + 1, ...``; a tile already recorded keeps its first."""
        if not roots:
            return

        def work(conn: _Conn) -> None:
            with conn.transaction():
                conn.execute(
                    "INSERT INTO ledger_tile_roots (idx, root) "
                    "SELECT %s + t.n - 1, t.root FROM unnest(%s::bytea[]) WITH ORDINALITY AS t(root, n) "
                    "ON CONFLICT (idx) DO NOTHING",
                    (start, roots),
                )

        with _pg_errors():
            self._writer.run(work, retry=True)  # idempotent

    def tile_roots(self, start: int, end: int) -> list[bytes]:
        """Recorded roots of tiles ``[start, end)``, in order, stopping at the first one not recorded."""

        def work(conn: _Conn) -> list[tuple[object, ...]]:
            with conn.cursor(binary=True) as cur:
                cur.execute(b"SELECT idx, root FROM ledger_tile_roots WHERE idx >= %s AND idx < %s ORDER BY idx",
                            (start, end))
                return cur.fetchall()

        roots: list[bytes] = []
        for expected, (idx, root) in enumerate(self._read(work), start):
            if idx != expected:
                break
            roots.append(_bytes(root))
        return roots

    def record_checkpoint(self, size: int, root: bytes, note: str) -> None:
        """Remember a checkpoint (durably) before it is published; the first one per size stays."""

        def work(conn: _Conn) -> None:
            with conn.transaction():
                conn.execute(
                    "INSERT INTO ledger_checkpoints (size, root, note) VALUES (%s, %s, %s) "
                    "ON CONFLICT (size) DO NOTHING",
                    (size, root, note),
                )

        with _pg_errors():
            self._writer.run(work, retry=True)  # idempotent: repeating it is harmless

    def record_cosignatures(self, size: int, lines: dict[str, str]) -> None:
        """Keep the newest cosignature line of each witness (by name) for the checkpoint of ``size``."""

        def work(conn: _Conn) -> None:
            with conn.transaction():
                conn.cursor().executemany(
                    "INSERT INTO ledger_cosignatures (size, name, line) VALUES (%s, %s, %s) "
                    "ON CONFLICT (size, name) DO UPDATE SET line = EXCLUDED.line",
                    [(size, name, line) for name, line in lines.items()],
                )

        with _pg_errors():
            self._writer.run(work, retry=True)

    # -- reads -----------------------------------------------------------------------------------

    def _read(self, work: Callable[[_Conn], _T]) -> _T:
        with _pg_errors():
            return self._reader.run(work, retry=True)

    def size(self) -> int:
        """Number of committed leaves: the sequencer, which moves in the same transaction as the rows."""

        def work(conn: _Conn) -> int:
            row = conn.execute("SELECT next_idx FROM ledger_sequencer WHERE singleton").fetchone()
            if row is None:
                raise LedgerUnavailable("the ledger sequencer row is missing")
            return _int(row[0])

        return self._read(work)

    def _range(self, column: str, start: int, end: int) -> list[bytes]:
        if not (isinstance(start, int) and isinstance(end, int)) or not 0 <= start <= end:
            raise InvalidRequest("entry range must satisfy 0 <= start <= end")
        query = f"SELECT idx, {column} FROM ledger_entries WHERE idx >= %s AND idx < %s ORDER BY idx"  # noqa: S608

        def work(conn: _Conn) -> list[tuple[object, ...]]:
            with conn.cursor(binary=True) as cur:
                cur.execute(query.encode(), (start, end))
                return cur.fetchall()

        rows = self._read(work)
        if len(rows) != end - start:
            # Name the first hole: an operator (and `serve`'s refusal) must say which row is gone.
            missing = next((start + i for i, row in enumerate(rows) if row[0] != start + i), start + len(rows))
            raise MissingEntry(missing)
        return [_bytes(row[1]) for row in rows]

    def leaf_hashes(self, start: int, end: int) -> list[bytes]:
        """Leaf hashes of ``[start, end)``."""
        return self._range("leaf_hash", start, end)

    def entries(self, start: int, end: int) -> list[bytes]:
        """Leaves of ``[start, end)``."""
        return self._range("leaf", start, end)

    def index_of(self, leaf_hash: bytes) -> int | None:
        """The index of the leaf with this hash, or ``None``."""
        if not isinstance(leaf_hash, bytes) or len(leaf_hash) != HASH_SIZE:
            return None

        def work(conn: _Conn) -> int | None:
            row = conn.execute("SELECT idx FROM ledger_entries WHERE leaf_hash = %s", (leaf_hash,)).fetchone()
            return None if row is None else _int(row[0])

        return self._read(work)

    def published_checkpoints(self, limit: int) -> list[tuple[int, bytes]]:
        """``(size, root)`` of the ``limit`` largest recorded checkpoints, largest first."""

        def work(conn: _Conn) -> list[tuple[int, bytes]]:
            rows = conn.execute(
                "SELECT size, root FROM ledger_checkpoints ORDER BY size DESC LIMIT %s", (limit,)
            ).fetchall()
            return [(_int(s), _bytes(r)) for s, r in rows]

        return self._read(work)

    def cosignatures(self, size: int | None) -> tuple[str, list[str]] | None:
        """``(log note, cosignature lines)`` for ``size``, or for the largest cosigned size if ``None``."""

        def work(conn: _Conn) -> tuple[str, list[str]] | None:
            wanted = size
            if wanted is None:
                row = conn.execute("SELECT MAX(size) FROM ledger_cosignatures").fetchone()
                if row is None or row[0] is None:
                    return None
                wanted = _int(row[0])
            note = conn.execute("SELECT note FROM ledger_checkpoints WHERE size = %s", (wanted,)).fetchone()
            lines = conn.execute(
                "SELECT line FROM ledger_cosignatures WHERE size = %s ORDER BY name", (wanted,)
            ).fetchall()
            if note is None or not lines:
                return None
            return str(note[0]), [str(line[0]) for line in lines]

        return self._read(work)

    def close(self) -> None:
        """Close both connections; idempotent. Later calls raise :class:`LedgerUnavailable`."""
        self._writer.close()
        self._reader.close()
