"""One suite, two real backends (SQLite file, Redis server): the same answers for every primitive."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from broker.clock import SystemClock
from broker.errors import StoreUnavailable
from broker.state.tokens import TokenState
from broker.store.base import StateStore
from broker.store.redis import RedisStateStore
from tests.state.conftest import SHARED_REDIS, OwnRedis, make_store


def far() -> float:
    return time.time() + 3600


def test_consume_once_first_use_wins(store: StateStore) -> None:
    assert store.consume_once("jti", "iss\x00a", far()) is True
    assert store.consume_once("jti", "iss\x00a", far()) is False
    assert store.consume_once("other", "iss\x00a", far()) is True


def test_consume_once_forgets_after_expiry(store: StateStore) -> None:
    assert store.consume_once("jti", "k", time.time() + 0.15)
    assert not store.consume_once("jti", "k", far())
    time.sleep(0.25)
    assert store.consume_once("jti", "k", far())


@pytest.mark.parametrize(
    ("amounts", "limit", "expected"),
    [
        ([1, 1, 1], 2, [1, 2, None]),
        ([5000, 5000, 10000, 1], 20000, [5000, 10000, 20000, None]),
        ([20001], 20000, [None]),  # one amount above the limit never counts
        ([3334] * 7, 20000, [3334, 6668, 10002, 13336, 16670, None, None]),
        ([0, 1], 1, [0, 1]),
    ],
)
def test_count_up_stops_at_the_limit(store: StateStore, amounts: list[int], limit: int,
                                     expected: list[int | None]) -> None:
    got = [store.count_up("budget", "k", a, limit, far()) for a in amounts]
    assert got == expected


def test_count_up_refusal_leaves_the_counter(store: StateStore) -> None:
    assert store.count_up("c", "k", 150, 200, far()) == 150
    assert store.count_up("c", "k", 51, 200, far()) is None
    assert store.count_up("c", "k", 50, 200, far()) == 200
    assert store.count_up("c", "other", 200, 200, far()) == 200


def test_count_up_window_expires(store: StateStore) -> None:
    assert store.count_up("c", "k", 1, 1, time.time() + 0.15) == 1
    assert store.count_up("c", "k", 1, 1, far()) is None
    time.sleep(0.25)
    assert store.count_up("c", "k", 1, 1, far()) == 1


def test_marks_keep_the_larger_value(store: StateStore) -> None:
    assert store.get_marks([("m", "a"), ("m", "b")]) == [None, None]
    store.set_mark("m", "a", 100.5, far())
    store.set_mark("m", "a", 50.0, far())
    store.set_mark("m", "b", 7.0, None)
    assert store.get_marks([("m", "a"), ("m", "b"), ("m", "c")]) == [100.5, 7.0, None]
    store.set_mark("m", "a", 200.25, far())
    assert store.get_marks([("m", "a")]) == [200.25]
    assert store.get_marks([]) == []
    # Cut-offs are epoch times with sub-millisecond digits: they come back exactly.
    now = time.time() + 0.000123
    store.set_mark("m", "cutoff", now, far())
    store.set_mark("m", "cutoff", now - 1, far())
    assert store.get_marks([("m", "cutoff")]) == [now]


def test_marks_expire_and_delete(store: StateStore) -> None:
    store.set_mark("m", "short", 1.0, time.time() + 0.15)
    store.set_mark("m", "forever", 1.0, None)
    assert store.delete_mark("m", "forever") is True
    assert store.delete_mark("m", "forever") is False
    time.sleep(0.25)
    assert store.get_marks([("m", "short"), ("m", "forever")]) == [None, None]


def test_racing_threads_never_pass_a_limit(backend: str, tmp_path: Path, redis_prefix: str) -> None:
    stores = [make_store(backend, tmp_path, redis_prefix) for _ in range(4)]
    barrier = threading.Barrier(8)

    def spend(i: int) -> list[int | None]:
        s = stores[i % len(stores)]
        barrier.wait()
        return [s.count_up("budget", "conv", 3334, 20000, far()) for _ in range(5)]

    try:
        with ThreadPoolExecutor(8) as pool:
            results = [r for chunk in pool.map(spend, range(8)) for r in chunk]
        wins = [r for r in results if r is not None]
        assert len(wins) == 5  # 5 x 33.34 = 166.70; a sixth would be 200.04
        assert sorted(wins) == [3334, 6668, 10002, 13336, 16670]
        assert sum(1 for s in stores for _ in [0] if s.consume_once("x", "once", far())) == 1
    finally:
        for s in stores:
            s.close()


def test_redis_fails_closed_and_recovers(own_redis: OwnRedis) -> None:
    store = RedisStateStore(own_redis.url, prefix="t:")
    try:
        assert store.consume_once("jti", "a", far())
        own_redis.stop()
        for call in (store.ping, lambda: store.consume_once("jti", "b", far()),
                     lambda: store.count_up("c", "k", 1, 5, far()), lambda: store.get_marks([("m", "a")]),
                     lambda: store.set_mark("m", "a", 1.0, None), lambda: store.delete_mark("m", "a")):
            with pytest.raises(StoreUnavailable) as info:
                call()
            assert own_redis.url not in info.value.description
        own_redis.start()  # a fresh, empty server on the same port: scripts are reloaded by themselves
        store.ping()
        assert store.count_up("c", "k", 1, 5, far()) == 1
        assert store.consume_once("jti", "b", far())
    finally:
        store.close()


def test_a_redis_that_stops_answering_costs_one_timeout_per_backoff_window() -> None:
    """A server that accepts connections and never answers (a black hole) must not hold every call."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])  # keep it open, never answer
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept)
    thread.start()
    store = RedisStateStore(f"redis://127.0.0.1:{listener.getsockname()[1]}/0", prefix="t:", timeout=0.3,
                            timeout_backoff=1.0)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="TimeoutError"):
            store.consume_once("jti", "a", far())
        assert 0.25 < time.monotonic() - started < 1.0  # one timeout, not retried
        started = time.monotonic()
        for _ in range(20):
            with pytest.raises(StoreUnavailable, match="stopped answering"):
                store.consume_once("jti", "b", far())
        assert time.monotonic() - started < 0.1  # inside the window: fail fast
        time.sleep(1.05)
        with pytest.raises(StoreUnavailable, match="TimeoutError"):
            store.consume_once("jti", "c", far())  # after the window: it tries again
    finally:
        store.close()
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()


def test_redis_publishes_state_events(redis_prefix: str) -> None:
    """Verifier caches outside the broker learn of revocations and suspensions on <prefix>events."""
    listener = redis.Redis.from_url(SHARED_REDIS).pubsub()
    listener.subscribe(redis_prefix + "events")
    assert listener.get_message(timeout=2)["type"] == "subscribe"
    store = RedisStateStore(SHARED_REDIS, prefix=redis_prefix)
    tokens = TokenState(store, SystemClock())
    try:
        tokens.suspend("support-assistant")
        tokens.revoke_scope("conversation", "conv-9")
        events = [json.loads(listener.get_message(timeout=2)["data"]) for _ in range(2)]
        assert events[0]["kind"] == "suspension" and events[0]["workload"] == "support-assistant"
        assert events[0]["suspended"] is True
        assert events[1] == {"kind": "revocation", "scope": "conversation", "value": "conv-9",
                             "before": events[1]["before"]}
    finally:
        listener.close()
        store.close()


def test_records_create_once_and_swap_by_version(store: StateStore) -> None:
    assert store.get_record("approval", "r1") is None
    assert store.put_record("approval", "r1", '{"status":"pending"}', far()) is True
    assert store.put_record("approval", "r1", '{"status":"other"}', far()) is False
    assert store.get_record("approval", "r1") == ('{"status":"pending"}', 1)
    assert store.swap_record("approval", "r1", 1, '{"status":"approved"}', far()) is True
    assert store.swap_record("approval", "r1", 1, '{"status":"denied"}', far()) is False  # stale version
    assert store.get_record("approval", "r1") == ('{"status":"approved"}', 2)
    assert store.swap_record("approval", "missing", 1, "{}", far()) is False
    assert store.get_record("other", "r1") is None


def test_records_list_live_ones_soonest_first_and_expire(store: StateStore) -> None:
    store.put_record("approval", "late", "L", far() + 10)
    store.put_record("approval", "soon", "S", time.time() + 0.2)
    store.put_record("session", "x", "X", far())
    assert store.list_records("approval", 10) == [("soon", "S", 1), ("late", "L", 1)]
    assert store.list_records("approval", 1) == [("soon", "S", 1)]
    time.sleep(0.3)
    assert store.list_records("approval", 10) == [("late", "L", 1)]
    assert store.get_record("approval", "soon") is None
    assert store.swap_record("approval", "soon", 1, "S2", far()) is False  # an expired record is gone
    assert store.put_record("approval", "soon", "S3", far()) is True


def test_racing_swaps_have_one_winner(backend: str, tmp_path: Path, redis_prefix: str) -> None:
    first = make_store(backend, tmp_path, redis_prefix)
    first.put_record("approval", "race", "0", far())
    stores = [make_store(backend, tmp_path, redis_prefix) for _ in range(4)]
    try:
        with ThreadPoolExecutor(8) as pool:
            wins = list(pool.map(lambda i: stores[i % 4].swap_record("approval", "race", 1, str(i), far()), range(16)))
        assert wins.count(True) == 1
        assert first.get_record("approval", "race")[1] == 2  # type: ignore[index]
    finally:
        for s in [first, *stores]:
            s.close()
