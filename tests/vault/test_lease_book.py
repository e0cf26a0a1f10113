"""The lease book on both engines: the same states and claims, whether one file or one shared database.

On PostgreSQL two books are two replicas: a lease added by one is found, claimed and revoked by the
other, and a claim is won exactly once.
"""

from __future__ import annotations

import threading

import psycopg
import pytest

from broker.errors import StoreUnavailable
from broker.vault.leases import LeaseBook, LeaseRecord
from broker.vault.pg_leases import PostgresLeaseBook


def record(task: str, workload: str = "support-assistant", expires_at: float = 1000.0) -> LeaseRecord:
    return LeaseRecord(task_id=task, workload=workload, spiffe_id=f"spiffe://example.org/{workload}", kind="vault-db",
                       ref_type="lease", ref=f"database/creds/ro/{task}", issued_at=900.0, expires_at=expires_at,
                       leaf_hash=None, state="pending", reason=None)


@pytest.fixture(params=["sqlite", "postgres"])
def books(request, tmp_path):
    """Two lease books on one store: two processes (SQLite file) or two replicas (PostgreSQL)."""
    if request.param == "sqlite":
        opened = [LeaseBook(tmp_path / "vault-leases.sqlite3") for _ in range(2)]
    else:
        url = request.getfixturevalue("pg_url")
        opened = [PostgresLeaseBook(url) for _ in range(2)]
    yield opened
    for book in opened:
        book.close()


def test_a_lease_from_one_book_is_seen_released_and_revoked_by_the_other(books):
    a, b = books
    a.add(record("t1"), "release-token-1")
    a.add(record("t2", workload="other"), "release-token-2")
    a.mark_live("t1", "ab" * 32)
    found = b.by_release_token("release-token-1")
    assert found is not None and found.task_id == "t1" and found.state == "live" and found.leaf_hash == "ab" * 32
    assert b.by_release_token("release-token-9") is None
    assert [r.task_id for r in b.open_for_workload("support-assistant")] == ["t1"]
    assert b.claim("t1", "released") and not a.claim("t1", "released")  # one winner
    b.unclaim("t1")  # Vault failed: back to live for the sweeper
    assert a.get("t1").state == "live"  # type: ignore[union-attr]
    assert a.claim("t1", "suspended")
    a.mark_revoked("t1", 950.0)
    got = b.get("t1")
    assert got is not None and got.state == "revoked" and got.reason == "suspended"
    assert b.open_for_workload("support-assistant") == []
    assert [r.task_id for r in b.due(2000.0)] == ["t2"] and b.due(999.0) == []


def test_racing_claims_have_exactly_one_winner(books):
    books[0].add(record("race"), "release-race")
    wins: list[bool] = []
    lock = threading.Lock()

    def claim(book: LeaseBook) -> None:
        won = book.claim("race", "released")
        with lock:
            wins.append(won)

    threads = [threading.Thread(target=claim, args=(books[i % 2],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 7 + [True]


def test_postgres_book_keeps_every_row(pg_url):
    book = PostgresLeaseBook(pg_url)
    try:
        book.add(record("kept"), "release-kept")
        with psycopg.connect(pg_url, autocommit=True) as conn:
            with pytest.raises(psycopg.errors.IntegrityError, match="append-only"):
                conn.execute("DELETE FROM vault_leases")
        assert book.get("kept") is not None
    finally:
        book.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        book.get("kept")


def test_postgres_book_unreachable_is_unavailable():
    with pytest.raises(StoreUnavailable) as info:
        PostgresLeaseBook("postgresql://broker:pw-secret@127.0.0.1:1/x")
    assert "pw-secret" not in info.value.description
