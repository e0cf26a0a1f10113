"""What a storage process does with a batch of calls: the state file's operations, or ledger appends.

A handler runs on the storage process's only thread and gets every call that arrived while it was
busy with the previous batch, from every worker: that is the group commit, across processes, with
no turn-taking between them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
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

__all__ = ["Call", "Handler", "LedgerHandler", "Reply", "StateHandler", "checks_from_wire", "checks_to_wire"]

log = logging.getLogger("nhi_broker.storaged")

#: ``(id, op, args)`` as a worker sent it; ``(id, ok, value)`` as it is answered.
Call = tuple[int, str, tuple[Any, ...]]
Reply = tuple[int, bool, Any]

# Reported to the caller for a call the handler could not read: a bug on one side, never data.
_MALFORMED = "storage process refused a malformed call"


class Handler(Protocol):
    """Runs one batch of calls; one reply per call, in any order."""

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
    """Ledger appends: ``("append", (leaf,))`` answers the leaf's index once its batch is fsynced;
    ``("ping", ())`` answers ``None``."""

    def __init__(self, storage: LedgerStorage, *, max_batch: int = 1024) -> None:
        self._storage = storage
        self._max_batch = max_batch

    def handle(self, calls: Sequence[Call]) -> list[Reply]:
        replies: list[Reply] = []
        todo: list[tuple[int, bytes]] = []
        for call_id, op, args in calls:
            if op == "ping" and not args:
                replies.append((call_id, True, None))
                continue
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
