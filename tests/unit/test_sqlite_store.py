"""SQLite single-use store: first use wins, expiry frees a key, processes race safely."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

from broker.clock import FixedClock
from broker.state.sqlite import SqliteStateStore
from tests.helpers import run


def test_first_use_wins(tmp_path: Path) -> None:
    store = SqliteStateStore(tmp_path / "s.db", clock=FixedClock(1000))
    assert run(store.consume_once("identity-jti", "iss\x00a", 2000)) is True
    assert run(store.consume_once("identity-jti", "iss\x00a", 2000)) is False
    assert run(store.consume_once("other", "iss\x00a", 2000)) is True


def test_expired_key_can_be_used_again(tmp_path: Path) -> None:
    clock = FixedClock(1000)
    store = SqliteStateStore(tmp_path / "s.db", clock=clock)
    assert run(store.consume_once("ns", "k", 1010))
    clock.set(1009)
    assert not run(store.consume_once("ns", "k", 1020))
    clock.set(1011)
    assert run(store.consume_once("ns", "k", 1030))


def _race(path: str, keys: list[str], out: mp.Queue) -> None:  # type: ignore[type-arg]
    store = SqliteStateStore(path)
    out.put(sum(run(store.consume_once("ns", k, 4e9)) for k in keys))


def test_processes_never_both_win(tmp_path: Path) -> None:
    path = str(tmp_path / "s.db")
    SqliteStateStore(path).close_now()
    keys = [f"k{i}" for i in range(300)]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(path, keys, out)) for _ in range(3)]
    for p in procs:
        p.start()
    wins = sum(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert wins == len(keys)
