"""Redis state store: shared state for broker replicas, with the semantics of the SQLite store.

Every check-and-update is one Redis command or one Lua script, so it is atomic across replicas;
:meth:`RedisStateStore.run_checks` runs a whole request's replay, suspension, rate and budget checks
as one script. Keys are ``<prefix><namespace>:<key>``; lifetimes are relative ``PX`` values computed
from the broker's clock, so an injected clock and the server's clock never have to agree. Scripts
are sent as ``EVALSHA`` of a digest computed once; a server that does not know one (``NOSCRIPT``:
restarted, flushed) gets that command again as ``EVAL``, which runs and caches it.

I/O is ``redis.asyncio``, never a thread, through **one connection per process** (per event loop),
used with redis-py's connection-level calls (pack, send, read) rather than a client and its pool:
commands from concurrent requests wait in a queue and go out together, one write and one round trip
for everything queued while the previous batch was on the wire (pipelining, in order; each command
keeps its own reply or its own error). On the token path that saves most of what redis-py's client
costs per call (pool acquire and release, retry and telemetry wrappers, a task per write timeout).

Any Redis error becomes :class:`~broker.errors.StoreUnavailable` at one choke point
(:meth:`RedisStateStore._round_trip`): the broker fails closed, and the next batch reconnects by
itself when Redis returns. Each batch, connection set-up included, has one timeout (``timeout``)
and is never retried after it: a server that accepts and does not answer would cost a second
timeout. An idle connection that Redis closed (it restarted) is noticed and replaced before a batch
is sent; a connection error while sending on a reused connection (nothing reached Redis) is retried
once on a fresh one; an error while reading replies is not (the commands may have run). After a
timeout or a connection error, calls fail fast for :data:`FAIL_FAST_SECONDS` instead of each waiting
for the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError

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


class _Script:
    """A Lua script and its SHA-1 digest (what ``EVALSHA`` names it by), computed once."""

    __slots__ = ("body", "sha")

    def __init__(self, body: str) -> None:
        self.body = body
        self.sha = hashlib.sha1(body.encode(), usedforsecurity=False).hexdigest()


_SCRIPT_COUNT_UP = _Script(_COUNT_UP)
_SCRIPT_SET_MARK = _Script(_SET_MARK)
_SCRIPT_PUT_RECORD = _Script(_PUT_RECORD)
_SCRIPT_SWAP_RECORD = _Script(_SWAP_RECORD)
_SCRIPT_RUN_CHECKS = _Script(_RUN_CHECKS)

#: After a Redis call timed out or could not connect, fail fast for this long before trying again, so
#: a server that accepts connections but does not answer (or refuses them) costs one socket timeout
#: per window, not one per request. It matches the ``Retry-After: 1`` of the 503 answer.
FAIL_FAST_SECONDS = 1.0

_FAILING_FAST = "state store unavailable: it stopped answering (retrying shortly)"

#: A queued command: its arguments and the future its caller awaits.
_Queued = tuple[tuple[Any, ...], "asyncio.Future[Any]"]


class _Lane:
    """One event loop's connection, the commands waiting for it, and the task sending them."""

    __slots__ = ("connection", "loop", "queue", "worker")

    def __init__(self, loop: asyncio.AbstractEventLoop, connection: AbstractConnection) -> None:
        self.loop = loop
        self.connection = connection
        self.queue: list[_Queued] = []
        self.worker: asyncio.Task[None] | None = None


def _fail(batch: Sequence[_Queued], reason: str) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(StoreUnavailable(reason))


class RedisStateStore:
    """Shared state in Redis (one server, or a Sentinel-managed primary behind ``url``)."""

    def __init__(
        self, url: str, *, prefix: str = "nhi-broker:", clock: Clock | None = None, timeout: float = 0.5,
        fail_fast: float = FAIL_FAST_SECONDS,
    ) -> None:
        self._prefix = prefix
        self._clock = clock or SystemClock()
        self._timeout = timeout
        self._fail_fast = fail_fast
        self._failing_fast_until = 0.0
        try:
            # Only to parse the URL (now: a bad one fails at start-up) and to make connections with
            # its settings; no command goes through the pool. No socket timeout on the connection:
            # each batch has one timeout of its own (_round_trip). No retry inside redis-py: a
            # timeout must not be retried, and _round_trip decides when a connection error is.
            self._pool = redis.asyncio.ConnectionPool.from_url(
                url, socket_timeout=None, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
            )
        except (ValueError, redis.RedisError) as exc:
            raise StoreUnavailable(f"state store unavailable: {type(exc).__name__}") from None
        self._lane: _Lane | None = None

    # -- the connection and its queue ------------------------------------------------------------

    def _submit(self, command: tuple[Any, ...]) -> asyncio.Future[Any]:
        """Queue ``command`` on this event loop's connection; the future gets its reply."""
        if time.monotonic() < self._failing_fast_until:
            raise StoreUnavailable(_FAILING_FAST)
        loop = asyncio.get_running_loop()
        lane = self._lane
        if lane is None or lane.loop is not loop:
            # A connection belongs to the loop that opened it; a server process runs one loop, so
            # this is one connection per process (tests may run several loops). The old loop's
            # connection cannot be used (or closed) from this one: drop it.
            lane = self._lane = _Lane(loop, self._pool.make_connection())  # type: ignore[no-untyped-call]
        future: asyncio.Future[Any] = loop.create_future()
        lane.queue.append((command, future))
        if lane.worker is None:
            lane.worker = loop.create_task(self._work(lane))
        return future

    async def _call(self, *command: Any) -> Any:
        """One command's reply; :class:`StoreUnavailable` if Redis cannot give it."""
        return await self._submit(command)

    async def _script(self, script: _Script, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        try:
            return await self._submit(("EVALSHA", script.sha, len(keys), *keys, *args))
        except NoScriptError:
            # Not run (the server has not seen the script since it started): run it with its body,
            # which also caches it for the next EVALSHA.
            return await self._submit(("EVAL", script.body, len(keys), *keys, *args))

    async def _work(self, lane: _Lane) -> None:
        """Send what is queued, a batch per round trip, until the queue is empty."""
        try:
            while lane.queue:
                batch, lane.queue = lane.queue, []
                await self._round_trip(lane.connection, batch)
        finally:
            lane.worker = None
            if lane.queue:  # cancelled (the store was closed): nothing will send these
                batch, lane.queue = lane.queue, []
                _fail(batch, "state store unavailable: closed")

    async def _round_trip(self, conn: AbstractConnection, batch: list[_Queued]) -> None:
        """Send ``batch`` in one write and hand each command its reply (or its error) in order.

        The choke point for Redis errors: a command's own error reply fails that command alone
        (``NOSCRIPT`` as :class:`NoScriptError`, for :meth:`_script`; any other as
        :class:`StoreUnavailable`); a timeout or a connection error fails every command not yet
        answered and opens the fail-fast window.
        """
        if time.monotonic() < self._failing_fast_until:
            _fail(batch, _FAILING_FAST)
            return
        answered = 0
        try:
            async with asyncio.timeout(self._timeout):
                await self._send(conn, [command for command, _ in batch])
                for _, future in batch:
                    try:
                        reply = await conn.read_response()
                    except redis.ResponseError as exc:
                        answered += 1
                        if not future.done():
                            if isinstance(exc, NoScriptError):
                                future.set_exception(NoScriptError())
                            else:
                                # The type only, as below.
                                log.warning("redis state store refused a command (%s): failing closed",
                                            type(exc).__name__)
                                future.set_exception(StoreUnavailable(
                                    f"state store unavailable: {type(exc).__name__}"))
                        continue
                    answered += 1
                    if not future.done():
                        future.set_result(reply)
        except Exception as exc:
            # OSError: the batch's timeout (TimeoutError) among them. Anything else is not Redis being
            # away (redis-py's own errors, or a bug): fail closed all the same, without the window.
            if isinstance(exc, redis.TimeoutError | redis.ConnectionError | OSError):
                self._failing_fast_until = time.monotonic() + self._fail_fast
            # The type only: messages can carry the URL.
            log.log(logging.WARNING if isinstance(exc, redis.RedisError | OSError) else logging.ERROR,
                    "redis state store unavailable (%s): failing closed", type(exc).__name__)
            await self._drop(conn)
            _fail(batch[answered:], f"state store unavailable: {type(exc).__name__}")
        except BaseException:
            await self._drop(conn)
            _fail(batch[answered:], "state store unavailable: closed")
            raise

    @staticmethod
    async def _send(conn: AbstractConnection, commands: list[tuple[Any, ...]]) -> None:
        """Write ``commands`` in one go, on a live connection."""
        packed = conn.pack_commands(commands)
        if not conn.is_connected:
            await conn.connect()  # type: ignore[no-untyped-call]
        elif await conn.can_read():
            # Unread bytes or end of stream on an idle connection: Redis closed it (a restart).
            await conn.disconnect(nowait=True)
            await conn.connect()  # type: ignore[no-untyped-call]
        else:
            try:
                await conn.send_packed_command(packed, check_health=False)
                return
            except redis.ConnectionError:
                # A reused connection that broke while idle (a reset): nothing was sent. Once more
                # on a fresh one; a second failure is Redis being away.
                await conn.connect()  # type: ignore[no-untyped-call]
        await conn.send_packed_command(packed, check_health=False)

    @staticmethod
    async def _drop(conn: AbstractConnection) -> None:
        """Close a connection whose replies are no longer in step with its commands."""
        with contextlib.suppress(Exception):  # closing a broken socket: nothing more to do
            await conn.disconnect(nowait=True)

    # -- the StateStore interface -----------------------------------------------------------------

    def _ttl_ms(self, expires_at: float) -> int:
        return math.ceil((expires_at - self._clock.now()) * 1000)

    async def consume_once(self, namespace: str, key: str, expires_at: float) -> bool:
        ttl = self._ttl_ms(expires_at)
        if ttl <= 0:
            return True  # already expired: nothing to remember, as the SQLite store would forget it
        return await self._call("SET", f"{self._prefix}{namespace}:{key}", b"1", "NX", "PX", ttl) is not None

    async def count_up(self, namespace: str, key: str, amount: int, limit: int, expires_at: float) -> int | None:
        if amount < 0 or amount > limit:
            return None
        ttl = max(1, self._ttl_ms(expires_at))
        total = int(await self._script(
            _SCRIPT_COUNT_UP, [f"{self._prefix}{namespace}:{key}"], [int(amount), int(limit), ttl]))
        return None if total < 0 else total

    async def run_checks(self, checks: Sequence[Check]) -> int | None:
        todo, failed = valid_prefix(checks)
        if not todo:
            return failed
        prefix = self._prefix
        now = self._clock.now()
        keys: list[str] = []
        args: list[str | int] = []
        for check in todo:
            keys.append(f"{prefix}{check.namespace}:{check.key}")
            if isinstance(check, ConsumeOnce):
                args += ("c", max(0, math.ceil((check.expires_at - now) * 1000)))
            elif isinstance(check, CountUp):
                args += ("n", int(check.amount), int(check.limit), max(1, math.ceil((check.expires_at - now) * 1000)))
            else:
                args.append("m")
        index = int(await self._script(_SCRIPT_RUN_CHECKS, keys, args))
        return failed if index == 0 else index - 1

    async def set_mark(self, namespace: str, key: str, value: float, expires_at: float | None) -> None:
        ttl = "" if expires_at is None else str(max(1, self._ttl_ms(expires_at)))
        await self._script(_SCRIPT_SET_MARK, [f"{self._prefix}{namespace}:{key}"], [repr(float(value)), ttl])

    async def get_marks(self, items: Sequence[tuple[str, str]]) -> list[float | None]:
        if not items:
            return []
        prefix = self._prefix
        values = await self._call("MGET", *[f"{prefix}{ns}:{key}" for ns, key in items])
        return [None if v is None else float(v) for v in values]

    async def delete_mark(self, namespace: str, key: str) -> bool:
        return bool(await self._call("DEL", f"{self._prefix}{namespace}:{key}"))

    def _index(self, namespace: str) -> str:
        return f"{self._prefix}{namespace}:~index"

    async def put_record(self, namespace: str, key: str, value: str, expires_at: float) -> bool:
        ttl = self._ttl_ms(expires_at)
        if ttl <= 0:
            return True  # already expired: created and gone, as the SQLite store would see it
        keys = [f"{self._prefix}{namespace}:{key}", self._index(namespace)]
        return bool(await self._script(_SCRIPT_PUT_RECORD, keys, [value, ttl, repr(float(expires_at)), key]))

    async def get_record(self, namespace: str, key: str) -> tuple[str, int] | None:
        value, version = await self._call("HMGET", f"{self._prefix}{namespace}:{key}", "v", "n")
        if value is None or version is None:
            return None
        return _text(value), int(version)

    async def swap_record(self, namespace: str, key: str, version: int, value: str, expires_at: float) -> bool:
        ttl = max(1, self._ttl_ms(expires_at))
        keys = [f"{self._prefix}{namespace}:{key}", self._index(namespace)]
        args: list[str | int] = [str(int(version)), value, ttl, repr(float(expires_at)), key]
        return bool(await self._script(_SCRIPT_SWAP_RECORD, keys, args))

    async def list_records(self, namespace: str, limit: int) -> list[tuple[str, str, int]]:
        now = self._clock.now()
        index = self._index(namespace)
        # Queued together, so they go out in one write and run in this order.
        expired = self._submit(("ZREMRANGEBYSCORE", index, "-inf", repr(now)))
        live = self._submit(("ZRANGEBYSCORE", index, f"({now!r}", "+inf", "LIMIT", 0, int(limit)))
        await expired
        keys = [_text(k) for k in await live]
        rows = [self._submit(("HMGET", f"{self._prefix}{namespace}:{key}", "v", "n")) for key in keys]
        found: list[tuple[str, str, int]] = []
        for key, row in zip(keys, rows, strict=True):
            value, version = await row
            if value is not None and version is not None:
                found.append((key, _text(value), int(version)))
        return found

    async def publish(self, channel: str, message: str) -> None:
        """Publish an event on ``<prefix><channel>`` for subscribers that cache state (verifier SDKs)."""
        await self._call("PUBLISH", self._prefix + channel, message)

    async def ping(self) -> None:
        await self._call("PING")

    async def close(self) -> None:
        lane, self._lane = self._lane, None
        if lane is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if lane.loop is not running:
            return  # its connection belongs to another (finished) loop; dropping it is all that is left
        if lane.worker is not None:
            lane.worker.cancel()
            await asyncio.wait([lane.worker])
        with contextlib.suppress(Exception):  # already broken: nothing more to release
            await lane.connection.disconnect()


def _text(value: bytes | str) -> str:
    """A reply as text (bytes unless the URL asked redis-py to decode replies)."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
