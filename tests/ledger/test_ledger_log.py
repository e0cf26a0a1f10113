"""The Ledger end to end: group commit, receipts that verify, several processes, failures."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.clock import FixedClock
from broker.errors import InvalidRequest, LedgerUnavailable, NotFound
from broker.ledger import (
    MAX_ENTRIES_PER_CALL,
    Ledger,
    NoteSigner,
    SqliteLedgerStorage,
    decode_entry,
    encode_entry,
    leaf_hash,
    verify_checkpoint,
    verify_consistency,
    verify_inclusion,
)
from broker.models import Receipt

ORIGIN = "test.example/ledger"
KEY_SEED = b"\x05" * 32


def make_ledger(path: Path, storage: SqliteLedgerStorage | None = None, **kwargs) -> Ledger:
    signer = NoteSigner(ORIGIN, Ed25519PrivateKey.from_private_bytes(KEY_SEED))
    return Ledger(storage or SqliteLedgerStorage(path), signer, ORIGIN, FixedClock(1_800_000_000), **kwargs)


@pytest.fixture
def ledger(tmp_path):
    led = make_ledger(tmp_path / "ledger.sqlite3")
    yield led
    led.close()


def entry(n: int, who: str = "main") -> dict:
    return {"v": 1, "kind": "issuance", "request_id": f"{who}-{n}", "n": n}


def assert_receipt_verifies(led: Ledger, receipt: Receipt, note: str) -> None:
    checkpoint = verify_checkpoint(note, led.verifier_key, expected_origin=ORIGIN)
    proof = led.inclusion_proof(receipt.index, checkpoint.size)
    verify_inclusion(bytes.fromhex(receipt.leaf_hash), receipt.index, checkpoint.size, proof, checkpoint.root)


def writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ledger-writer"]


# -- basic behaviour --------------------------------------------------------------------------------------


def test_append_returns_a_receipt_for_the_canonical_leaf(ledger):
    e = {"b": 2, "a": 1}
    receipt = ledger.append(e)
    leaf = encode_entry(e)
    assert receipt == Receipt(index=0, leaf_hash=leaf_hash(leaf).hex())
    assert ledger.entries(0, 1) == [leaf]
    assert decode_entry(ledger.entries(0, 1)[0]) == e
    assert ledger.size() == 1
    assert ledger.find(receipt.leaf_hash) == 0
    assert ledger.find(receipt.leaf_hash.upper()) == 0
    assert_receipt_verifies(ledger, receipt, ledger.checkpoint())


def test_empty_ledger_checkpoint(ledger):
    checkpoint = verify_checkpoint(ledger.checkpoint(), ledger.verifier_key, ORIGIN)
    assert checkpoint.size == 0


def test_entry_that_cannot_be_canonicalised_is_a_value_error(ledger):
    with pytest.raises(ValueError):
        ledger.append({"x": float("nan")})
    assert ledger.size() == 0


def test_identical_entry_gets_the_existing_receipt(ledger):
    first = ledger.append(entry(1))
    ledger.append(entry(2))
    assert ledger.append(entry(1)) == first
    assert ledger.size() == 2


def test_identical_entries_in_one_batch_share_one_leaf(ledger):
    barrier = threading.Barrier(20)
    receipts: list[Receipt] = []

    def work() -> None:
        barrier.wait()
        receipts.append(ledger.append(entry(7)))

    threads = [threading.Thread(target=work) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(receipts)) == 1
    assert ledger.size() == 1


def test_checkpoint_is_cached_per_size(ledger):
    ledger.append(entry(1))
    note = ledger.checkpoint()
    assert ledger.checkpoint() is note
    ledger.append(entry(2))
    assert ledger.checkpoint() != note


def test_consistency_between_checkpoints(ledger):
    notes = []
    for n in range(1, 12):
        ledger.append(entry(n))
        notes.append(ledger.checkpoint())
    heads = [verify_checkpoint(n, ledger.verifier_key, ORIGIN) for n in notes]
    for old in heads:
        for new in heads:
            if old.size <= new.size:
                proof = ledger.consistency_proof(old.size, new.size)
                verify_consistency(old.size, new.size, old.root, new.root, proof)


def test_async_append(ledger):
    async def main() -> list[Receipt]:
        return await asyncio.gather(*(ledger.append_async(entry(n)) for n in range(50)))

    receipts = asyncio.run(main())
    assert sorted(r.index for r in receipts) == list(range(50))
    note = ledger.checkpoint()
    for r in receipts:
        assert_receipt_verifies(ledger, r, note)


def test_async_append_cancelled_before_its_batch_is_written_is_left_out(ledger):
    async def main() -> Receipt:
        doomed = asyncio.ensure_future(ledger.append_async(entry(1)))
        kept = asyncio.ensure_future(ledger.append_async(entry(2)))
        await asyncio.sleep(0)  # both are queued on the loop, not yet handed to the writer
        doomed.cancel()
        return await kept

    receipt = asyncio.run(main())
    assert ledger.size() == 1 and receipt.index == 0
    assert decode_entry(ledger.entries(0, 1)[0])["n"] == 2


def test_async_append_times_out_when_the_writer_is_stuck(tmp_path):
    release = threading.Event()

    class Stuck(SqliteLedgerStorage):
        def append_batch(self, leaves: list[bytes]) -> int:
            release.wait(10)
            return super().append_batch(leaves)

    led = make_ledger(tmp_path / "ledger.sqlite3", Stuck(tmp_path / "ledger.sqlite3"), append_timeout=0.2)
    try:
        with pytest.raises(LedgerUnavailable, match="timed out"):
            asyncio.run(led.append_async(entry(1)))
    finally:
        release.set()
        led.close()


def test_async_append_after_close_is_unavailable(tmp_path):
    led = make_ledger(tmp_path / "ledger.sqlite3")
    led.close()
    with pytest.raises(LedgerUnavailable, match="closed"):
        asyncio.run(led.append_async(entry(1)))


# -- range and argument checks ----------------------------------------------------------------------


def test_entries_range_is_capped_and_clamped(tmp_path):
    storage = SqliteLedgerStorage(tmp_path / "big.sqlite3")
    storage.append_batch([f"leaf-{i}".encode() for i in range(1500)])
    with make_ledger(tmp_path / "big.sqlite3", storage) as led:
        assert len(led.entries(0, 1500)) == MAX_ENTRIES_PER_CALL
        assert led.entries(1400, 5000) == [f"leaf-{i}".encode() for i in range(1400, 1500)]
        assert led.entries(1499, 1500) == [b"leaf-1499"]


@pytest.mark.parametrize(
    "call",
    [
        lambda led: led.entries(-1, 2),
        lambda led: led.entries(2, 2),
        lambda led: led.entries(3, 1),
        lambda led: led.entries(5, 10),  # starts beyond the log
        lambda led: led.entries("0", 2),
        lambda led: led.inclusion_proof(5, 5),
        lambda led: led.inclusion_proof(0, 6),
        lambda led: led.inclusion_proof(-1, 5),
        lambda led: led.consistency_proof(4, 3),
        lambda led: led.consistency_proof(1, 6),
        lambda led: led.find("zz"),
        lambda led: led.find("ab" * 31),
        lambda led: led.find("ab" * 32 + "\n"),
    ],
)
def test_bad_requests(ledger, call):
    for n in range(5):
        ledger.append(entry(n))
    with pytest.raises(InvalidRequest):
        call(ledger)


def test_find_absent_is_not_found(ledger):
    with pytest.raises(NotFound):
        ledger.find("00" * 32)


# -- concurrency ---------------------------------------------------------------------------------------------


class CountingStorage(SqliteLedgerStorage):
    """The real storage, counting transactions, to observe group commit."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.batches: list[int] = []

    def append_batch(self, leaves: list[bytes]) -> int:
        self.batches.append(len(leaves))
        return super().append_batch(leaves)


def test_group_commit_200_threads(tmp_path):
    storage = CountingStorage(tmp_path / "ledger.sqlite3")
    led = make_ledger(tmp_path / "ledger.sqlite3", storage)
    n = 200
    barrier = threading.Barrier(n)
    receipts: list[Receipt] = []
    errors: list[BaseException] = []

    def work(i: int) -> None:
        barrier.wait()
        try:
            receipts.append(led.append(entry(i)))
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors
        assert sorted(r.index for r in receipts) == list(range(n))
        assert len({r.leaf_hash for r in receipts}) == n
        # Many callers shared each fsync.
        assert sum(storage.batches) == n
        assert len(storage.batches) < n // 2, storage.batches
        print(f"group commit: {n} appends in {len(storage.batches)} transactions")
        note = led.checkpoint()
        assert verify_checkpoint(note, led.verifier_key, ORIGIN).size == n
        for r in receipts:
            assert_receipt_verifies(led, r, note)
    finally:
        led.close()


def _process_worker(path: str, who: str, count: int, out) -> None:  # runs in a spawned process
    led = make_ledger(Path(path))
    try:
        results: list[tuple[int, str]] = []
        lock = threading.Lock()

        def work(t: int) -> None:
            for n in range(t, count, 4):
                r = led.append(entry(n, who))
                with lock:
                    results.append((r.index, r.leaf_hash))

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out.put(results)
    finally:
        led.close()


def test_two_processes_and_this_one_append_to_one_file(tmp_path):
    path = tmp_path / "shared.sqlite3"
    led = make_ledger(path)
    try:
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        procs = [ctx.Process(target=_process_worker, args=(str(path), f"p{i}", 150, out)) for i in range(2)]
        for p in procs:
            p.start()
        # Append from this process at the same time; its tree must catch up with the others.
        mine = [led.append(entry(n, "parent")) for n in range(60)]
        theirs = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
        receipts = [(r.index, r.leaf_hash) for r in mine] + [x for batch in theirs for x in batch]
        assert len(receipts) == 360
        assert sorted(i for i, _ in receipts) == list(range(360))
        assert led.size() == 360
        note = led.checkpoint()
        for index, digest in receipts:
            assert_receipt_verifies(led, Receipt(index, digest), note)
            assert led.find(digest) == index
        # A fresh reader of the same file derives the same tree head.
        with make_ledger(path) as fresh:
            assert verify_checkpoint(fresh.checkpoint(), fresh.verifier_key).root == (
                verify_checkpoint(note, led.verifier_key).root
            )
    finally:
        led.close()


# -- failure and shutdown ---------------------------------------------------------------------------


def test_locked_database_fails_the_append_and_acknowledges_nothing(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    led = make_ledger(path, SqliteLedgerStorage(path, busy_timeout=0.2))
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(LedgerUnavailable):
            led.append(entry(1))
        other.execute("ROLLBACK")
        assert led.size() == 0
        assert led.append(entry(2)).index == 0  # the writer thread survived the failure
    finally:
        other.close()
        led.close()


def test_storage_closed_underneath_is_unavailable(tmp_path):
    storage = SqliteLedgerStorage(tmp_path / "ledger.sqlite3")
    led = make_ledger(tmp_path / "ledger.sqlite3", storage)
    try:
        storage.close()
        with pytest.raises(LedgerUnavailable):
            led.append(entry(1))
        with pytest.raises(LedgerUnavailable):
            led.checkpoint()
    finally:
        led.close()


def test_async_append_failure_is_unavailable(tmp_path):
    storage = SqliteLedgerStorage(tmp_path / "ledger.sqlite3")
    led = make_ledger(tmp_path / "ledger.sqlite3", storage)
    try:
        storage.close()
        with pytest.raises(LedgerUnavailable):
            asyncio.run(led.append_async(entry(1)))
    finally:
        led.close()


def test_close_while_appending_loses_nothing_acknowledged_and_stops_the_writer(tmp_path):
    before = len(writer_threads())
    led = make_ledger(tmp_path / "ledger.sqlite3")
    assert len(writer_threads()) == before + 1
    receipts: list[Receipt] = []
    refused: list[LedgerUnavailable] = []
    barrier = threading.Barrier(41)

    def work(n: int) -> None:
        barrier.wait()
        try:
            receipts.append(led.append(entry(n)))
        except LedgerUnavailable as exc:
            refused.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(40)]
    for t in threads:
        t.start()
    barrier.wait()
    led.close()  # races with the appends: each one is either durable or refused
    for t in threads:
        t.join()
    led.close()  # idempotent
    assert len(writer_threads()) == before
    assert len(receipts) + len(refused) == 40
    assert all("closed" in exc.description for exc in refused)
    with pytest.raises(LedgerUnavailable, match="closed"):
        led.append(entry(99))
    with make_ledger(tmp_path / "ledger.sqlite3") as again:
        assert again.size() == len(receipts)
        for r in receipts:
            assert again.find(r.leaf_hash) == r.index


def test_bad_origin_is_refused_at_construction(tmp_path):
    signer = NoteSigner(ORIGIN, Ed25519PrivateKey.from_private_bytes(KEY_SEED))
    storage = SqliteLedgerStorage(tmp_path / "ledger.sqlite3")
    try:
        with pytest.raises(ValueError):
            Ledger(storage, signer, "not a valid origin", FixedClock(0))
    finally:
        storage.close()
