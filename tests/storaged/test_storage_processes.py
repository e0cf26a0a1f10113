"""Storage processes (broker.storaged): real processes on real sockets, as `serve --workers 2` runs them."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.clock import FixedClock, SystemClock
from broker.errors import LedgerUnavailable, StoreUnavailable
from broker.ledger import Ledger, NoteSigner, SqliteLedgerStorage, leaf_hash, verify_inclusion
from broker.ledger.merkle import root_from_leaf_hashes
from broker.models import Receipt
from broker.state.remote import RemoteStateStore
from broker.state.store import ConsumeOnce, CountUp, NoMark
from broker.storaged.handlers import checks_to_wire
from broker.storaged.processes import StorageProcess
from broker.storaged.wire import MAX_FRAME, FrameReader, WireError, encode
from tests.helpers import wait_until

ORIGIN = "test.example/ledger"
pytestmark = pytest.mark.anyio


def far() -> float:
    return time.time() + 3600


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[StorageProcess]:
    running = StorageProcess.launch({"state": str(tmp_path / "state.sqlite3"),
                                       "ledger": f"sqlite:///{tmp_path / 'ledger.sqlite3'}"})
    try:
        yield running
    finally:
        running.stop()


def make_ledger(path: Path, socket_path: str | None, *, with_state: bool = False) -> Ledger:
    signer = NoteSigner(ORIGIN, Ed25519PrivateKey.from_private_bytes(b"\x07" * 32))
    ledger = Ledger(SqliteLedgerStorage(path), signer, ORIGIN, FixedClock(1_800_000_000))
    if socket_path is not None:
        ledger.append_through(socket_path, with_state=with_state)
    return ledger



# -- frames ---------------------------------------------------------------------------------------

def test_frames_reassemble_across_any_split() -> None:
    messages = [[(1, "append", (b"x" * 300,))], [(2, "ping", (1.5,))], [(3, True, None)]]
    stream = b"".join(encode(m) for m in messages)
    for cut in range(len(stream) + 1):
        reader = FrameReader()
        assert reader.feed(stream[:cut]) + reader.feed(stream[cut:]) == messages


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (struct.pack("!I", MAX_FRAME + 1), "frame too large"),
        (struct.pack("!I", 3) + b"\xff\xff\xff", "undecodable frame"),
        (struct.pack("!I", 1) + b"", None),  # incomplete: waits for the rest, no error
    ],
)
def test_bad_frames_are_refused(data: bytes, expected: str | None) -> None:
    reader = FrameReader()
    if expected is None:
        assert reader.feed(data) == []
        return
    with pytest.raises(WireError, match=expected):
        reader.feed(data)


# -- the state store through its storage process ---------------------------------------------------

def test_sockets_live_in_a_directory_only_this_user_enters(processes: StorageProcess) -> None:
    for path in processes.sockets.values():
        mode = Path(path).parent.stat().st_mode
        assert stat.S_IMODE(mode) == 0o700
        assert stat.S_ISSOCK(Path(path).stat().st_mode)


async def test_two_workers_share_one_state_file(processes: StorageProcess) -> None:
    """Two stores (two workers' connections) racing on one jti and one budget: exactly one winner each."""
    stores = [RemoteStateStore(processes.sockets["state"], SystemClock()) for _ in range(2)]
    try:
        firsts = await asyncio.gather(*(stores[i % 2].consume_once("jti", "iss\x00one", far()) for i in range(20)))
        assert firsts.count(True) == 1
        totals = await asyncio.gather(*(stores[i % 2].count_up("budget", "b", 3, 10, far()) for i in range(8)))
        assert sorted(t for t in totals if t is not None) == [3, 6, 9]
    finally:
        for store in stores:
            await store.close()


async def test_expired_rows_are_purged_by_the_callers_clock(processes: StorageProcess) -> None:
    """The storage process purges expired rows every 1,024 writes by the time its callers send, as the
    threaded store purges by its own clock: a worker's live single-use value is never purged early."""
    clock = FixedClock(1_000_000_000)  # long before the storage process's own wall clock
    store = RemoteStateStore(processes.sockets["state"], clock)
    try:
        assert await store.consume_once("jti", "live", 1_000_003_600) is True
        await asyncio.gather(*(store.consume_once("jti", f"filler-{i}", 1_000_003_600) for i in range(1100)))
        assert await store.consume_once("jti", "live", 1_000_003_600) is False  # still remembered
    finally:
        await store.close()


async def test_a_killed_state_process_is_replaced_and_loses_nothing_committed(processes: StorageProcess) -> None:
    store = RemoteStateStore(processes.sockets["state"], SystemClock(), timeout=5.0)
    try:
        assert await store.consume_once("jti", "before", far()) is True
        old = processes.pids["state"]
        os.kill(old, signal.SIGKILL)
        await asyncio.to_thread(wait_until, lambda: processes.pids.get("state") not in (None, old))
        # The connection to the old process is gone: the next call reconnects to the replacement.
        answers = []
        for _ in range(3):
            try:
                answers.append(await store.consume_once("jti", "before", far()))
                break
            except StoreUnavailable:
                answers.append("unavailable")  # the call that was on the killed connection
        assert answers[-1] is False  # committed before the kill, still there
        assert await store.consume_once("jti", "after", far()) is True
    finally:
        await store.close()


async def test_a_hung_state_process_fails_closed_within_the_timeout(processes: StorageProcess) -> None:
    store = RemoteStateStore(processes.sockets["state"], SystemClock(), timeout=0.5)
    pid = processes.pids["state"]
    try:
        await store.ping()
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="did not answer in time"):
                await store.consume_once("jti", "while-stopped", far())
            assert time.monotonic() - started < 2.0
        finally:
            os.kill(pid, signal.SIGCONT)
        await store.ping()
    finally:
        await store.close()


async def test_no_storage_process_means_503_at_once(tmp_path: Path) -> None:
    processes = StorageProcess.launch({"state": str(tmp_path / "state.sqlite3")})
    path = processes.sockets["state"]
    processes.stop()
    assert processes.pids == {} or all(not Path(f"/proc/{pid}").exists() for pid in processes.pids.values())
    store = RemoteStateStore(path, SystemClock(), timeout=5.0)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="unreachable"):
        await store.ping()
    assert time.monotonic() - started < 1.0
    await store.close()


async def test_a_malformed_frame_drops_only_its_own_connection(processes: StorageProcess) -> None:
    store = RemoteStateStore(processes.sockets["state"], SystemClock())
    try:
        await store.ping()
        rogue = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        rogue.connect(processes.sockets["state"])
        rogue.sendall(struct.pack("!I", 3) + b"\xff\xff\xff")
        rogue.settimeout(5)
        assert rogue.recv(16) == b""  # the server closed it
        rogue.close()
        assert await store.consume_once("jti", "still-served", far()) is True
    finally:
        await store.close()


async def test_unknown_operations_are_refused_by_name(processes: StorageProcess) -> None:
    store = RemoteStateStore(processes.sockets["state"], SystemClock())
    try:
        with pytest.raises(StoreUnavailable, match="malformed call"):
            await store._call("drop_table", "single_use")  # what a confused peer could send
        with pytest.raises(StoreUnavailable, match="malformed call"):
            await store._channel.call("run_checks", (time.time(), [(9, "ns", "key")], None))
        await store.ping()
    finally:
        await store.close()


# -- ledger appends through its storage process ----------------------------------------------------

async def test_two_workers_append_gapless_and_receipts_verify(processes: StorageProcess, tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    workers = [make_ledger(path, processes.sockets["ledger"]) for _ in range(2)]
    try:
        entries = [{"type": "test", "n": n} for n in range(60)]
        receipts = await asyncio.gather(*(workers[n % 2].append_async(e) for n, e in enumerate(entries)))
        assert sorted(r.index for r in receipts) == list(range(60))
        # The same entry again answers the same leaf, not a second one.
        again = await workers[1].append_async(entries[7])
        assert again == receipts[7]
        reader = make_ledger(path, None)
        try:
            assert reader.size() == 60
            stored = [leaf_hash(leaf) for leaf in SqliteLedgerStorage(path).entries(0, 60)]
            assert {digest.hex() for digest in stored} == {r.leaf_hash for r in receipts}
            root = root_from_leaf_hashes(stored)
            for receipt in receipts:
                assert stored[receipt.index].hex() == receipt.leaf_hash
                verify_inclusion(stored[receipt.index], receipt.index, 60,
                                 reader.inclusion_proof(receipt.index, 60), root)
        finally:
            reader.close()
    finally:
        for ledger in workers:
            ledger.close()


async def test_ledger_appends_fail_closed_while_its_process_is_away(processes: StorageProcess,
                                                                    tmp_path: Path) -> None:
    ledger = make_ledger(tmp_path / "ledger.sqlite3", processes.sockets["ledger"])
    try:
        await ledger.append_async({"type": "test", "n": 1})
        processes.stop()
        with pytest.raises(LedgerUnavailable):
            await ledger.append_async({"type": "test", "n": 2})
    finally:
        ledger.close()


# -- admission and entry in one call ----------------------------------------------------------------

ADMISSIONS = [
    # (what the checks meet, the checks, the refusal the caller learns (None: admitted, entry appended))
    ("first use, budget room", [ConsumeOnce("jti", "a", far()), CountUp("budget", "b", 150, 200, far())], None),
    ("replayed jti", [ConsumeOnce("jti", "a", far()), CountUp("budget", "b", 10, 200, far())], 0),
    ("budget would pass its limit", [ConsumeOnce("jti", "c", far()), CountUp("budget", "b", 60, 200, far())], 1),
    ("suspended workload", [ConsumeOnce("jti", "d", far()), NoMark("suspended", "bot")], 1),
    ("the budget's room is still there", [ConsumeOnce("jti", "e", far()), CountUp("budget", "b", 50, 200, far())],
     None),
    ("budget now full", [ConsumeOnce("jti", "f", far()), CountUp("budget", "b", 1, 200, far())], 1),
]


async def test_admission_and_its_entry_are_one_call_and_a_refusal_appends_nothing(
    processes: StorageProcess, tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = make_ledger(path, processes.sockets["ledger"], with_state=True)
    state = RemoteStateStore(processes.sockets["state"], SystemClock())
    assert ledger.appends_with_state_checks
    try:
        await state.set_mark("suspended", "bot", 1.0, None)
        appended = 0
        for n, (_, checks, refusal) in enumerate(ADMISSIONS):
            outcome = await ledger.append_if_admitted({"type": "test", "n": n}, checks_to_wire(checks), None,
                                                      time.time())
            if refusal is None:
                assert isinstance(outcome, Receipt) and outcome.index == appended, ADMISSIONS[n][0]
                appended += 1
            else:
                assert outcome == refusal, ADMISSIONS[n][0]
            assert SqliteLedgerStorage(path).size() == appended, ADMISSIONS[n][0]
        # As run_checks: the checks before the failing one kept their effect (a refused request's jti is
        # burnt), the failing one had none (the budget holds 200 exactly, not 260 or 201).
        assert await state.run_checks([ConsumeOnce("jti", "c", far())]) == 0
        assert await state.run_checks([ConsumeOnce("jti", "d", far())]) == 0
        assert await state.count_up("budget", "b", 0, 200, far()) == 200
        # A count that can never pass, sent as the call's known failure: checked, refused, nothing appended.
        outcome = await ledger.append_if_admitted({"type": "test", "n": 99},
                                                  checks_to_wire([ConsumeOnce("jti", "g", far())]), 1, time.time())
        assert outcome == 1 and SqliteLedgerStorage(path).size() == appended
        with pytest.raises(StoreUnavailable, match="malformed call"):
            await ledger.append_if_admitted({"type": "test", "n": 100}, [(9, "ns", "key")], None, time.time())
        assert SqliteLedgerStorage(path).size() == appended
    finally:
        ledger.close()
        await state.close()


async def test_a_locked_state_file_refuses_the_call_and_appends_nothing(processes: StorageProcess,
                                                                       tmp_path: Path) -> None:
    from tests.api.test_loop_lag import sqlite_write_lock

    path = tmp_path / "ledger.sqlite3"
    ledger = make_ledger(path, processes.sockets["ledger"], with_state=True)
    try:
        checks = checks_to_wire([ConsumeOnce("jti", "locked", far())])
        await ledger.append_if_admitted({"type": "test", "n": 0}, checks, None, time.time())  # schema in place
        with sqlite_write_lock(tmp_path / "state.sqlite3"):
            with pytest.raises(StoreUnavailable, match="state store unavailable"):
                await ledger.append_if_admitted({"type": "test", "n": 1},
                                                checks_to_wire([ConsumeOnce("jti", "next", far())]), None, time.time())
        assert SqliteLedgerStorage(path).size() == 1
    finally:
        ledger.close()


def test_a_ledger_without_the_state_file_refuses_to_admit(processes: StorageProcess, tmp_path: Path) -> None:
    ledger = make_ledger(tmp_path / "ledger.sqlite3", processes.sockets["ledger"])
    try:
        assert not ledger.appends_with_state_checks
        with pytest.raises(RuntimeError):
            asyncio.run(ledger.append_if_admitted({"type": "test"}, [], None, time.time()))
    finally:
        ledger.close()


def test_stop_ends_every_storage_process(tmp_path: Path) -> None:
    processes = StorageProcess.launch({"state": str(tmp_path / "state.sqlite3"),
                                         "ledger": f"sqlite:///{tmp_path / 'ledger.sqlite3'}"})
    pids = processes.pids
    assert set(pids) == {"state", "ledger"}
    processes.stop()
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert all(not Path(p).exists() for p in processes.sockets.values())
