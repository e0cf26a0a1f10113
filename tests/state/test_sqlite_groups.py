"""The SQLite store's group commit and its cross-process write turn (broker.state.sqlite).

The turn is an exclusive ``flock`` on ``<file>-write.lock``; a test holds it through its own open file
description, exactly as another worker process would, to make jobs queue up into one group or to
keep the store from writing.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from broker.clock import SystemClock
from broker.errors import StoreUnavailable
from broker.state.sqlite import SqliteStateStore
from broker.state.store import ConsumeOnce, CountUp, NoMark

pytestmark = pytest.mark.anyio


def far() -> float:
    return time.time() + 3600


@contextmanager
def holding_turn(db: Path) -> Iterator[None]:
    """Hold the write turn of the store at ``db`` (as a sibling worker process in a transaction would)."""
    fd = os.open(str(db) + "-write.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


async def queued_behind_turn(db: Path, store: SqliteStateStore) -> asyncio.Task[bool]:
    """A job that now waits on the store's thread for the held turn; what queues next forms one group."""
    plug = asyncio.create_task(store.consume_once("plug", "p", far()))
    await asyncio.sleep(0)  # one step of the task: the plug is handed to the store's thread
    deadline = time.monotonic() + 10
    while store._thread.queued:  # until the thread took it (it then waits for the turn)
        assert time.monotonic() < deadline, "the store's thread never took the job"
        await asyncio.sleep(0.005)
    assert not plug.done()
    return plug


async def test_a_failing_job_undoes_only_itself_in_its_group(tmp_path: Path) -> None:
    """One transaction for many callers, and each caller's checks still stand or fall together."""
    db = tmp_path / "state.sqlite3"
    store = SqliteStateStore(db, clock=SystemClock(), timeout=5.0)
    try:
        with holding_turn(db):
            plug = await queued_behind_turn(db, store)
            good = [asyncio.create_task(store.run_checks([ConsumeOnce("jti", f"good-{i}", far()),
                                                          NoMark("suspended", "w"),
                                                          CountUp("rate", "w", 1, 100, far())]))
                    for i in range(10)]
            # Its first check applies, its second cannot be bound (a list is no SQL value): an error.
            bad = asyncio.create_task(store.run_checks([ConsumeOnce("jti", "bad-first", far()),
                                                        CountUp("rate", "w", 1, 100, far()),
                                                        ConsumeOnce("jti", ["not", "a", "key"], far())]))  # type: ignore[arg-type]
            refused = [asyncio.create_task(store.run_checks([ConsumeOnce("jti", f"good-{i}", far())]))
                       for i in range(3)]
            await asyncio.sleep(0)  # one step of each task: all 14 jobs are queued behind the plug
            assert store._thread.queued == 14
        assert await plug is True
        assert await asyncio.gather(*good) == [None] * 10
        with pytest.raises(StoreUnavailable):
            await bad
        assert await asyncio.gather(*refused) == [0, 0, 0]  # the good ones' consumptions are visible
        # The failed job left nothing behind: neither its jti nor its count.
        assert await store.consume_once("jti", "bad-first", far()) is True
        assert await store.count_up("rate", "w", 0, 100, far()) == 10
    finally:
        await store.close()


async def test_a_failing_job_alone_in_its_transaction_leaves_nothing(tmp_path: Path) -> None:
    store = SqliteStateStore(tmp_path / "state.sqlite3", clock=SystemClock())
    try:
        with pytest.raises(StoreUnavailable):
            await store.run_checks([ConsumeOnce("jti", "first", far()), CountUp("rate", "w", 1, 100, far()),
                                    ConsumeOnce("jti", ["not", "a", "key"], far())])  # type: ignore[arg-type]
        assert await store.consume_once("jti", "first", far()) is True
        assert await store.count_up("rate", "w", 0, 100, far()) == 0
    finally:
        await store.close()


async def test_a_caller_who_gave_up_waiting_for_the_turn_is_never_written(tmp_path: Path) -> None:
    """A held turn fails callers closed within the timeout, and their writes do not land later."""
    db = tmp_path / "state.sqlite3"
    store = SqliteStateStore(db, clock=SystemClock(), timeout=0.3)
    try:
        with holding_turn(db):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await store.consume_once("jti", "late", far())
            waited = time.monotonic() - started
            assert 0.3 <= waited < 2.0
            with pytest.raises(StoreUnavailable):
                await store.count_up("rate", "w", 1, 100, far())
        # The turn is free again: the store answers, and neither refused write happened.
        assert await store.consume_once("jti", "late", far()) is True
        assert await store.count_up("rate", "w", 1, 100, far()) == 1
    finally:
        await store.close()


async def test_reads_do_not_wait_for_the_turn(tmp_path: Path) -> None:
    """WAL readers see the last commit while another process writes; reads never take the turn."""
    db = tmp_path / "state.sqlite3"
    store = SqliteStateStore(db, clock=SystemClock(), timeout=0.5)
    try:
        await store.set_mark("suspended", "w", 1.0, None)
        with holding_turn(db):
            assert await store.get_marks([("suspended", "w"), ("suspended", "x")]) == [1.0, None]
            assert await store.get_record("approvals", "none") is None
            await store.ping()
    finally:
        await store.close()


async def test_two_stores_on_one_file_take_turns_without_losing_a_count(tmp_path: Path) -> None:
    """Groups from two stores (two connections, two turns) interleave; every count and jti is exact."""
    db = tmp_path / "state.sqlite3"
    stores = [SqliteStateStore(db, clock=SystemClock(), timeout=5.0) for _ in range(2)]
    try:
        results = await asyncio.gather(*(
            stores[i % 2].run_checks([ConsumeOnce("jti", f"k-{i % 150}", far()), CountUp("rate", "w", 1, 120, far())])
            for i in range(300)
        ))
        # 150 distinct jtis, each offered twice: one use each; of those 150, the first 120 pass the rate.
        assert results.count(None) == 120
        assert results.count(1) == 30
        assert results.count(0) == 150
        assert await stores[0].count_up("rate", "w", 0, 120, far()) == 120
    finally:
        for s in stores:
            await s.close()
