"""Redis state store: shared state for broker replicas, with the semantics of the SQLite store.

Every check-and-update is one Redis command or one Lua script, so it is atomic across replicas.
Keys are ``<prefix><namespace>:<key>``; lifetimes are relative ``PX`` values computed from the
broker's clock, so an injected clock and the server's clock never have to agree. Any Redis error
becomes :class:`~broker.errors.StoreUnavailable` at one choke point (:meth:`RedisStateStore._calls`): the
broker fails closed and the connection pool reconnects by itself when Redis returns. A server that
stops answering costs one socket timeout per :data:`TIMEOUT_BACKOFF_SECONDS`, not one per request.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from broker.clock import Clock, SystemClock
from broker.errors import StoreUnavailable

__all__ = ["RedisStateStore"]

log = logging.getLogger("nhi_broker.store")

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


#: After a Redis call timed out, fail fast for this long before trying again. The broker decides on
#: its event loop, so a server that accepts connections but does not answer must not hold every
#: request for the socket timeout: at most one call per window waits for it.
TIMEOUT_BACKOFF_SECONDS = 5.0


class RedisStateStore:
    """Shared state in Redis (one server, or a Sentinel-managed primary behind ``url``)."""

    def __init__(
        self, url: str, *, prefix: str = "nhi-broker:", clock: Clock | None = None, timeout: float = 0.5,
        timeout_backoff: float = TIMEOUT_BACKOFF_SECONDS,
    ) -> None:
        self._prefix = prefix
        self._clock = clock or SystemClock()
        self._timeout_backoff = timeout_backoff
        self._failing_fast_until = 0.0
        with self._calls():
            # One quick retry covers a pooled connection that went stale when Redis restarted (a fast
            # ConnectionError); a timeout is not retried. Short timeouts make an unreachable server a
            # fast 503, not a hung request.
            self._redis = redis.Redis.from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 1),
                retry_on_error=[redis.ConnectionError],
            )
            self._count_up = self._redis.register_script(_COUNT_UP)
            self._set_mark = self._redis.register_script(_SET_MARK)
            self._put_record = self._redis.register_script(_PUT_RECORD)
            self._swap_record = self._redis.register_script(_SWAP_RECORD)


    @contextmanager
    def _calls(self) -> Iterator[None]:
        """Redis errors become :class:`StoreUnavailable` (fail closed); a timeout also makes the next
        calls fail fast for ``timeout_backoff`` seconds."""
        if time.monotonic() < self._failing_fast_until:
            raise StoreUnavailable("state store unavailable: it stopped answering (retrying shortly)")
        try:
            yield
        except redis.RedisError as exc:
            if isinstance(exc, redis.TimeoutError):
                self._failing_fast_until = time.monotonic() + self._timeout_backoff
            # The type only: messages can carry the URL.
            log.warning("redis state store unavailable (%s): failing closed", type(exc).__name__)
            raise StoreUnavailable(f"state store unavailable: {type(exc).__name__}") from None
    def _key(self, namespace: str, key: str) -> str:
        return f"{self._prefix}{namespace}:{key}"

    def _ttl_ms(self, expires_at: float) -> int:
        return math.ceil((expires_at - self._clock.now()) * 1000)

    def consume_once(self, namespace: str, key: str, expires_at: float) -> bool:
        ttl = self._ttl_ms(expires_at)
        if ttl <= 0:
            return True  # already expired: nothing to remember, as the SQLite store would forget it
        with self._calls():
            return bool(self._redis.set(self._key(namespace, key), b"1", nx=True, px=ttl))

    def count_up(self, namespace: str, key: str, amount: int, limit: int, expires_at: float) -> int | None:
        if amount < 0 or amount > limit:
            return None
        ttl = max(1, self._ttl_ms(expires_at))
        with self._calls():
            total = int(self._count_up(keys=[self._key(namespace, key)], args=[int(amount), int(limit), ttl]))
        return None if total < 0 else total

    def set_mark(self, namespace: str, key: str, value: float, expires_at: float | None) -> None:
        ttl = "" if expires_at is None else str(max(1, self._ttl_ms(expires_at)))
        with self._calls():
            self._set_mark(keys=[self._key(namespace, key)], args=[repr(float(value)), ttl])

    def get_marks(self, items: Sequence[tuple[str, str]]) -> list[float | None]:
        if not items:
            return []
        with self._calls():
            values = self._redis.mget([self._key(ns, key) for ns, key in items])
        return [None if v is None else float(v) for v in values]

    def delete_mark(self, namespace: str, key: str) -> bool:
        with self._calls():
            return bool(self._redis.delete(self._key(namespace, key)))

    def _index(self, namespace: str) -> str:
        return f"{self._prefix}{namespace}:~index"

    def put_record(self, namespace: str, key: str, value: str, expires_at: float) -> bool:
        ttl = self._ttl_ms(expires_at)
        if ttl <= 0:
            return True  # already expired: created and gone, as the SQLite store would see it
        with self._calls():
            keys = [self._key(namespace, key), self._index(namespace)]
            return bool(self._put_record(keys=keys, args=[value, ttl, repr(float(expires_at)), key]))

    def get_record(self, namespace: str, key: str) -> tuple[str, int] | None:
        with self._calls():
            value, version = self._redis.hmget(self._key(namespace, key), ["v", "n"])
        if value is None or version is None:
            return None
        text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        return text, int(version)

    def swap_record(self, namespace: str, key: str, version: int, value: str, expires_at: float) -> bool:
        ttl = max(1, self._ttl_ms(expires_at))
        with self._calls():
            keys = [self._key(namespace, key), self._index(namespace)]
            args: list[str | int] = [str(int(version)), value, ttl, repr(float(expires_at)), key]
            return bool(self._swap_record(keys=keys, args=args))

    def list_records(self, namespace: str, limit: int) -> list[tuple[str, str, int]]:
        now = self._clock.now()
        with self._calls():
            index = self._index(namespace)
            self._redis.zremrangebyscore(index, "-inf", now)
            found = self._redis.zrangebyscore(index, f"({now!r}", "+inf", 0, int(limit))
            keys = [k.decode("utf-8") if isinstance(k, bytes) else str(k) for k in found]
            pipe = self._redis.pipeline(transaction=False)
            for key in keys:
                pipe.hmget(self._key(namespace, key), ["v", "n"])
            rows = pipe.execute()
        return [(k, v.decode("utf-8"), int(n)) for k, (v, n) in zip(keys, rows, strict=True)
                if v is not None and n is not None]

    def publish(self, channel: str, message: str) -> None:
        """Publish an event on ``<prefix><channel>`` for subscribers that cache state (verifier SDKs)."""
        with self._calls():
            self._redis.publish(self._prefix + channel, message)

    def ping(self) -> None:
        with self._calls():
            self._redis.ping()

    def close(self) -> None:
        self._redis.close()
