"""The lease book in PostgreSQL: one book for every replica.

Why PostgreSQL and not Redis: a lease row is the only memory that a Vault secret exists and must be
revoked; losing one (Redis without an fsynced append-only file loses its last writes on a crash)
leaves a live database user nobody revokes. PostgreSQL commits it durably
(``synchronous_commit=on``), replicas already need it for the ledger, and one backup covers both.

Sharing the book is what makes the kill switch and release work across replicas: a suspension on
replica A lists and revokes the open leases of the workload whoever issued them; a release token
minted by replica A is found by replica B; every replica's sweeper works on the same rows. Each
state change is one ``UPDATE ... WHERE state IN (...)``, so exactly one replica wins a claim.

Same statements and semantics as :class:`~broker.vault.leases.LeaseBook` (SQLite); only the
connection differs. The table comes from ``nhi-broker db upgrade`` (migration 2).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg

from broker.errors import StoreUnavailable
from broker.pg import describe, redact, require_schema
from broker.pg.session import Connection, Session

from .leases import LeaseBook

__all__ = ["PostgresLeaseBook"]


@contextmanager
def _pg_errors() -> Iterator[None]:
    try:
        yield
    except psycopg.Error as exc:
        raise StoreUnavailable(f"lease book unavailable: {describe(exc)}") from None


@dataclass(frozen=True, slots=True)
class _Result:
    """What a statement returned, read before the connection is handed on."""

    rows: list[tuple[Any, ...]]
    rowcount: int

    def fetchone(self) -> tuple[Any, ...] | None:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self.rows


class PostgresLeaseBook(LeaseBook):
    """:class:`LeaseBook` over PostgreSQL (see the module docstring)."""

    def __init__(self, url: str) -> None:
        self._session = Session(url, autocommit=True, application="nhi-broker lease book",
                                closed_error=lambda: StoreUnavailable("lease book is closed"))
        shown = redact(url)
        with _pg_errors():
            self._session.run(lambda conn: require_schema(conn, shown), retry=False)

    def _run(self, sql: str, args: tuple[object, ...] = ()) -> _Result:  # type: ignore[override]
        query = sql.replace("?", "%s").encode()  # the shared statements use SQLite's placeholders

        def work(conn: Connection) -> _Result:
            cur = conn.execute(query, args)
            rows = cur.fetchall() if cur.description is not None else []
            return _Result(rows, cur.rowcount)

        with _pg_errors():
            # Autocommit: every statement is its own durable transaction. Each is safe to repeat once
            # on a fresh connection: updates are guarded by their state, and a repeated insert can
            # only fail (as unavailable), never duplicate a lease.
            return self._session.run(work, retry=True)

    def close(self) -> None:
        """Close the connection."""
        self._session.close()
