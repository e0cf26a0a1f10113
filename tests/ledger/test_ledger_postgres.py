"""PostgreSQL ledger storage: what the database itself enforces, replicas on one log, failures.

All against the real server on 127.0.0.1:5432 (a database per test session, a schema per test).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.clock import FixedClock
from broker.errors import LedgerUnavailable
from broker.ledger import Ledger, NoteSigner, leaf_hash, root_from_leaf_hashes, verify_checkpoint, verify_consistency
from broker.ledger.postgres import PostgresLedgerStorage
from broker.ledger.storage import DuplicateLeaf
from broker.pg import SCHEMA_VERSION, SchemaOutdated
from tests.pg import new_schema, with_schema

ORIGIN = "test.example/ledger"
KEY_SEED = b"\x07" * 32


def replica(url: str) -> Ledger:
    """One replica's ledger: the shared key and origin, its own connections."""
    signer = NoteSigner(ORIGIN, Ed25519PrivateKey.from_private_bytes(KEY_SEED))
    return Ledger(PostgresLedgerStorage(url), signer, ORIGIN, FixedClock(1_800_000_000))


@pytest.fixture
def storage(pg_url):
    s = PostgresLedgerStorage(pg_url)
    yield s
    s.close()


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("UPDATE ledger_entries SET leaf = '\\x00' WHERE idx = 0", "append-only"),
        ("UPDATE ledger_entries SET leaf_hash = leaf_hash WHERE idx = 0", "append-only"),
        ("DELETE FROM ledger_entries WHERE idx = 1", "append-only"),
        ("TRUNCATE ledger_entries CASCADE", "append-only"),
        ("UPDATE ledger_checkpoints SET note = 'forged'", "append-only"),
        ("DELETE FROM ledger_checkpoints", "append-only"),
        ("TRUNCATE ledger_checkpoints CASCADE", "append-only"),
        ("UPDATE ledger_sequencer SET next_idx = 1", "only moves forward"),
        ("DELETE FROM ledger_sequencer", "only moves forward"),
        ("TRUNCATE ledger_sequencer", "append-only"),
        ("INSERT INTO ledger_sequencer VALUES (false, 0)", "ledger_sequencer_singleton_check"),
    ],
)
def test_database_refuses_rewrites_even_for_a_superuser(storage, pg_url, sql, message):
    storage.append_batch([b"e0", b"e1", b"e2"])
    storage.record_checkpoint(3, b"\x01" * 32, "note\n")
    with psycopg.connect(pg_url, autocommit=True) as conn:  # postgres: a superuser, owner of everything
        with pytest.raises(psycopg.errors.IntegrityError, match=message):
            conn.execute(sql)
    assert storage.entries(0, 3) == [b"e0", b"e1", b"e2"]
    assert storage.size() == 3
    assert storage.published_checkpoints(5) == [(3, b"\x01" * 32)]


def test_broker_role_has_no_privilege_to_rewrite(pg_database):
    role = f"broker_{uuid.uuid4().hex[:8]}"
    schema_url = new_schema(pg_database, migrate=False)
    with psycopg.connect(pg_database, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        schema = schema_url.rsplit("search_path%3D", 1)[1]
        with psycopg.connect(pg_database, autocommit=True) as admin:
            admin.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')
        done = subprocess.run(
            [sys.executable, "-m", "broker.cli.main", "db", "upgrade", "--url", schema_url, "--grant", role],
            capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert f"schema version {SCHEMA_VERSION}" in done.stdout
        role_url = with_schema(pg_database.replace("postgres@", f"{role}@"), schema)
        s = PostgresLedgerStorage(role_url)
        try:
            assert s.append_batch([b"a", b"b"]) == 0  # the broker's role can append ...
            s.record_checkpoint(2, b"\x02" * 32, "n\n")
            s.record_cosignatures(2, {"w": "line"})
            with psycopg.connect(role_url, autocommit=True) as conn:  # ... and nothing else
                for sql in ("UPDATE ledger_entries SET leaf = '\\x00'", "DELETE FROM ledger_entries",
                            "TRUNCATE ledger_entries", "DELETE FROM ledger_checkpoints",
                            "ALTER TABLE ledger_entries DISABLE TRIGGER ALL",
                            "DROP TRIGGER ledger_entries_append_only ON ledger_entries"):
                    with pytest.raises(psycopg.errors.InsufficientPrivilege):
                        conn.execute(sql)
            assert s.entries(0, 2) == [b"a", b"b"]
        finally:
            s.close()
    finally:
        with psycopg.connect(pg_database, autocommit=True) as admin:
            admin.execute(f'DROP OWNED BY "{role}"')
            admin.execute(f'DROP ROLE "{role}"')


def test_schema_older_than_needed_is_refused_naming_the_command(pg_database):
    url = new_schema(pg_database, migrate=False)
    with pytest.raises(SchemaOutdated, match=r"version 0, this broker needs \d+: run `nhi-broker db upgrade --url"):
        PostgresLedgerStorage(url)
    status = subprocess.run([sys.executable, "-m", "broker.cli.main", "db", "status", "--url", url],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 1 and "needs `nhi-broker db upgrade`" in status.stdout
    for _ in range(2):  # idempotent
        done = subprocess.run([sys.executable, "-m", "broker.cli.main", "db", "upgrade", "--url", url],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    assert "applied 1:" not in done.stdout  # the second run applied nothing
    PostgresLedgerStorage(url).close()


def test_commits_are_synchronous_even_when_the_server_default_is_off(pg_url):
    weakened = pg_url + "%20-c%20synchronous_commit%3Doff"
    s = PostgresLedgerStorage(weakened)
    try:
        s.append_batch([b"x"])
        conn = s._writer.connection
        assert conn is not None and conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
        # A replica that vanishes mid-batch cannot hold the sequencer row for long.
        assert conn.execute("SHOW idle_in_transaction_session_timeout").fetchone() == ("10s",)
    finally:
        s.close()


def test_unreachable_server_is_unavailable_without_leaking_the_url():
    with pytest.raises(LedgerUnavailable) as info:
        PostgresLedgerStorage("postgresql://broker:s3cret-pw@127.0.0.1:1/ledger")
    assert "s3cret" not in info.value.description and "127.0.0.1" not in info.value.description


def test_service_resumes_after_the_server_drops_every_connection(storage, pg_url):
    storage.append_batch([b"before"])
    assert storage.size() == 1
    with psycopg.connect(pg_url, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name LIKE 'nhi-broker ledger%%' AND pid <> pg_backend_pid()"
        ).fetchone()
    assert killed is not None and killed[0] >= 2
    # Stale connections fail on first use; the storage reconnects and repeats only what is safe to.
    assert storage.append_batch([b"after"]) == 1
    assert storage.entries(0, 2) == [b"before", b"after"]


def test_a_failed_batch_leaves_no_gap(storage):
    storage.append_batch([b"a"])
    with pytest.raises(DuplicateLeaf):
        storage.append_batch([b"b", b"a"])
    assert storage.append_batch([b"c"]) == 1  # the sequencer rolled back with the batch
    assert storage.entries(0, 2) == [b"a", b"c"]


def test_replicas_sign_one_consistent_tree_under_concurrent_writers(pg_url):
    """Two replicas in this process and one writer in another append at once; every checkpoint any of
    them signs is over a tree recomputed from storage, and all are consistent with the final one."""
    writer = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from tests.ledger.test_ledger_postgres import replica\n"
         "with replica(sys.argv[1]) as ledger:\n"
         "    for i in range(300): ledger.append({'kind': 'other-process', 'i': i})\n", pg_url],
    )
    a, b = replica(pg_url), replica(pg_url)
    notes: list[str] = []
    receipts = []
    lock = threading.Lock()

    def work(ledger: Ledger, name: str) -> None:
        for i in range(150):
            r = ledger.append({"kind": name, "i": i})
            note = ledger.checkpoint() if i % 10 == 0 else None
            with lock:
                receipts.append(r)
                if note:
                    notes.append(note)

    try:
        threads = [threading.Thread(target=work, args=(led, f"{n}{t}")) for n, led in (("a", a), ("b", b))
                   for t in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert writer.wait(timeout=60) == 0
        # The same entry from two replicas is one leaf, one index.
        assert a.append({"kind": "same"}) == b.append({"kind": "same"})
        final = verify_checkpoint(b.checkpoint(), a.verifier_key, expected_origin=ORIGIN)
        assert final.size == 4 * 150 + 300 + 1
        leaves = a.entries(0, 1000) + a.entries(1000, final.size) if final.size > 1000 else a.entries(0, final.size)
        hashes = [leaf_hash(x) for x in leaves]
        assert root_from_leaf_hashes(hashes) == final.root
        assert len(set(hashes)) == final.size
        assert sorted(r.index for r in receipts) == sorted({r.index for r in receipts})
        for r in receipts:
            assert hashes[r.index].hex() == r.leaf_hash
        for note in notes:
            cp = verify_checkpoint(note, b.verifier_key, expected_origin=ORIGIN)
            assert root_from_leaf_hashes(hashes[: cp.size]) == cp.root
            verify_consistency(cp.size, final.size, cp.root, final.root, b.consistency_proof(cp.size, final.size))
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        a.close()
        b.close()


def test_tile_roots_are_kept_first_come_and_read_up_to_the_first_gap(storage, pg_url):
    r = [bytes([i]) * 32 for i in range(8)]
    storage.record_tile_roots(0, [r[0], r[1]])
    storage.record_tile_roots(1, [r[7], r[2]])  # tile 1 is already recorded: its first root stays
    storage.record_tile_roots(5, [r[5]])
    storage.record_tile_roots(6, [])
    assert storage.tile_roots(0, 10) == [r[0], r[1], r[2]]  # stops before the unrecorded tile 3
    assert storage.tile_roots(5, 6) == [r[5]]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.IntegrityError, match="append-only"):
            conn.execute("UPDATE ledger_tile_roots SET root = root")


def test_a_deleted_row_is_named(storage, pg_url):
    storage.append_batch([b"a", b"b", b"c"])
    with psycopg.connect(pg_url, autocommit=True) as conn:  # an attacker with the owner's rights
        conn.execute("ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_append_only")
        conn.execute("DELETE FROM ledger_entries WHERE idx = 1")
    with pytest.raises(LedgerUnavailable, match="missing entry 1"):
        storage.leaf_hashes(0, 3)
    with pytest.raises(LedgerUnavailable, match="missing entry 1"):
        storage.entries(1, 2)
    assert storage.entries(2, 3) == [b"c"]
