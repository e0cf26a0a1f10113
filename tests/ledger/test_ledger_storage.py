"""Ledger storage contract, for both engines: contiguous indexes, append-only, atomic batches, fail closed.

Tests taking ``storage`` or ``engine`` run against a SQLite file and against the real PostgreSQL
server (a fresh schema per test); engine-specific checks follow each engine's name.
"""

from __future__ import annotations

import sqlite3
import threading

import pytest

from broker.errors import LedgerUnavailable
from broker.ledger.merkle import leaf_hash
from broker.ledger.postgres import PostgresLedgerStorage
from broker.ledger.sqlite import SqliteLedgerStorage
from broker.ledger.storage import DuplicateLeaf


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request, tmp_path):
    """A function opening (and reopening) one ledger storage of the engine under test."""
    if request.param == "sqlite":
        location = tmp_path / "ledger.sqlite3"
        return lambda: SqliteLedgerStorage(location)
    url = request.getfixturevalue("pg_url")
    return lambda: PostgresLedgerStorage(url)


@pytest.fixture
def storage(engine):
    s = engine()
    yield s
    s.close()


def leaves(prefix: str, n: int) -> list[bytes]:
    return [f"{prefix}-{i}".encode() for i in range(n)]


def test_append_read_and_look_up(storage):
    assert storage.size() == 0
    assert storage.append_batch(leaves("a", 3)) == 0
    assert storage.append_batch(leaves("b", 2)) == 3
    assert storage.append_batch([]) == 5
    assert storage.size() == 5
    stored = leaves("a", 3) + leaves("b", 2)
    assert storage.entries(0, 5) == stored
    assert storage.entries(1, 3) == stored[1:3]
    assert storage.leaf_hashes(0, 5) == [leaf_hash(x) for x in stored]
    assert storage.index_of(leaf_hash(b"b-1")) == 4
    assert storage.index_of(leaf_hash(b"absent")) is None
    assert storage.index_of(b"short") is None


def test_data_survives_reopen(engine):
    first = engine()
    first.append_batch(leaves("a", 4))
    first.close()
    again = engine()
    try:
        assert again.size() == 4
        assert again.append_batch([b"next"]) == 4
    finally:
        again.close()


def test_sqlite_file_is_in_wal_mode(tmp_path):
    SqliteLedgerStorage(tmp_path / "ledger.sqlite3").close()
    conn = sqlite3.connect(tmp_path / "ledger.sqlite3")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_duplicate_leaf_rejects_the_whole_batch(storage):
    storage.append_batch([b"x"])
    with pytest.raises(DuplicateLeaf):
        storage.append_batch([b"y", b"x"])
    with pytest.raises(DuplicateLeaf):
        storage.append_batch([b"z", b"z"])
    assert storage.size() == 1
    assert storage.index_of(leaf_hash(b"y")) is None


def test_reading_missing_range_fails_closed(storage):
    storage.append_batch(leaves("a", 2))
    with pytest.raises(LedgerUnavailable):
        storage.entries(0, 3)


def test_checkpoints_and_cosignatures(storage):
    storage.append_batch(leaves("a", 3))
    assert storage.published_checkpoints(10) == []
    storage.record_checkpoint(2, b"\x01" * 32, "note-2\n")
    storage.record_checkpoint(3, b"\x02" * 32, "note-3\n")
    storage.record_checkpoint(3, b"\x03" * 32, "other\n")  # the first one per size stays
    assert storage.published_checkpoints(10) == [(3, b"\x02" * 32), (2, b"\x01" * 32)]
    assert storage.published_checkpoints(1) == [(3, b"\x02" * 32)]
    assert storage.cosignatures(None) is None
    storage.record_cosignatures(2, {"w1": "— w1 old", "w2": "— w2 x"})
    storage.record_cosignatures(2, {"w1": "— w1 new"})
    assert storage.cosignatures(2) == ("note-2\n", ["— w1 new", "— w2 x"])
    assert storage.cosignatures(None) == ("note-2\n", ["— w1 new", "— w2 x"])
    assert storage.cosignatures(3) is None


def test_threads_with_separate_storages_get_disjoint_contiguous_ranges(engine):
    """Two storages are two writers (two processes, or two replicas on PostgreSQL) on one log."""
    stores = [engine(), engine()]
    firsts: list[int] = []
    lock = threading.Lock()

    def work(t: int) -> None:
        for b in range(5):
            first = stores[t % 2].append_batch(leaves(f"t{t}-b{b}", 4))
            with lock:
                firsts.append(first)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    try:
        assert sorted(firsts) == list(range(0, 6 * 5 * 4, 4))
        assert stores[0].size() == stores[1].size() == 120
        assert len(set(stores[1].leaf_hashes(0, 120))) == 120
    finally:
        for s in stores:
            s.close()


@pytest.mark.parametrize("sql", ["UPDATE entries SET leaf = x'00' WHERE idx = 0", "DELETE FROM entries"])
def test_sqlite_entries_are_append_only_for_every_connection(tmp_path, sql):
    storage = SqliteLedgerStorage(tmp_path / "ledger.sqlite3")
    storage.append_batch([b"kept"])
    conn = sqlite3.connect(tmp_path / "ledger.sqlite3")
    try:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute(sql)
    finally:
        conn.close()
    assert storage.entries(0, 1) == [b"kept"]
    storage.close()


def test_threads_get_disjoint_contiguous_ranges(storage):
    firsts: list[int] = []
    lock = threading.Lock()

    def work(t: int) -> None:
        for b in range(5):
            first = storage.append_batch(leaves(f"t{t}-b{b}", 3))
            with lock:
                firsts.append(first)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(firsts) == list(range(0, 8 * 5 * 3, 3))
    assert storage.size() == 120


def test_closed_storage_is_unavailable(storage):
    storage.close()
    storage.close()  # idempotent
    for call in (lambda: storage.size(), lambda: storage.append_batch([b"x"]), lambda: storage.entries(0, 1)):
        with pytest.raises(LedgerUnavailable, match="closed"):
            call()


def test_unopenable_path_is_unavailable_and_does_not_leak_the_path(tmp_path):
    target = tmp_path / "secret-dir-name"
    target.mkdir()  # a directory cannot be opened as a database
    with pytest.raises(LedgerUnavailable) as info:
        SqliteLedgerStorage(target)
    assert "secret-dir-name" not in info.value.description
    assert "SELECT" not in info.value.description and "CREATE" not in info.value.description


def test_write_locked_by_another_process_is_unavailable_and_writes_nothing(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    storage = SqliteLedgerStorage(path, busy_timeout=0.2)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(LedgerUnavailable, match="SQLITE_BUSY"):
            storage.append_batch([b"blocked"])
        other.execute("ROLLBACK")
        assert storage.size() == 0
        assert storage.append_batch([b"after"]) == 0  # the storage recovers once the lock is gone
    finally:
        other.close()
        storage.close()


def test_corrupt_file_is_unavailable(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerUnavailable, match="SQLITE_NOTADB"):
        SqliteLedgerStorage(path)
