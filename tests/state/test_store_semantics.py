"""One suite, two real backends (SQLite file, Redis server): the same answers for every primitive."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import anyio
import pytest
import redis

from broker.clock import SystemClock
from broker.errors import StoreUnavailable
from broker.state.redis import RedisStateStore
from broker.state.store import ConsumeOnce, CountUp, NoMark, StateStore
from broker.state.tokens import TokenState
from tests.state.conftest import SHARED_REDIS, STORE_BACKENDS, OwnRedis, make_store, store_backend

pytestmark = pytest.mark.anyio


@pytest.fixture(params=STORE_BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Both backends, and the SQLite file through a storage process (broker.storaged)."""
    yield from store_backend(str(request.param), tmp_path)


def far() -> float:
    return time.time() + 3600


async def test_consume_once_first_use_wins(store: StateStore) -> None:
    assert await store.consume_once("jti", "iss\x00a", far()) is True
    assert await store.consume_once("jti", "iss\x00a", far()) is False
    assert await store.consume_once("other", "iss\x00a", far()) is True


async def test_consume_once_forgets_after_expiry(store: StateStore) -> None:
    assert await store.consume_once("jti", "k", time.time() + 0.15)
    assert not await store.consume_once("jti", "k", far())
    await anyio.sleep(0.25)
    assert await store.consume_once("jti", "k", far())


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
async def test_count_up_stops_at_the_limit(store: StateStore, amounts: list[int], limit: int,
                                     expected: list[int | None]) -> None:
    got = [await store.count_up("budget", "k", a, limit, far()) for a in amounts]
    assert got == expected


async def test_count_up_refusal_leaves_the_counter(store: StateStore) -> None:
    assert await store.count_up("c", "k", 150, 200, far()) == 150
    assert await store.count_up("c", "k", 51, 200, far()) is None
    assert await store.count_up("c", "k", 50, 200, far()) == 200
    assert await store.count_up("c", "other", 200, 200, far()) == 200


async def test_count_up_window_expires(store: StateStore) -> None:
    assert await store.count_up("c", "k", 1, 1, time.time() + 0.15) == 1
    assert await store.count_up("c", "k", 1, 1, far()) is None
    await anyio.sleep(0.25)
    assert await store.count_up("c", "k", 1, 1, far()) == 1


async def test_marks_keep_the_larger_value(store: StateStore) -> None:
    assert await store.get_marks([("m", "a"), ("m", "b")]) == [None, None]
    await store.set_mark("m", "a", 100.5, far())
    await store.set_mark("m", "a", 50.0, far())
    await store.set_mark("m", "b", 7.0, None)
    assert await store.get_marks([("m", "a"), ("m", "b"), ("m", "c")]) == [100.5, 7.0, None]
    await store.set_mark("m", "a", 200.25, far())
    assert await store.get_marks([("m", "a")]) == [200.25]
    assert await store.get_marks([]) == []
    # Cut-offs are epoch times with sub-millisecond digits: they come back exactly.
    now = time.time() + 0.000123
    await store.set_mark("m", "cutoff", now, far())
    await store.set_mark("m", "cutoff", now - 1, far())
    assert await store.get_marks([("m", "cutoff")]) == [now]


async def test_marks_expire_and_delete(store: StateStore) -> None:
    await store.set_mark("m", "short", 1.0, time.time() + 0.15)
    await store.set_mark("m", "forever", 1.0, None)
    assert await store.delete_mark("m", "forever") is True
    assert await store.delete_mark("m", "forever") is False
    await anyio.sleep(0.25)
    assert await store.get_marks([("m", "short"), ("m", "forever")]) == [None, None]


async def test_racing_stores_never_pass_a_limit(backend: str, tmp_path: Path, redis_prefix: str) -> None:
    """Four stores (four connections: SQLite threads or Redis connections) race on one budget and one jti."""
    stores = [make_store(backend, tmp_path, redis_prefix) for _ in range(4)]

    async def spend(i: int) -> list[int | None]:
        s = stores[i % len(stores)]
        return [await s.count_up("budget", "conv", 3334, 20000, far()) for _ in range(5)]

    try:
        chunks = await asyncio.gather(*(spend(i) for i in range(8)))
        results = [r for chunk in chunks for r in chunk]
        wins = [r for r in results if r is not None]
        assert len(wins) == 5  # 5 x 33.34 = 166.70; a sixth would be 200.04
        assert sorted(wins) == [3334, 6668, 10002, 13336, 16670]
        firsts = await asyncio.gather(*(s.consume_once("x", "once", far()) for s in stores))
        assert sum(firsts) == 1
    finally:
        for s in stores:
            await s.close()


async def test_redis_fails_closed_and_recovers(own_redis: OwnRedis) -> None:
    store = RedisStateStore(own_redis.url, prefix="t:", fail_fast=0.0)
    try:
        assert await store.consume_once("jti", "a", far())
        own_redis.stop()
        calls: list[Callable[[], Awaitable[object]]] = [
            store.ping, lambda: store.consume_once("jti", "b", far()), lambda: store.count_up("c", "k", 1, 5, far()),
            lambda: store.get_marks([("m", "a")]), lambda: store.set_mark("m", "a", 1.0, None),
            lambda: store.delete_mark("m", "a"), lambda: store.run_checks([ConsumeOnce("jti", "c", far())]),
        ]
        for call in calls:
            with pytest.raises(StoreUnavailable) as info:
                await call()
            assert own_redis.url not in info.value.description
        own_redis.start()  # a fresh, empty server on the same port: scripts are reloaded by themselves
        await store.ping()
        assert await store.count_up("c", "k", 1, 5, far()) == 1
        assert await store.consume_once("jti", "b", far())
    finally:
        await store.close()


async def test_a_redis_that_stops_answering_costs_one_timeout_per_backoff_window(black_hole: str) -> None:
    """A server that accepts connections and never answers (a black hole) must not hold every call."""
    store = RedisStateStore(black_hole, prefix="t:", timeout=0.3, fail_fast=1.0)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="TimeoutError"):
            await store.consume_once("jti", "a", far())
        assert 0.25 < time.monotonic() - started < 1.0  # one timeout, not retried
        started = time.monotonic()
        for _ in range(20):
            with pytest.raises(StoreUnavailable, match="stopped answering"):
                await store.consume_once("jti", "b", far())
        assert time.monotonic() - started < 0.1  # inside the window: fail fast
        await anyio.sleep(1.05)
        with pytest.raises(StoreUnavailable, match="TimeoutError"):
            await store.consume_once("jti", "c", far())  # after the window: it tries again
    finally:
        await store.close()


async def test_redis_publishes_state_events(redis_prefix: str) -> None:
    """Verifier caches outside the broker learn of revocations and suspensions on <prefix>events."""
    listener = redis.Redis.from_url(SHARED_REDIS).pubsub()
    listener.subscribe(redis_prefix + "events")
    assert listener.get_message(timeout=2)["type"] == "subscribe"
    store = RedisStateStore(SHARED_REDIS, prefix=redis_prefix)
    tokens = TokenState(store, SystemClock())
    try:
        await tokens.suspend("support-assistant")
        await tokens.revoke_scope("conversation", "conv-9")
        events = [json.loads(listener.get_message(timeout=2)["data"]) for _ in range(2)]
        assert events[0]["kind"] == "suspension" and events[0]["workload"] == "support-assistant"
        assert events[0]["suspended"] is True
        assert events[1] == {"kind": "revocation", "scope": "conversation", "value": "conv-9",
                             "before": events[1]["before"]}
    finally:
        listener.close()
        await store.close()


async def test_records_create_once_and_swap_by_version(store: StateStore) -> None:
    assert await store.get_record("approval", "r1") is None
    assert await store.put_record("approval", "r1", '{"status":"pending"}', far()) is True
    assert await store.put_record("approval", "r1", '{"status":"other"}', far()) is False
    assert await store.get_record("approval", "r1") == ('{"status":"pending"}', 1)
    assert await store.swap_record("approval", "r1", 1, '{"status":"approved"}', far()) is True
    assert await store.swap_record("approval", "r1", 1, '{"status":"denied"}', far()) is False  # stale version
    assert await store.get_record("approval", "r1") == ('{"status":"approved"}', 2)
    assert await store.swap_record("approval", "missing", 1, "{}", far()) is False
    assert await store.get_record("other", "r1") is None


async def test_records_list_live_ones_soonest_first_and_expire(store: StateStore) -> None:
    await store.put_record("approval", "late", "L", far() + 10)
    await store.put_record("approval", "soon", "S", time.time() + 0.2)
    await store.put_record("session", "x", "X", far())
    assert await store.list_records("approval", 10) == [("soon", "S", 1), ("late", "L", 1)]
    assert await store.list_records("approval", 1) == [("soon", "S", 1)]
    await anyio.sleep(0.3)
    assert await store.list_records("approval", 10) == [("late", "L", 1)]
    assert await store.get_record("approval", "soon") is None
    assert await store.swap_record("approval", "soon", 1, "S2", far()) is False  # an expired record is gone
    assert await store.put_record("approval", "soon", "S3", far()) is True


async def test_racing_swaps_have_one_winner(backend: str, tmp_path: Path, redis_prefix: str) -> None:
    first = make_store(backend, tmp_path, redis_prefix)
    await first.put_record("approval", "race", "0", far())
    stores = [make_store(backend, tmp_path, redis_prefix) for _ in range(4)]
    try:
        wins = await asyncio.gather(*(stores[i % 4].swap_record("approval", "race", 1, str(i), far())
                                      for i in range(16)))
        assert wins.count(True) == 1
        assert (await first.get_record("approval", "race")) == (str(wins.index(True)), 2)
    finally:
        for s in [first, *stores]:
            await s.close()


async def test_run_checks_stops_at_the_first_failure_and_keeps_what_passed(store: StateStore) -> None:
    """One round trip behaves exactly as the same calls one after another would."""
    checks = [ConsumeOnce("jti", "a", far()), NoMark("suspended", "bot"), CountUp("rate", "k", 1, 2, far()),
              CountUp("budget", "k", 150, 200, far())]
    assert await store.run_checks(checks) is None
    # The same jti again: refused at step 0, nothing after it is counted.
    assert await store.run_checks(checks) == 0
    assert await store.count_up("rate", "k", 0, 2, far()) == 1
    # A fresh jti: the budget refuses (150 + 150 > 200) after the rate was counted, as separate calls would.
    assert await store.run_checks([ConsumeOnce("jti", "b", far()), *checks[1:]]) == 3
    assert await store.count_up("rate", "k", 0, 2, far()) == 2
    assert await store.count_up("budget", "k", 0, 200, far()) == 150
    assert await store.consume_once("jti", "b", far()) is False
    # A suspension mark refuses at its step; the rate is not counted.
    await store.set_mark("suspended", "bot", 1.0, None)
    assert await store.run_checks([ConsumeOnce("jti", "c", far()), *checks[1:]]) == 1
    assert await store.count_up("rate", "k", 0, 2, far()) == 2
    assert await store.consume_once("jti", "c", far()) is False  # consumed before the refusal
    await store.delete_mark("suspended", "bot")
    assert await store.run_checks([NoMark("suspended", "bot")]) is None


@pytest.mark.parametrize(("amount", "limit"), [(-1, 5), (6, 5)])
async def test_run_checks_refuses_an_impossible_count_where_it_stands(
    store: StateStore, amount: int, limit: int
) -> None:
    checks = [ConsumeOnce("jti", "x", far()), CountUp("c", "k", amount, limit, far()), ConsumeOnce("jti", "y", far())]
    assert await store.run_checks(checks) == 1
    assert await store.consume_once("jti", "x", far()) is False
    assert await store.consume_once("jti", "y", far()) is True
    assert await store.run_checks([]) is None
