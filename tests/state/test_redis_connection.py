"""The Redis store's one connection per process: concurrent calls share it in pipelined batches.

Real servers only: the shared development Redis where nothing global is touched, a Redis of the
test's own (:class:`~tests.state.conftest.OwnRedis`) where a test flushes scripts, kills connections
or restarts the server, and a listener that accepts and never answers (a black hole).
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis

from broker.errors import StoreUnavailable
from broker.state.redis import RedisStateStore
from broker.state.store import ConsumeOnce, CountUp, NoMark
from tests.state.conftest import SHARED_REDIS, OwnRedis

pytestmark = pytest.mark.anyio


def far() -> float:
    return time.time() + 3600


def connections_named(url: str, name: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return sum(1 for c in client.client_list() if c.get("name") == name)
    finally:
        client.close()


async def test_concurrent_calls_share_one_connection_and_each_gets_its_own_answer(redis_prefix: str) -> None:
    name = f"nhi-test-{uuid.uuid4().hex[:8]}"
    store = RedisStateStore(f"{SHARED_REDIS}?client_name={name}", prefix=redis_prefix)
    try:
        consumed, counted, checked = await asyncio.gather(
            asyncio.gather(*(store.consume_once("jti", "once", far()) for _ in range(40))),
            asyncio.gather(*(store.count_up("rate", "k", 1, 25, far()) for _ in range(40))),
            asyncio.gather(*(store.run_checks([ConsumeOnce("jti", f"r{i % 20}", far()), NoMark("s", "w"),
                                               CountUp("budget", "b", 2, 30, far())]) for i in range(40))),
        )
        assert sum(consumed) == 1
        assert sorted(c for c in counted if c is not None) == list(range(1, 26)) and counted.count(None) == 15
        # Each of r0..r19 passes once (15 of those budget charges fit: 15 x 2 = 30); a second use of
        # the same jti fails at index 0; a first use past the budget fails at index 2 (jti kept).
        assert checked.count(None) == 15
        assert checked.count(0) + checked.count(2) == 25 and checked.count(2) == 5
        assert connections_named(SHARED_REDIS, name) == 1
    finally:
        await store.close()
    deadline = time.monotonic() + 2
    while connections_named(SHARED_REDIS, name):  # the server notices the close a moment later
        assert time.monotonic() < deadline, "close() left the connection open"
        await asyncio.sleep(0.01)


async def test_an_error_reply_fails_its_own_command_only(redis_prefix: str) -> None:
    client = redis.Redis.from_url(SHARED_REDIS)
    client.hset(f"{redis_prefix}rate:hash", "f", "v")  # a counter that is not a number: WRONGTYPE
    client.close()
    store = RedisStateStore(SHARED_REDIS, prefix=redis_prefix)
    try:
        results = await asyncio.gather(
            store.consume_once("jti", "a", far()), store.count_up("rate", "hash", 1, 5, far()),
            store.count_up("rate", "fine", 1, 5, far()), store.get_marks([("m", "x")]),
            return_exceptions=True,
        )
        assert results[0] is True and results[2] == 1 and results[3] == [None]
        assert isinstance(results[1], StoreUnavailable) and "ResponseError" in results[1].description
        # A refused command is not an outage: no fail-fast window, the next call is answered.
        assert await store.consume_once("jti", "b", far())
    finally:
        await store.close()


def command_calls(url: str, command: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))
    finally:
        client.close()


async def test_scripts_run_by_digest_and_again_by_body_after_a_script_flush(own_redis: OwnRedis) -> None:
    store = RedisStateStore(own_redis.url, prefix="t:")
    try:
        assert await store.run_checks([CountUp("n", "k", 1, 3, far())]) is None
        client = redis.Redis.from_url(own_redis.url)
        client.script_flush()
        client.config_resetstat()
        # Three concurrent calls in one batch all get NOSCRIPT, and each runs exactly once by its body.
        results = await asyncio.gather(*(store.run_checks([CountUp("n", "k", 1, 3, far())]) for _ in range(3)))
        assert sorted(results, key=repr) == [0, None, None]  # 1 + 2 = 3 fit, the fourth would not
        assert int(client.get("t:n:k") or 0) == 3
        assert await store.count_up("n", "other", 1, 3, far()) == 1
        evals = command_calls(own_redis.url, "eval")
        assert 1 <= evals <= 4  # by body only until the server knows the scripts again
        assert await store.count_up("n", "other", 1, 3, far()) == 2
        assert command_calls(own_redis.url, "eval") == evals and command_calls(own_redis.url, "evalsha") >= 5
        client.close()
    finally:
        await store.close()


async def closed_by_redis(store: RedisStateStore) -> None:
    """Wait until the end of the stream Redis sent has reached the store's idle connection."""
    lane = store._lane
    assert lane is not None
    deadline = time.monotonic() + 10
    while not await lane.connection.can_read():
        assert time.monotonic() < deadline, "the connection never saw Redis close it"
        await asyncio.sleep(0.005)


async def test_a_connection_redis_closed_while_idle_is_replaced_without_a_failed_call(own_redis: OwnRedis) -> None:
    store = RedisStateStore(own_redis.url, prefix="t:")  # the default fail-fast window: a failure would show
    try:
        assert await store.consume_once("jti", "a", far())
        client = redis.Redis.from_url(own_redis.url)
        assert client.client_kill_filter(_type="normal", skipme=True) == 1
        client.close()
        await closed_by_redis(store)
        assert await store.consume_once("jti", "b", far())
        assert not await store.consume_once("jti", "a", far())
        own_redis.stop()
        own_redis.start()  # a fresh, empty server
        await closed_by_redis(store)
        assert await store.consume_once("jti", "a", far())
    finally:
        await store.close()


async def test_a_cancelled_caller_leaves_the_connection_in_step(redis_prefix: str) -> None:
    store = RedisStateStore(SHARED_REDIS, prefix=redis_prefix)
    try:
        tasks = [asyncio.create_task(store.count_up("n", f"k{i}", i, 100, far())) for i in range(30)]
        await asyncio.sleep(0)
        for task in tasks[::3]:
            task.cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        for i, result in enumerate(done):
            assert isinstance(result, asyncio.CancelledError) if i % 3 == 0 else result == i
        # Replies still line up with their commands after the cancellations.
        assert [await store.count_up("n", f"k{i}", 1, 100, far()) for i in (1, 2, 4)] == [2, 3, 5]
    finally:
        await store.close()


def test_each_event_loop_gets_its_own_connection(redis_prefix: str) -> None:
    store = RedisStateStore(SHARED_REDIS, prefix=redis_prefix)
    assert asyncio.run(store.consume_once("jti", "a", far()))
    assert not asyncio.run(store.consume_once("jti", "a", far()))  # a second loop: a new connection
    asyncio.run(store.close())


async def test_concurrent_calls_into_a_black_hole_cost_one_timeout_together(black_hole: str) -> None:
    store = RedisStateStore(black_hole, prefix="t:", timeout=0.3, fail_fast=1.0)
    try:
        started = time.monotonic()
        results = await asyncio.gather(*(store.consume_once("jti", f"k{i}", far()) for i in range(20)),
                                       return_exceptions=True)
        assert time.monotonic() - started < 0.6  # one timeout for all of them, not one each
        assert all(isinstance(r, StoreUnavailable) for r in results)
        assert sum("TimeoutError" in r.description for r in results if isinstance(r, StoreUnavailable)) >= 1
        with pytest.raises(StoreUnavailable, match="stopped answering"):
            await store.run_checks([ConsumeOnce("jti", "x", far())])
    finally:
        await store.close()
