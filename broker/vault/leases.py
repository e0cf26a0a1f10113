"""The lease book: every Vault secret the broker handed out, until it is revoked.

One SQLite file (WAL) under the data dir, shared by worker processes. A row is written *before*
the issuance entry is appended, so a crash between minting and the ledger leaves a row the sweeper
finds. States::

    pending --(ledger entry durable)--> live --(release | expiry | suspension)--> revoking --> revoked
       \\--(ledger append failed)--------------------------------------------------^

``revoking`` is a claim: exactly one process revokes a lease; a failed Vault call puts it back.
The release token is stored as its SHA-256 only.

Every method blocks (SQLite, with its own lock): the broker calls them on the lease book's lane
(:class:`~broker.vault.issuer.VaultIssuer`), the sweeper thread or the CLI, never on the event loop.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from broker.errors import StoreUnavailable

__all__ = ["LeaseBook", "LeaseRecord"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS vault_leases (
    task_id        TEXT PRIMARY KEY,
    workload       TEXT NOT NULL,
    spiffe_id      TEXT NOT NULL,
    kind           TEXT NOT NULL,
    ref_type       TEXT NOT NULL,
    ref            TEXT NOT NULL,
    issued_at      REAL NOT NULL,
    expires_at     REAL NOT NULL,
    release_sha256 TEXT NOT NULL UNIQUE,
    leaf_hash      TEXT,
    state          TEXT NOT NULL,
    reason         TEXT,
    revoked_at     REAL
);
CREATE INDEX IF NOT EXISTS vault_leases_due ON vault_leases (state, expires_at);
CREATE INDEX IF NOT EXISTS vault_leases_workload ON vault_leases (workload, state);
"""


def release_digest(release_token: str) -> str:
    """The stored form of a release token."""
    return hashlib.sha256(release_token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """One row of the lease book (no secret in it)."""

    task_id: str
    workload: str
    spiffe_id: str
    kind: str
    ref_type: str
    ref: str
    issued_at: float
    expires_at: float
    leaf_hash: str | None
    state: str
    reason: str | None


_SELECT = (
    "SELECT task_id, workload, spiffe_id, kind, ref_type, ref, issued_at, expires_at, leaf_hash, state, reason "
    "FROM vault_leases WHERE "
)
_INSERT = (
    "INSERT INTO vault_leases (task_id, workload, spiffe_id, kind, ref_type, ref, issued_at, expires_at, "
    "leaf_hash, state, reason, release_sha256) "
    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
)


class LeaseBook:
    """Leases by task id, by release token, by workload and by expiry."""

    def __init__(self, path: Path | str, *, timeout: float = 10.0) -> None:
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(str(path), timeout=timeout, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"lease book unavailable: {type(exc).__name__}") from None

    def _run(self, sql: str, args: tuple[object, ...] = ()) -> sqlite3.Cursor:
        try:
            with self._lock:
                return self._conn.execute(sql, args)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"lease book unavailable: {type(exc).__name__}") from None

    def add(self, record: LeaseRecord, release_token: str) -> None:
        """Record a freshly minted lease (state ``pending``)."""
        self._run(
            _INSERT,
            (record.task_id, record.workload, record.spiffe_id, record.kind, record.ref_type, record.ref,
             record.issued_at, record.expires_at, record.leaf_hash, "pending", None, release_digest(release_token)),
        )

    def mark_live(self, task_id: str, leaf_hash: str) -> None:
        """The issuance entry is durable."""
        self._run("UPDATE vault_leases SET state='live', leaf_hash=? WHERE task_id=? AND state='pending'",
                  (leaf_hash, task_id))

    def get(self, task_id: str) -> LeaseRecord | None:
        """The row of ``task_id``."""
        row = self._run(_SELECT + "task_id=?", (task_id,)).fetchone()
        return LeaseRecord(*row) if row else None

    def by_release_token(self, release_token: str) -> LeaseRecord | None:
        """The row a release token belongs to."""
        row = self._run(_SELECT + "release_sha256=?",
                        (release_digest(release_token),)).fetchone()
        return LeaseRecord(*row) if row else None

    def claim(self, task_id: str, reason: str) -> bool:
        """Take the right to revoke ``task_id``; ``False`` if it is revoked or being revoked."""
        cur = self._run(
            "UPDATE vault_leases SET state='revoking', reason=? WHERE task_id=? AND state IN ('pending','live')",
            (reason, task_id),
        )
        return cur.rowcount == 1

    def unclaim(self, task_id: str) -> None:
        """Vault could not revoke: leave the lease to the sweeper."""
        self._run("UPDATE vault_leases SET state=CASE WHEN leaf_hash IS NULL THEN 'pending' ELSE 'live' END "
                  "WHERE task_id=? AND state='revoking'", (task_id,))

    def mark_revoked(self, task_id: str, now: float) -> None:
        """Vault confirmed the revocation."""
        self._run("UPDATE vault_leases SET state='revoked', revoked_at=? WHERE task_id=?", (now, task_id))

    def due(self, now: float, limit: int = 100) -> list[LeaseRecord]:
        """Open leases whose task has expired."""
        rows = self._run(
            _SELECT + "state IN ('pending','live') AND expires_at <= ? ORDER BY expires_at LIMIT ?", (now, limit),
        ).fetchall()
        return [LeaseRecord(*r) for r in rows]

    def open_for_workload(self, workload: str) -> list[LeaseRecord]:
        """Open leases of one workload (for suspension)."""
        rows = self._run(_SELECT + "workload=? AND state IN ('pending','live')",
                         (workload,)).fetchall()
        return [LeaseRecord(*r) for r in rows]

    def listing(self, *, workload: str | None = None, open_only: bool = True, limit: int = 500) -> list[LeaseRecord]:
        """Leases, newest first: open ones (pending, live, revoking) or all; of one workload if given."""
        where = ["1=1"]
        args: list[object] = []
        if open_only:
            where.append("state IN ('pending','live','revoking')")
        if workload is not None:
            where.append("workload=?")
            args.append(workload)
        rows = self._run(_SELECT + " AND ".join(where) + " ORDER BY issued_at DESC LIMIT ?", (*args, limit)).fetchall()
        return [LeaseRecord(*r) for r in rows]

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()
