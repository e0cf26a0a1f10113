"""Live policy changes: reload a policy set without a restart, on every worker and replica.

One process *leads* a reload (``POST /v1/admin/policies/reload`` reaches one worker; SIGHUP is handed
to one worker by the supervisor):

1. lint the policy directory with the checks of ``nhi-broker policy lint``; a refused set raises
   :class:`~broker.errors.PolicyLoadError` naming each file, line and problem, and nothing changes;
2. take the reload lock in the shared state store, so two reloads (two workers, two replicas, a
   SIGHUP sent to every pod) never interleave;
3. if the shared record already names this version, another process recorded it: swap only;
4. otherwise swap the set in (one reference assignment: a request sees the old set or the new one,
   never a mix), append the ``policy_load`` entry and wait until it is durable; if the append fails,
   the old set is swapped back and the caller gets 503;
5. publish the record ``{version, generation, ledger entry}`` in the shared store, release the lock.

Every other worker *follows*: every ``live_sync_interval`` seconds it reads the record (one small
read). For a generation it has not followed and a version it does not serve, it hashes its own policy
directory; when that gives the recorded version it loads and swaps it (no entry: the leader wrote
the one entry of this change). When the files differ (this replica's files are not the recorded ones
yet) it keeps serving what it serves, says so once in its log, and tries again at the next look.
A worker that starts with files giving another set than the record names (respawned after an edit
nobody reloaded) leads a reload of them (:meth:`PolicyReloader.check_started`): no worker serves a
set the ledger does not name.

Every decision records the version that decided it, so an auditor sees which set each worker applied.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from broker.clock import Clock
from broker.entries import policy_load_entry
from broker.errors import PolicyLoadError, TemporarilyUnavailable
from broker.models import Receipt
from broker.policy import PolicySet, directory_version
from broker.policy.testing import lint_policies
from broker.state import StateStore

__all__ = ["PolicyRecord", "PolicyReloader", "ReloadOutcome", "policy_file_digests"]

log = logging.getLogger("nhi_broker.reload")

_NAMESPACE = "policy"
_RECORD = "live"
_LOCK = "reload-lock"
_FOREVER = 100 * 365 * 86400.0
#: A reload holds the lock at most this long (a crashed leader's lock expires).
LOCK_SECONDS = 30.0
#: A reload waits at most this long for another one to finish.
LOCK_WAIT_SECONDS = 10.0


def policy_file_digests(directory: Path) -> dict[str, str]:
    """``sha256:<hex>`` of each policy file present, by name."""
    import hashlib

    from broker.policy import POLICY_FILES

    return {
        name: "sha256:" + hashlib.sha256((directory / name).read_bytes()).hexdigest()
        for name in POLICY_FILES
        if (directory / name).is_file()
    }


class AppendOnlyLog(Protocol):
    async def append_async(self, entry: dict[str, Any]) -> Receipt: ...


@dataclass(frozen=True)
class PolicyRecord:
    """The policy set the broker last recorded as live, as the shared state store holds it."""

    version: str
    generation: int
    ledger_index: int
    leaf_hash: str
    at: float

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "generation": self.generation, "ledger_index": self.ledger_index,
                "leaf_hash": self.leaf_hash, "at": self.at}

    @classmethod
    def from_text(cls, text: str) -> PolicyRecord | None:
        """The record, or ``None`` for a value this broker did not write (it is then replaced)."""
        try:
            data = json.loads(text)
            return cls(version=str(data["version"]), generation=int(data["generation"]),
                       ledger_index=int(data["ledger_index"]), leaf_hash=str(data["leaf_hash"]),
                       at=float(data["at"]))
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True)
class ReloadOutcome:
    """What a reload did: ``changed`` (this process serves another set now), ``recorded`` (this
    reload wrote the ``policy_load`` entry; otherwise ``record`` names the entry that recorded it)."""

    previous_version: str
    version: str
    changed: bool
    recorded: bool
    record: PolicyRecord
    rules: int
    workloads: int
    test_cases: int

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version, "previous_version": self.previous_version, "changed": self.changed,
            "recorded": self.recorded, "generation": self.record.generation,
            "receipt": {"index": self.record.ledger_index, "leaf_hash": self.record.leaf_hash},
            "rules": self.rules, "workloads": self.workloads, "test_cases": self.test_cases,
        }


class PolicyReloader:
    """Leads reloads in this process and follows the ones other processes lead (module docstring).

    ``current`` returns the set this process serves; ``install`` swaps a set in (one assignment).
    """

    def __init__(
        self, directory: Path, current: Callable[[], PolicySet], install: Callable[[PolicySet], None],
        ledger: AppendOnlyLog, store: StateStore, clock: Clock,
    ) -> None:
        self.directory = Path(directory)
        self._current = current
        self._install = install
        self._ledger = ledger
        self._store = store
        self._clock = clock
        self._seen = 0  # the generation this process last followed or led
        self._warned = 0
        self._local: asyncio.Lock | None = None

    def _local_lock(self) -> asyncio.Lock:
        if self._local is None:
            self._local = asyncio.Lock()
        return self._local

    async def record(self) -> PolicyRecord | None:
        """The shared record, or ``None`` when there is none yet."""
        found = await self._store.get_record(_NAMESPACE, _RECORD)
        return None if found is None else PolicyRecord.from_text(found[0])

    async def _write(self, record: PolicyRecord) -> None:
        value = json.dumps(record.to_json())
        expires = self._clock.now() + _FOREVER
        for _ in range(5):  # only another writer without the lock (an expired lock) makes this loop
            found = await self._store.get_record(_NAMESPACE, _RECORD)
            if found is None:
                if await self._store.put_record(_NAMESPACE, _RECORD, value, expires):
                    return
            elif await self._store.swap_record(_NAMESPACE, _RECORD, found[1], value, expires):
                return
        raise TemporarilyUnavailable("the policy record in the state store keeps changing; try the reload again")

    async def _lock(self) -> str:
        token = uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LOCK_WAIT_SECONDS
        while not await self._store.put_record(_NAMESPACE, _LOCK, token, self._clock.now() + LOCK_SECONDS):
            if loop.time() > deadline:
                raise TemporarilyUnavailable("another policy reload is still running; try again")
            await asyncio.sleep(0.05)
        return token

    async def _unlock(self, token: str) -> None:
        found = await self._store.get_record(_NAMESPACE, _LOCK)
        if found is not None and found[0] == token:
            await self._store.swap_record(_NAMESPACE, _LOCK, found[1], "", self._clock.now())

    async def announce(self, version: str, receipt: Receipt) -> PolicyRecord:
        """Publish ``version`` as recorded by ``receipt`` (a start's ``policy_load`` entry)."""
        token = await self._lock()
        try:
            previous = await self.record()
            record = PolicyRecord(version, (previous.generation if previous else 0) + 1, receipt.index,
                                  receipt.leaf_hash, self._clock.now())
            await self._write(record)
            self._seen = record.generation
            return record
        finally:
            await self._unlock(token)

    async def reload(self, request_id: str, actor: dict[str, Any] | None = None) -> ReloadOutcome:
        """Lead a reload (module docstring, steps 1-5)."""
        # (1) lint off the loop: a large set takes a while to parse and index.
        new, cases = await asyncio.to_thread(lint_policies, self.directory)
        async with self._local_lock():
            # (2) one reload at a time, across processes.
            token = await self._lock()
            try:
                return await self._lead(new, cases, request_id, actor)
            finally:
                await self._unlock(token)

    async def _lead(self, new: PolicySet, cases: int, request_id: str, actor: dict[str, Any] | None) -> ReloadOutcome:
        old = self._current()
        record = await self.record()
        counts = {"rules": len(new.rules), "workloads": len(new.registry), "test_cases": cases}
        if record is not None and record.version == new.version:
            # (3) recorded already (by another worker or replica, or the start): nothing to add.
            if old.version != new.version:
                self._install(new)
            self._seen = record.generation
            return ReloadOutcome(old.version, new.version, old.version != new.version, False, record, **counts)
        # (4) swap, then record; the old set comes back if the entry cannot be written.
        files = await asyncio.to_thread(policy_file_digests, self.directory)
        entry = policy_load_entry(now=self._clock.now(), request_id=request_id, policy_version=new.version,
                                  files=files, source=str(self.directory), actor=actor)
        self._install(new)
        try:
            receipt = await self._ledger.append_async(entry)
        except BaseException:
            self._install(old)
            raise
        # (5) the other workers and replicas follow this record.
        published = PolicyRecord(new.version, (record.generation if record else 0) + 1, receipt.index,
                                 receipt.leaf_hash, self._clock.now())
        await self._write(published)
        self._seen = published.generation
        log.info("policy set %s is live (was %s); recorded at ledger index %d, generation %d",
                 new.version, old.version, receipt.index, published.generation)
        return ReloadOutcome(old.version, new.version, old.version != new.version, True, published, **counts)

    async def check_started(self) -> ReloadOutcome | None:
        """At a worker's start: if the shared record names another set than the files gave this worker
        (a worker respawned after the files were edited), lead a reload of the files, so that what this
        worker serves is recorded and the other workers follow it, rather than serve an unrecorded set."""
        record = await self.record()
        current = self._current()
        if record is None or record.version == current.version:
            if record is not None:
                self._seen = record.generation
            return None
        log.warning("this worker started with policy set %s but %s is the recorded one (the files changed "
                    "since): reloading them on every worker, recorded", current.version, record.version)
        return await self.reload(f"reload-worker-start-{uuid.uuid4().hex}")

    async def follow(self) -> bool:
        """Follow a reload another process recorded; True if this process now serves another set."""
        record = await self.record()
        if record is None or record.generation == self._seen:
            return False
        async with self._local_lock():
            current = self._current()
            if record.version == current.version:
                self._seen = record.generation
                return False
            try:
                here = await asyncio.to_thread(directory_version, self.directory)
                if here != record.version:
                    raise PolicyLoadError([f"the files give {here}, not the recorded {record.version}"])
                new, _ = await asyncio.to_thread(lint_policies, self.directory)
                if new.version != record.version:
                    raise PolicyLoadError([f"the files changed while loading (now {new.version})"])
            except (PolicyLoadError, OSError) as exc:
                if self._warned != record.generation:
                    self._warned = record.generation
                    problems = exc.problems if isinstance(exc, PolicyLoadError) else [str(exc)]
                    log.warning("policy generation %d (%s) was loaded elsewhere but %s cannot follow it yet; "
                                "still serving %s: %s", record.generation, record.version, self.directory,
                                current.version, "; ".join(problems))
                return False
            self._install(new)
            self._seen = record.generation
        log.info("followed policy generation %d: %s is live here (was %s; recorded at ledger index %d)",
                 record.generation, record.version, current.version, record.ledger_index)
        return True
