"""Redis state store: shared state for broker replicas, with the semantics of the SQLite store.

Every check-and-update is one Redis command or one Lua script, so it is atomic across replicas;
:meth:`RedisStateStore.run_checks` runs a whole request's replay, suspension, rate and budget checks
as one script. Keys are ``<prefix><namespace>:<key>``; lifetimes are relative ``PX`` values computed
from the broker's clock, so an injected clock and the server's clock never have to agree.

I/O is ``redis.asyncio``: one connection pool per process (per event loop), never a thread. Any Redis
error becomes :class:`~broker.errors.StoreUnavailable` at one choke point
(:meth:`RedisStateStore._calls`): the broker fails closed and the pool reconnects by itself when
Redis returns. A timeout is never retried (a server that accepts and does not answer would cost a
second timeout); only a fast connection error is, once, to replace a pooled connection that went
stale when Redis restarted. After a timeout or a connection error, calls fail fast for
:data:`FAIL_FAST_SECONDS` instead of each waiting for the socket timeout.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from broker.clock import Clock, SystemClock
from broker.errors import StoreUnavailable
from broker.state.store import Check, ConsumeOnce, CountUp, valid_prefix

__all__ = ["RedisStateStore"]

log = logging.getLogger("nhi_broker.state")

# KEYS[1] counter; ARGV amount, limit, ttl ms. Returns the new total or -1 when it would exceed the limit.
_COUNT_UP = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local amount = tonumber(ARGV[1])
if current + amount > tonumber(ARGV[2]) then return -1 end
local total = redis.call('INCRBY', KEYS[1], amount)
if current == 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return total
"""

# KEYS[1] mark; ARGV value, ttl ms ('' = no expiry). Keeps the larger value, byte for byte as written.
_SET_MARK = """
local current = tonumber(redis.call('GET', KEYS[1]))
if current ~= nil and current >= tonumber(ARGV[1]) then
  if ARGV[2] == '' then redis.call('PERSIST', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
  return 0
end
if ARGV[2] == '' then
  redis.call('SET', KEYS[1], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
"""


# KEYS[1] record (a hash: v = value, n = version), KEYS[2] the namespace's expiry index (a sorted set);
# ARGV value, ttl ms, absolute expiry (index score), key. Creates the record unless it exists.
_PUT_RECORD = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'n', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
return 1
"""

# Same keys; ARGV expected version, value, ttl ms, absolute expiry, key. Compare-and-swap on the version.
_SWAP_RECORD = """
local current = redis.call('HGET', KEYS[1], 'n')
if current == false or current ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'n', tonumber(current) + 1)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
return 1
"""


# KEYS: one key per check. ARGV: per check its kind, then its arguments:
#   'c' ttl-ms             consume once ('0': already expired, nothing to remember: passes)
#   'm'                    no live mark
#   'n' amount limit ttl   count up (as _COUNT_UP)
# Returns the 1-based index of the first check that failed (it changed nothing), or 0.
_RUN_CHECKS = """
local a = 1
for i, key in ipairs(KEYS) do
  local kind = ARGV[a]
  if kind == 'c' then
    local ttl = tonumber(ARGV[a + 1])
    a = a + 2
    if ttl > 0 and not redis.call('SET', key, '1', 'NX', 'PX', ttl) then return i end
  elseif kind == 'm' then
    a = a + 1
    if redis.call('EXISTS', key) == 1 then return i end
  else
    local amount = tonumber(ARGV[a + 1])
    local limit = tonumber(ARGV[a + 2])
    local ttl = ARGV[a + 3]
    a = a + 4
    local current = tonumber(redis.call('GET', key) or '0')
    if current + amount > limit then return i end
    redis.call('INCRBY', key, amount)
    if current == 0 then redis.call('PEXPIRE', key, ttl) end
  end
end
return 0
"""

#: After a Redis call timed out or could not connect, fail fast for this long before trying again, so
#: a server that accepts connections but does not answer (or refuses them) costs one socket timeout
#: per window, not one per request. It matches the ``Retry-After: 1`` of the 503 answer.
FAIL_FAST_SECONDS = 1.0


class RedisStateStore:
    """Shared state in Redis (one server, or a Sentinel-managed primary behind ``url``)."""

    def __init__(
        self, url: str, *, prefix: str = "nhi-broker:", clock: Clock | None = None, timeout: float = 0.5,
        fail_fast: float = FAIL_FAST_SECONDS,
    ) -> None:
        self._url = url
        self._prefix = prefix
        self._clock = clock or SystemClock()
        self._timeout = timeout
        self._fail_fast = fail_fast
        self._failing_fast_until = 0.0
        self._client: redis.asyncio.Redis | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scripts: dict[str, Any] = {}
        self._connect()  # validates the URL now (no I/O: connections open on first use)

    def _connect(self) -> redis.asyncio.Redis:
        try:
            # supported_errors is explicit: redis-py's default list includes TimeoutError, and a
            # timeout must not be retried. One quick retry covers a pooled connection that went
            # stale when Redis restarted (a fast ConnectionError). Short timeouts make an
            # unreachable server a fast 503, not a hung request.
            client: redis.asyncio.Redis = redis.asyncio.Redis.from_url(
                self._url, socket_timeout=self._timeout, socket_connect_timeout=self._timeout,
                retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
            )
        except (ValueError, redis.RedisError) as exc:
            raise StoreUnavailable(f"state store unavailable: {type(exc).__name__}") from None
        self._client = client
        self._scripts = {
            name: client.register_script(body)
            for name, body in (("count_up", _COUNT_UP), ("set_mark", _SET_MARK), ("put_record", _PUT_RECORD),
                               ("swap_record", _SWAP_RECORD), ("run_checks", _RUN_CHECKS))
        }
        return client

    def _redis(self) -> redis.asyncio.Redis:
        """This event loop's client. A pool's connections belong to the loop that opened them; a
        server process runs one loop, so this is one pool per process (tests may run several loops)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._client is None:
            # The old loop's connections cannot be used (or closed) from this one: drop them.
            self._loop = loop
            return self._connect()
        return self._client

    @asynccontextmanager
    async def _calls(self) -> AsyncIterator[redis.asyncio.Redis]:
        """Redis errors become :class:`StoreUnavailable` (fail closed); a timeout or a connection
        error also makes the next calls fail fast for ``fail_fast`` seconds."""
        if time.monotonic() < self._failing_fast_until:
            raise StoreUnavailable("state store unavailable: it stopped answering (retrying shortly)")
        try:
            yield self._redis()
        except redis.RedisError as exc:
            if isinstance(exc, redis.TimeoutError | redis.ConnectionError):
                self._failing_fast_until = time.monotonic() + self._fail_fast
            # The type only: messages can carry the URL.
            log.warning("redis state store unavailable (%s): failing closed", type(exc).__name__)
            raise StoreUnavailable(f"state store unavailable: {type(exc).__name__}") from None

    def _key(self, namespace: str, key: str) -> str:
        return f"{self._prefix}{namespace}:{key}"

    def _ttl_ms(self, expires_at: float) -> int:
        return math.ceil((expires_at - self._clock.now()) * 1000)

    async def consume_once(self, namespace: str, key: str, expires_at: float) -> bool:
        ttl = self._ttl_ms(expires_at)
        if ttl <= 0:
            return True  # already expired: nothing to remember, as the SQLite store would forget it
        async with self._calls() as r:
            return bool(await r.set(self._key(namespace, key), b"1", nx=True, px=ttl))

    async def count_up(self, namespace: str, key: str, amount: int, limit: int, expires_at: float) -> int | None:
        if amount < 0 or amount > limit:
            return None
        ttl = max(1, self._ttl_ms(expires_at))
        async with self._calls():
            total = int(await self._scripts["count_up"](
                keys=[self._key(namespace, key)], args=[int(amount), int(limit), ttl]))
        return None if total < 0 else total

    async def run_checks(self, checks: Sequence[Check]) -> int | None:
        todo, failed = valid_prefix(checks)
        if not todo:
            return failed
        keys: list[str] = []
        args: list[str | int] = []
        for check in todo:
            keys.append(self._key(check.namespace, check.key))
            if isinstance(check, ConsumeOnce):
                args += ["c", max(0, self._ttl_ms(check.expires_at))]
            elif isinstance(check, CountUp):
                args += ["n", int(check.amount), int(check.limit), max(1, self._ttl_ms(check.expires_at))]
            else:
                args.append("m")
        async with self._calls():
            index = int(await self._scripts["run_checks"](keys=keys, args=args))
        return failed if index == 0 else index - 1

    async def set_mark(self, namespace: str, key: str, value: float, expires_at: float | None) -> None:
        ttl = "" if expires_at is None else str(max(1, self._ttl_ms(expires_at)))
        async with self._calls():
            await self._scripts["set_mark"](keys=[self._key(namespace, key)], args=[repr(float(value)), ttl])

    async def get_marks(self, items: Sequence[tuple[str, str]]) -> list[float | None]:
        if not items:
            return []
        async with self._calls() as r:
            values = await r.mget([self._key(ns, key) for ns, key in items])
        return [None if v is None else float(v) for v in values]

    async def delete_mark(self, namespace: str, key: str) -> bool:
        async with self._calls() as r:
            return bool(await r.delete(self._key(namespace, key)))

    def _index(self, namespace: str) -> str:
        return f"{self._prefix}{namespace}:~index"

    async def put_record(self, namespace: str, key: str, value: str, expires_at: float) -> bool:
        ttl = self._ttl_ms(expires_at)
        if ttl <= 0:
            return True  # already expired: created and gone, as the SQLite store would see it
        keys = [self._key(namespace, key), self._index(namespace)]
        async with self._calls():
            return bool(await self._scripts["put_record"](
                keys=keys, args=[value, ttl, repr(float(expires_at)), key]))

    async def get_record(self, namespace: str, key: str) -> tuple[str, int] | None:
        async with self._calls() as r:
            value, version = await r.hmget(self._key(namespace, key), ["v", "n"])
        if value is None or version is None:
            return None
        text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        return text, int(version)

    async def swap_record(self, namespace: str, key: str, version: int, value: str, expires_at: float) -> bool:
        ttl = max(1, self._ttl_ms(expires_at))
        keys = [self._key(namespace, key), self._index(namespace)]
        args: list[str | int] = [str(int(version)), value, ttl, repr(float(expires_at)), key]
        async with self._calls():
            return bool(await self._scripts["swap_record"](keys=keys, args=args))

    async def list_records(self, namespace: str, limit: int) -> list[tuple[str, str, int]]:
        now = self._clock.now()
        index = self._index(namespace)
        async with self._calls() as r:
            await r.zremrangebyscore(index, "-inf", now)
            found = await r.zrangebyscore(index, f"({now!r}", "+inf", 0, int(limit))
            keys = [k.decode("utf-8") if isinstance(k, bytes) else str(k) for k in found]
            pipe = r.pipeline(transaction=False)
            for key in keys:
                pipe.hmget(self._key(namespace, key), ["v", "n"])
            rows = await pipe.execute()
        return [(k, v.decode("utf-8"), int(n)) for k, (v, n) in zip(keys, rows, strict=True)
                if v is not None and n is not None]

    async def publish(self, channel: str, message: str) -> None:
        """Publish an event on ``<prefix><channel>`` for subscribers that cache state (verifier SDKs)."""
        async with self._calls() as r:
            await r.publish(self._prefix + channel, message)

    async def ping(self) -> None:
        async with self._calls() as r:
            await r.ping()

    async def close(self) -> None:
        client, loop = self._client, self._loop
        self._client = self._loop = None
        if client is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is running:
            await client.aclose()
        # else: its connections belong to another (finished) loop; dropping them is all that is left.
