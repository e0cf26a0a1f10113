"""What a storage process does with a batch of calls: the state file's operations, ledger appends, and
both at once for an exchange (``admit_append``).

A handler runs on the storage process's only thread and gets every call that arrived while it was
busy with the previous batch, from every worker: that is the group commit, across processes, with
no turn-taking between them. :class:`StorageHandler` answers in phases: the state calls' replies
leave as soon as their transaction committed, before the ledger's fsync.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from broker.clock import SystemClock
from broker.errors import LedgerUnavailable, StoreUnavailable
from broker.ledger.log import append_distinct
from broker.ledger.merkle import leaf_hash
from broker.ledger.storage import LedgerStorage
from broker.serial import Failed, Pending
from broker.state.sqlite import SqliteStateFile, job_for
from broker.state.store import Check, ConsumeOnce, CountUp, NoMark

__all__ = [
    "ADMIT_APPEND", "Call", "LedgerHandler", "Reply", "StateHandler", "StorageHandler", "checks_from_wire",
    "checks_to_wire",
]

log = logging.getLogger("nhi_broker.storaged")

#: ``(id, op, args)`` as a worker sent it; ``(id, ok, value)`` as it is answered.
Call = tuple[int, str, tuple[Any, ...]]
Reply = tuple[int, bool, Any]

# Reported to the caller for a call the handler could not read: a bug on one side, never data.
_MALFORMED = "storage process refused a malformed call"


#: ``("admit_append", (now, checks, failed, leaf))``: ``run_checks`` on the state file, then, only if every
#: check passed, the ledger entry ``leaf``; answers ``(failed, None)`` or ``(None, index)``.
ADMIT_APPEND = "admit_append"


class _Part(Protocol):
    def handle(self, calls: Sequence[Call]) -> list[Reply]: ...

    def close(self) -> None: ...


def checks_to_wire(checks: Sequence[Check]) -> list[tuple[Any, ...]]:
    """:class:`~broker.state.store.Check` steps as plain tuples for a frame."""
    wire: list[tuple[Any, ...]] = []
    for check in checks:
        if isinstance(check, ConsumeOnce):
            wire.append((0, check.namespace, check.key, float(check.expires_at)))
        elif isinstance(check, CountUp):
            wire.append((1, check.namespace, check.key, int(check.amount), int(check.limit), float(check.expires_at)))
        else:
            wire.append((2, check.namespace, check.key))
    return wire


def checks_from_wire(wire: Sequence[Sequence[Any]]) -> list[Check]:
    """The inverse of :func:`checks_to_wire` (:class:`ValueError` for anything else)."""
    checks: list[Check] = []
    for item in wire:
        kind, namespace, key = item[0], item[1], item[2]
        if not isinstance(namespace, str) or not isinstance(key, str):
            raise ValueError("check names are strings")
        if kind == 0 and len(item) == 4:
            checks.append(ConsumeOnce(namespace, key, float(item[3])))
        elif kind == 1 and len(item) == 6:
            checks.append(CountUp(namespace, key, int(item[3]), int(item[4]), float(item[5])))
        elif kind == 2 and len(item) == 3:
            checks.append(NoMark(namespace, key))
        else:
            raise ValueError("unknown check")
    return checks


class _CallersClock:
    """The latest clock time a caller sent (the system's until the first call)."""

    def __init__(self) -> None:
        self._now = SystemClock().now()

    def saw(self, now: float) -> None:
        self._now = now

    def now(self) -> float:
        return self._now


class _Call(Pending):
    """A job of a batch: its caller waits in another process, so it is always run (it cannot give up
    here; its reply is simply dropped if it did)."""

    __slots__ = ()

    def claim(self) -> bool:
        self.claimed = True
        return True


class StateHandler:
    """The SQLite state file's operations (:data:`broker.state.sqlite.OPERATIONS`); ``args`` start with
    the caller's clock time, so expiry is judged as the worker saw it."""

    def __init__(self, path: Path | str, *, timeout: float = 1.0, max_group: int = 256) -> None:
        # Expired rows are purged by the workers' time, as the threaded store purges by its own clock.
        self._clock = _CallersClock()
        self._file = SqliteStateFile(path, self._clock, timeout)
        self._file.create_schema()
        self._max_group = max_group

    def handle(self, calls: Sequence[Call]) -> list[Reply]:
        replies: list[Reply] = []
        group: list[Pending] = []
        ids: list[int] = []
        for call_id, op, args in calls:
            try:
                now, rest = float(args[0]), tuple(args[1:])
                self._clock.saw(now)
                if op == "run_checks":
                    rest = (checks_from_wire(rest[0]), rest[1])
                job = job_for(op, now, rest)
            except (KeyError, IndexError, TypeError, ValueError):
                replies.append((call_id, False, _MALFORMED))
                continue
            group.append(_Call(job, None))
            ids.append(call_id)
        for start in range(0, len(group), self._max_group):
            chunk = group[start:start + self._max_group]
            outcomes = self._file.run_group(chunk)
            for call_id, outcome in zip(ids[start:start + self._max_group], outcomes, strict=True):
                if isinstance(outcome, Failed):
                    error = outcome.error
                    message = str(error) if isinstance(error, StoreUnavailable) else _MALFORMED
                    if not isinstance(error, StoreUnavailable):
                        log.error("state call failed (%s)", type(error).__name__)
                    replies.append((call_id, False, message))
                else:
                    replies.append((call_id, True, outcome))
        return replies

    def close(self) -> None:
        self._file.close()


class LedgerHandler:
    """Ledger appends: ``("append", (leaf,))`` answers the leaf's index once its batch is fsynced."""

    def __init__(self, storage: LedgerStorage, *, max_batch: int = 1024) -> None:
        self._storage = storage
        self._max_batch = max_batch

    def handle(self, calls: Sequence[Call]) -> list[Reply]:
        replies: list[Reply] = []
        todo: list[tuple[int, bytes]] = []
        for call_id, op, args in calls:
            if op != "append" or len(args) != 1 or not isinstance(args[0], bytes):
                replies.append((call_id, False, _MALFORMED))
                continue
            todo.append((call_id, args[0]))
        for start in range(0, len(todo), self._max_batch):
            chunk = todo[start:start + self._max_batch]
            hashes = [leaf_hash(leaf) for _, leaf in chunk]
            distinct = dict(zip(hashes, (leaf for _, leaf in chunk), strict=True))
            try:
                indexes, _, _ = append_distinct(self._storage, distinct)
            except LedgerUnavailable as exc:
                replies.extend((call_id, False, str(exc)) for call_id, _ in chunk)
                continue
            except Exception as exc:  # every caller hears "unavailable", the process keeps serving
                log.error("ledger append failed (%s)", type(exc).__name__)
                replies.extend((call_id, False, f"ledger write failed ({type(exc).__name__})") for call_id, _ in chunk)
                continue
            replies.extend((call_id, True, indexes[digest]) for (call_id, _), digest in zip(chunk, hashes, strict=True))
        return replies

    def close(self) -> None:
        self._storage.close()


class StorageHandler:
    """The calls of one batch, for the state file (``state``), the ledger (``ledger``) or both.

    :meth:`handle` yields the replies in phases, each sent as soon as it is ready: first the state
    calls' (one transaction), then the appends' (one fsync). An ``admit_append`` runs its checks in
    the state phase; a refused one is answered there and appends nothing, an admitted one is answered
    once its entry is durable. If the ledger then fails, the checks' effects stay (a consumed ``jti``,
    a charged budget): the safe side, as when the two are separate calls.
    """

    def __init__(self, state: StateHandler | None, ledger: LedgerHandler | None) -> None:
        self._state: _Part | None = state
        self._ledger: _Part | None = ledger

    def handle(self, calls: Sequence[Call]) -> Iterator[list[Reply]]:
        state_calls: list[Call] = []
        ledger_calls: list[Call] = []
        leaves: dict[int, bytes] = {}
        refused: list[Reply] = []
        for call in calls:
            call_id, op, args = call
            if op == "ping" and not args:
                refused.append((call_id, True, None))
            elif op == "append":
                ledger_calls.append(call)
            elif op == ADMIT_APPEND:
                if len(args) != 4 or not isinstance(args[3], bytes) or self._ledger is None:
                    refused.append((call_id, False, _MALFORMED))
                    continue
                leaves[call_id] = args[3]
                state_calls.append((call_id, "run_checks", args[:3]))
            else:
                state_calls.append(call)
        replies = refused
        if state_calls:
            if self._state is None:
                replies += [(call_id, False, _MALFORMED) for call_id, _, _ in state_calls]
            else:
                for call_id, ok, value in self._state.handle(state_calls):
                    leaf = leaves.get(call_id)
                    if leaf is None:
                        replies.append((call_id, ok, value))
                    elif not ok:  # nothing appended; the caller hears which file failed
                        message = str(value)
                        replies.append((call_id, False, message if message.startswith("state store")
                                        else f"state store unavailable: {message}"))
                    elif value is not None:
                        replies.append((call_id, True, (value, None)))  # refused: nothing appended
                    else:
                        ledger_calls.append((call_id, ADMIT_APPEND, (leaf,)))
        if ledger_calls and self._ledger is None:
            replies += [(call_id, False, _MALFORMED) for call_id, _, _ in ledger_calls]
            ledger_calls = []
        if replies:
            yield replies
        if ledger_calls:
            assert self._ledger is not None
            admitted = {call_id for call_id, op, _ in ledger_calls if op == ADMIT_APPEND}
            appends = [(call_id, "append", args) for call_id, _, args in ledger_calls]
            yield [(call_id, ok, (None, value) if ok and call_id in admitted else value)
                   for call_id, ok, value in self._ledger.handle(appends)]

    def close(self) -> None:
        for part in (self._state, self._ledger):
            if part is not None:
                part.close()
