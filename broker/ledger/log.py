"""The ledger: durable appends with group commit, signed checkpoints and RFC 6962 proofs.

Write path. :meth:`Ledger.append` encodes the entry (RFC 8785) in the caller's thread and hands it
to one writer thread. The writer takes everything that queued up while the previous transaction
was fsyncing and commits it as one batch, so N concurrent callers share one fsync instead of
paying N. A caller's future resolves only after its batch committed; if the commit fails, every
caller in the batch gets :class:`LedgerUnavailable` and no receipt exists.

Read path. Other processes may append to the same storage, so the in-memory
:class:`~broker.ledger.merkle.MerkleTree` first catches up from storage (new leaf hashes only)
and then answers from memory.
"""

from __future__ import annotations

import asyncio
import random
import re
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from queue import Empty, SimpleQueue
from typing import Any

from broker.clock import Clock
from broker.errors import InvalidRequest, LedgerUnavailable, NotFound, StoreUnavailable, VerificationError
from broker.ledger.canonical import encode_entry
from broker.ledger.checkpoint import NoteSigner, sign_checkpoint, verify_checkpoint
from broker.ledger.cosignature import Cosignature, CosignatureVerifier
from broker.ledger.merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    TILE_LEVEL,
    MerkleTree,
    TileMismatch,
    leaf_hash,
    root_from_leaf_hashes,
)
from broker.ledger.storage import DuplicateLeaf, LedgerCorrupt, LedgerStorage, MissingEntry, TileRootStorage
from broker.ledger.tiles import TILE_WIDTH, entry_bundle, parse_tile_path, tile_hashes
from broker.models import Receipt
from broker.storaged.client import StorageChannel

__all__ = ["MAX_ENTRIES_PER_CALL", "Ledger", "append_distinct"]

MAX_ENTRIES_PER_CALL = 1000
_CATCH_UP_CHUNK = 65_536  # leaf hashes read per query when catching up (2 MiB)
_DUPLICATE_RETRIES = 3
_HEX_HASH = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True, slots=True)
class _Pending:
    """One queued append and whoever waits for it: a thread (``future``) or a coroutine (``waiter``)."""

    leaf: bytes
    leaf_hash: bytes
    future: Future[Receipt] | None
    waiter: asyncio.Future[Receipt] | None = None
    loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> bool:
        """False if the caller gave up before the write started; it is then not written."""
        if self.future is not None:
            # Once RUNNING, a concurrent future can no longer be cancelled, so setting it cannot fail.
            return self.future.set_running_or_notify_cancel()
        # Read from the writer thread: a cancel racing with this check only costs an extra entry.
        return self.waiter is not None and not self.waiter.cancelled()


def _settle(outcomes: list[tuple[asyncio.Future[Receipt], Receipt | BaseException]]) -> None:
    """On the event loop: hand each waiting coroutine its receipt or error (one call per batch)."""
    for waiter, outcome in outcomes:
        if waiter.done():  # timed out or cancelled meanwhile
            continue
        if isinstance(outcome, BaseException):
            waiter.set_exception(outcome)
        else:
            waiter.set_result(outcome)


def append_distinct(storage: LedgerStorage, distinct: dict[bytes, bytes]) -> tuple[dict[bytes, int], int, list[bytes]]:
    """Append ``distinct`` (leaf hash -> leaf) to ``storage`` in one transaction.

    Returns the index of every leaf (an identical entry already logged answers its existing index),
    the first index written, and the hashes written there in order. Raises
    :class:`~broker.errors.LedgerUnavailable` when the storage cannot make them durable.
    """
    indexes: dict[bytes, int] = {}
    todo = dict(distinct)
    for _ in range(_DUPLICATE_RETRIES):
        try:
            first = storage.append_batch(list(todo.values()))
        except DuplicateLeaf:
            # Rare: an identical entry is already logged (maybe by another process just now).
            # Answer its index and append the rest; retry in case of a fresh race.
            for digest in list(todo):
                found = storage.index_of(digest)
                if found is not None:
                    indexes[digest] = found
                    del todo[digest]
            if not todo:
                return indexes, 0, []
            continue
        for offset, digest in enumerate(todo):
            indexes[digest] = first + offset
        return indexes, first, list(todo)
    raise LedgerUnavailable("ledger write kept colliding with identical entries")


def _ledger_unavailable(reason: str) -> LedgerUnavailable:
    return LedgerUnavailable(reason if reason.startswith("ledger") else f"ledger unavailable: {reason}")


def _state_or_ledger_unavailable(reason: str) -> StoreUnavailable | LedgerUnavailable:
    """A failed ``admit_append``: the state store's error when its checks could not run, else the ledger's."""
    return StoreUnavailable(reason) if reason.startswith("state store") else _ledger_unavailable(reason)


_STOP = object()


class Ledger:
    """The broker's transparency log over a :class:`~broker.ledger.storage.LedgerStorage`.

    ``signer`` signs checkpoints (C2SP signed-note, Ed25519) for ``origin``. The ledger owns the
    storage: :meth:`close` stops the writer thread, then closes the storage.
    """

    def __init__(
        self,
        storage: LedgerStorage,
        signer: NoteSigner,
        origin: str,
        clock: Clock,
        *,
        max_batch: int = 1024,
        append_timeout: float = 30.0,
        tail_tiles: int = 64,
        sample_tiles: int = 64,
        rng: random.Random | None = None,
    ) -> None:
        """Open the log over ``storage`` and check its integrity (:meth:`check_integrity`).

        ``tail_tiles`` and ``sample_tiles`` bound that check (see there); ``rng`` draws the sample.

        Raises :class:`LedgerCorrupt` (and closes ``storage``) when the storage contradicts what
        this log acknowledged or published: every command that holds the signing key opens the
        ledger through here, so none of them can sign a checkpoint over a rewritten history.
        """
        # Fail at construction, not at the first checkpoint request, on a bad origin or key.
        sign_checkpoint(signer, origin, 0, EMPTY_ROOT)
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._storage = storage
        self._signer = signer
        self._origin = origin
        self._clock = clock
        self._max_batch = max_batch
        self._append_timeout = append_timeout
        self._tree = MerkleTree()
        self._tiles_recorded = 0
        self._tree_lock = threading.Lock()
        self._checkpoint_cache: tuple[int, str] | None = None
        self._last_commit_at: float | None = None
        self._queue: SimpleQueue[Any] = SimpleQueue()
        self._state_lock = threading.Lock()
        self._closed = False
        self._remote: StorageChannel | None = None
        self._remote_has_state = False
        try:
            self.check_integrity(tail_tiles=tail_tiles, sample_tiles=sample_tiles, rng=rng)
        except BaseException:
            storage.close()
            raise
        self._writer = threading.Thread(target=self._run_writer, name="ledger-writer", daemon=True)
        self._writer.start()

    # -- identity ------------------------------------------------------------------------------

    @property
    def origin(self) -> str:
        """The checkpoint origin line: this log's identity."""
        return self._origin

    @property
    def verifier_key(self) -> str:
        """The signed-note verifier key auditors use for this log's checkpoints."""
        return self._signer.verifier_key

    def replace_signer(self, signer: NoteSigner) -> None:
        """Sign checkpoints with ``signer`` from now on: a rotated ledger key, taken up without a restart
        (``ledger rotate-key`` recorded its endorsement by the old key first)."""
        sign_checkpoint(signer, self._origin, 0, EMPTY_ROOT)  # a bad key fails here, not at a checkpoint
        with self._tree_lock:
            self._signer = signer
            self._checkpoint_cache = None

    @property
    def last_commit_at(self) -> float | None:
        """Clock time of the last successful commit by this process (for health and metrics)."""
        return self._last_commit_at

    # -- write path ----------------------------------------------------------------------------

    def append(self, entry: dict[str, Any]) -> Receipt:
        """Append ``entry`` and return its receipt once it is durable.

        Raises :class:`ValueError` if the entry is not canonical JSON material (see
        :func:`~broker.ledger.canonical.encode_entry`) and :class:`LedgerUnavailable` if it could
        not be made durable (or the ledger is closed). Appending an entry identical to one
        already logged returns the existing entry's receipt: one leaf hash, one index.
        """
        future = self._submit(entry)
        try:
            return future.result(timeout=self._append_timeout)
        except TimeoutError:
            # The write may still land later; the caller must treat this as "not recorded" and
            # not issue, which errs on the side of an extra ledger entry, never a missing one.
            raise LedgerUnavailable("ledger write timed out") from None

    def append_through(self, socket_path: str, *, with_state: bool = False) -> None:
        """Send :meth:`append_async` calls to the ledger's storage process listening on ``socket_path``
        (:mod:`broker.storaged`: one writer for every worker of ``nhi-broker serve``) instead of this
        process's writer thread; :meth:`append` (start-up, CLI) keeps using the thread. ``with_state``:
        that process also holds the SQLite state file (:meth:`append_if_admitted` is available)."""
        self._remote = StorageChannel(socket_path, timeout=self._append_timeout, unavailable=_ledger_unavailable)
        self._remote_has_state = with_state

    @property
    def appends_with_state_checks(self) -> bool:
        """Whether :meth:`append_if_admitted` can run: the storage process holds the state file too."""
        return self._remote is not None and self._remote_has_state

    async def append_if_admitted(
        self, entry: dict[str, Any], checks: list[tuple[Any, ...]], failed: int | None, now: float
    ) -> Receipt | int:
        """Run the state ``checks`` and append ``entry`` only if every one passes, in one call to the
        storage process that holds both files (:attr:`appends_with_state_checks`).

        ``checks`` and ``failed`` are a ``run_checks`` call's (:func:`broker.state.store.valid_prefix`,
        then :func:`broker.storaged.handlers.checks_to_wire`), judged at clock time ``now``. Returns the
        index of the check that failed (nothing appended), or the entry's receipt once it is durable.
        Raises :class:`~broker.errors.StoreUnavailable` when the checks could not run (nothing
        appended) and :class:`LedgerUnavailable` when the entry could not be made durable (the checks'
        effects stay: the safe side).
        """
        if self._remote is None or not self._remote_has_state:
            raise RuntimeError("append_if_admitted needs a storage process holding the state file and the ledger")
        if self._closed:
            raise LedgerUnavailable("ledger is closed")
        leaf = encode_entry(entry)
        digest = leaf_hash(leaf)
        refused, index = await self._remote.call("admit_append", (now, checks, failed, leaf),
                                                 unavailable=_state_or_ledger_unavailable)
        if refused is not None:
            return int(refused)
        return self._appended_remotely(int(index), digest)

    def _appended_remotely(self, index: int, digest: bytes) -> Receipt:
        """The receipt of a leaf the storage process appended at ``index``; this process's tree follows."""
        self._last_commit_at = self._clock.now()
        self._note_appended(index, digest)
        return Receipt(index=index, leaf_hash=digest.hex())

    async def ping_writer(self) -> None:
        """Raise :class:`LedgerUnavailable` unless the storage process appends go to answers (a no-op
        when this process writes itself: its writer thread cannot be unreachable)."""
        if self._remote is not None:
            await self._remote.call("ping", ())

    async def append_async(self, entry: dict[str, Any]) -> Receipt:
        """:meth:`append` for asyncio callers; the event loop is never blocked on the fsync.

        The writer thread resolves the waiting coroutines of a batch with one hand-over to the loop
        (not one per entry), which keeps the per-append cost on the loop small under load. With a
        storage process (:meth:`append_through`) the entry goes to it, batched with every other
        call of this event-loop turn, and no thread is involved.
        """
        leaf = encode_entry(entry)
        remote = self._remote
        if remote is not None:
            if self._closed:
                raise LedgerUnavailable("ledger is closed")
            digest = leaf_hash(leaf)
            return self._appended_remotely(int(await remote.call("append", (leaf,))), digest)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Receipt] = loop.create_future()
        # No thread lock on the loop: put, then look whether the ledger closed meanwhile. If it did,
        # the waiter is cancelled (the writer skips it, or it already wrote it: one extra entry at
        # worst, never a missing one) and the caller hears "unavailable".
        if self._closed:
            raise LedgerUnavailable("ledger is closed")
        self._queue.put(_Pending(leaf, leaf_hash(leaf), None, waiter, loop))
        if self._closed:
            waiter.cancel()
            raise LedgerUnavailable("ledger is closed")
        try:
            async with asyncio.timeout(self._append_timeout):
                return await waiter
        except TimeoutError:
            raise LedgerUnavailable("ledger write timed out") from None

    def _submit(self, entry: dict[str, Any]) -> Future[Receipt]:
        leaf = encode_entry(entry)
        pending = _Pending(leaf, leaf_hash(leaf), Future())
        self._enqueue(pending)
        assert pending.future is not None
        return pending.future

    def _enqueue(self, pending: _Pending) -> None:
        with self._state_lock:
            if self._closed:
                raise LedgerUnavailable("ledger is closed")
            self._queue.put(pending)

    def _run_writer(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            batch = [item]
            stop = False
            # Group commit: everything that queued during the last fsync goes into this one.
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[_Pending]) -> None:
        # A caller that cancelled (asyncio timeout, client gone) before we start is not written.
        live = [p for p in batch if p.start()]
        if not live:
            return
        distinct: dict[bytes, bytes] = {}
        for p in live:
            distinct.setdefault(p.leaf_hash, p.leaf)
        indexes: dict[bytes, int] = {}
        error: BaseException | None = None
        try:
            indexes = self._store(distinct)
        except LedgerUnavailable as exc:
            error = exc
        except Exception as exc:  # callers must never wait on a dead writer
            error = LedgerUnavailable(f"ledger write failed ({type(exc).__name__})")
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Receipt], Receipt | BaseException]]] = {}
        for p in live:
            index = indexes.get(p.leaf_hash)
            outcome: Receipt | BaseException = (
                error or LedgerUnavailable("ledger write failed") if index is None
                else Receipt(index=index, leaf_hash=p.leaf_hash.hex())
            )
            if p.future is not None:
                if isinstance(outcome, BaseException):
                    p.future.set_exception(outcome)
                else:
                    p.future.set_result(outcome)
            elif p.waiter is not None and p.loop is not None:
                by_loop.setdefault(p.loop, []).append((p.waiter, outcome))
        for loop, outcomes in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, outcomes)
            except RuntimeError:
                pass  # the loop is closed: nobody is waiting any more

    def _store(self, distinct: dict[bytes, bytes]) -> dict[bytes, int]:
        """Append the distinct leaves; the index of each (existing ones for identical entries)."""
        indexes, first, appended = append_distinct(self._storage, distinct)
        if appended:
            self._last_commit_at = self._clock.now()
            self._advance_tree(first, appended)
        return indexes

    def _advance_tree(self, first: int, hashes: list[bytes]) -> None:
        # Saves a read-back when nobody else appended in between; otherwise the next reader
        # catches up from storage. Never wait here: a reader may be catching up a large range.
        if not self._tree_lock.acquire(blocking=False):
            return
        try:
            if self._tree.size == first:
                self._tree.extend(hashes)
                self._record_tiles()
        finally:
            self._tree_lock.release()

    def _note_appended(self, index: int, digest: bytes) -> None:
        """Extend the tree by a leaf another process appended at ``index``, when it is the next one.

        Called on the event loop: never waits for the tree lock and never writes (the tile roots it
        completes are recorded by the next read's catch-up, on a reader thread)."""
        if not self._tree_lock.acquire(blocking=False):
            return
        try:
            if self._tree.size == index:
                self._tree.extend([digest])
        finally:
            self._tree_lock.release()

    def _record_tiles(self) -> None:
        """Persist the roots of tiles the tree completed (must hold ``_tree_lock``); best effort."""
        complete = self._tree.size >> TILE_LEVEL
        if complete <= self._tiles_recorded or not isinstance(self._storage, TileRootStorage):
            return
        roots = self._tree.nodes(TILE_LEVEL, self._tiles_recorded, complete)
        try:
            self._storage.record_tile_roots(
                self._tiles_recorded, [roots[i : i + HASH_SIZE] for i in range(0, len(roots), HASH_SIZE)]
            )
        except LedgerUnavailable:
            return  # retried after the next append; a missing tile root only costs a slower start
        self._tiles_recorded = complete

    def _load_tile(self, tile: int) -> bytes:
        """The leaf hashes of complete tile ``tile``, for the lower nodes a proof needs."""
        return b"".join(self._storage.leaf_hashes(tile << TILE_LEVEL, (tile + 1) << TILE_LEVEL))

    # -- read path -----------------------------------------------------------------------------

    def _sync(self) -> int:
        """Catch the tree up with storage (must hold ``_tree_lock``); the tree size."""
        durable = self._storage.size()
        known = self._tree.size
        if durable < known:
            # Storage lost entries it had acknowledged: the file was replaced or rolled back.
            raise LedgerUnavailable("ledger storage is behind the published tree")
        if known == 0 and durable >= TILE_WIDTH and isinstance(self._storage, TileRootStorage):
            # Cold start: the recorded tile roots (interior hashes), then only the leaf hashes after
            # them, instead of every leaf hash; lower nodes of old tiles are loaded when a proof
            # needs them. check_integrity() checks the tiles against the leaves they stand for.
            roots = self._storage.tile_roots(0, durable >> TILE_LEVEL)
            self._tree = MerkleTree.from_tile_roots(b"".join(roots), (), self._load_tile)
            self._tiles_recorded = len(roots)
            known = self._tree.size
        for start in range(known, durable, _CATCH_UP_CHUNK):
            self._tree.extend(self._storage.leaf_hashes(start, min(durable, start + _CATCH_UP_CHUNK)))
        self._record_tiles()
        return self._tree.size

    def size(self) -> int:
        """Number of durable entries (all processes)."""
        with self._tree_lock:
            return self._sync()

    def checkpoint(self) -> str:
        """The signed checkpoint (C2SP tlog-checkpoint in a signed note) for the current size."""
        with self._tree_lock:
            size = self._sync()
            cached = self._checkpoint_cache
            if cached is not None and cached[0] == size:
                return cached[1]
            root = self._tree.root(size)
        note = sign_checkpoint(self._signer, self._origin, size, root)
        # Durable before anyone sees it, so a restart can prove it still extends what it published.
        self._storage.record_checkpoint(size, root, note)
        self._checkpoint_cache = (size, note)
        return note

    def checkpoint_with_cosignatures(self) -> str:
        """:meth:`checkpoint`, plus the witness cosignatures published for exactly that tree."""
        note = self.checkpoint()
        size = int(note.split("\n", 2)[1])
        cosigned = self._storage.cosignatures(size)
        return note + "".join(line + "\n" for line in cosigned[1]) if cosigned and cosigned[0] == note else note

    def latest_cosigned_checkpoint(self) -> str:
        """The largest checkpoint witnesses cosigned, with their cosignatures; :class:`NotFound` if none."""
        cosigned = self._storage.cosignatures(None)
        if cosigned is None:
            raise NotFound("no checkpoint of this log has been cosigned yet")
        return cosigned[0] + "".join(line + "\n" for line in cosigned[1])

    def publish_cosignatures(self, note: str, witnesses: list[CosignatureVerifier]) -> list[Cosignature]:
        """Keep the valid cosignatures of ``witnesses`` on ``note``, a checkpoint this log published.

        Raises :class:`InvalidRequest` when the note is not one of this log's published checkpoints
        or carries no valid cosignature by a configured witness.
        """
        # (1) our own signature and origin, so only our checkpoints collect cosignatures.
        try:
            checkpoint = verify_checkpoint(note, self.verifier_key, expected_origin=self._origin)
        except VerificationError as exc:
            raise InvalidRequest(f"not a checkpoint of this log: {exc}") from None
        # (2) a tree this log has, with this root, and recorded as published.
        plain = sign_checkpoint(self._signer, self._origin, checkpoint.size, checkpoint.root)
        with self._tree_lock, _tiles_intact():
            size = self._sync()
            if checkpoint.size > size or self._tree.root(checkpoint.size) != checkpoint.root:
                raise InvalidRequest("the checkpoint does not match this log's tree")
        self._storage.record_checkpoint(checkpoint.size, checkpoint.root, plain)
        # (3) each configured witness's cosignature, verified.
        verified: list[Cosignature] = []
        for witness in witnesses:
            try:
                verified.append(witness.verify(note))
            except VerificationError:
                continue
        if not verified:
            raise InvalidRequest("no valid cosignature by a configured witness")
        self._storage.record_cosignatures(checkpoint.size, {c.name: c.line for c in verified})
        return verified

    def tile(self, path: str) -> tuple[bytes, bool]:
        """A C2SP tlog-tiles hash tile or entry bundle by its path below ``tile/``; ``(body, is_full)``.

        Served only for trees this log has (its current size); :class:`NotFound` otherwise.
        """
        tile = parse_tile_path(path)
        with self._tree_lock, _tiles_intact():
            size = self._sync()
            if tile.level is not None:
                return tile_hashes(self._tree, size, tile), tile.width is None
        start = tile.index * TILE_WIDTH
        if start + tile.count > size:
            raise NotFound("this entry bundle is not part of the published tree")
        leaves: list[bytes] = []
        for chunk in range(start, start + tile.count, MAX_ENTRIES_PER_CALL):
            leaves += self._storage.entries(chunk, min(start + tile.count, chunk + MAX_ENTRIES_PER_CALL))
        return entry_bundle(leaves), tile.width is None

    def check_integrity(
        self, *, tail: int = 1024, tail_tiles: int = 64, sample_tiles: int = 64, checkpoints: int = 1000,
        rng: random.Random | None = None,
    ) -> int:
        """Check storage against what this log acknowledged and published; the number of entries.

        Runs when the ledger is opened (so no command can sign over a rewritten history) and may be
        run again. In bounded time, whatever the size of the log:

        (1) the tree loads: recorded tile roots plus the leaf hashes after them (every leaf hash
            on a log without recorded tiles), with no index missing among those read;
        (2) the last ``tail_tiles`` complete tiles, ``sample_tiles`` other tiles drawn at random
            (each start checks a different sample) and the last ``tail`` leaves: every row is
            present, every leaf still hashes to its recorded leaf hash, and every tile's leaf
            hashes still rebuild the tile root the tree holds;
        (3) the tree still has the root of each of the last ``checkpoints`` checkpoints this log
            published, which binds every tile root to a signed root.

        Raises :class:`LedgerCorrupt` naming the first bad index (or the checkpoint the storage
        contradicts, and the index from which on the altered entry lies). Nothing is repaired.
        """
        refusing = "refusing to serve or sign"
        # Published checkpoints first: on a shared ledger other replicas keep appending and publishing,
        # and a checkpoint is recorded only after its entries are durable, so every checkpoint read
        # now is covered by the size read after it (read the other way round, a replica that is
        # merely behind would look like a rollback).
        published = sorted(self._storage.published_checkpoints(checkpoints))
        with self._tree_lock, _tiles_intact():
            # (1)
            try:
                size = self._sync()
            except MissingEntry as exc:
                raise LedgerCorrupt(f"ledger storage is missing entry {exc.index} (a row was deleted); {refusing}",
                                    kind="corrupt", index=exc.index) from None
            except LedgerCorrupt:
                raise
            except LedgerUnavailable as exc:
                raise LedgerCorrupt(f"ledger storage cannot be read back in full: {exc.description}") from None
            # (2) ranges to read, ascending, so the first problem found is the first bad index.
            tiles = size >> TILE_LEVEL
            chosen = set(range(max(0, tiles - tail_tiles), tiles))
            older = max(0, tiles - tail_tiles)
            chosen |= set((rng or random.SystemRandom()).sample(range(older), min(sample_tiles, older)))
            ranges = [(t << TILE_LEVEL, (t + 1) << TILE_LEVEL) for t in sorted(chosen)]
            ranges.append((max(0, size - tail), size))
            for start, end in _merged(ranges):
                self._check_range(start, end, refusing)
            # (3) published checkpoints, smallest first: the first one the tree contradicts, and the
            # largest one below it that still holds, bound where the history was altered.
            holds = 0
            for cp_size, cp_root in published:
                if cp_size > size:
                    raise LedgerCorrupt(f"ledger storage holds {size} entries but a checkpoint of {cp_size} was "
                                        f"published: entries from index {size} are missing; {refusing}",
                                        kind="rollback", index=size)
                if self._tree.root(cp_size) != cp_root:
                    raise LedgerCorrupt(
                        f"ledger storage no longer matches the checkpoint of {cp_size} entries it published: "
                        f"history was altered (the first altered entry is at or after index {holds}"
                        + (f", where the checkpoint of {holds} entries still matches" if holds else "")
                        + f"); {refusing}",
                        kind="fork", index=holds)
                holds = cp_size
            return size

    def _check_range(self, start: int, end: int, refusing: str) -> None:
        """Rows ``[start, end)`` are present, hash to their leaf hashes, and rebuild their tile roots."""
        for chunk in range(start, end, MAX_ENTRIES_PER_CALL):
            stop = min(end, chunk + MAX_ENTRIES_PER_CALL)
            try:
                hashes = self._storage.leaf_hashes(chunk, stop)
                leaves = self._storage.entries(chunk, stop)
            except MissingEntry as exc:
                raise LedgerCorrupt(f"ledger storage is missing entry {exc.index} (a row was deleted); {refusing}",
                                    kind="corrupt", index=exc.index) from None
            for offset, (leaf, recorded) in enumerate(zip(leaves, hashes, strict=True)):
                if leaf_hash(leaf) != recorded:
                    raise LedgerCorrupt(f"ledger entry {chunk + offset} does not match its recorded leaf hash "
                                        f"(corrupt or torn storage); {refusing}", kind="corrupt", index=chunk + offset)
        for tile in range(-(-start // TILE_WIDTH), end // TILE_WIDTH):
            first = tile << TILE_LEVEL
            rebuilt = root_from_leaf_hashes(self._storage.leaf_hashes(first, first + TILE_WIDTH))
            if rebuilt != self._tree.nodes(TILE_LEVEL, tile, tile + 1):
                raise LedgerCorrupt(f"the leaf hashes of entries {first}..{first + TILE_WIDTH - 1} no longer hash to "
                                    f"their recorded tile root (rows rewritten); {refusing}", kind="fork", index=first)

    def entries(self, start: int, end: int) -> list[bytes]:
        """Leaves ``[start, end)``, at most :data:`MAX_ENTRIES_PER_CALL` of them.

        ``end`` is clamped to the log size and to ``start + MAX_ENTRIES_PER_CALL``; fetch the
        rest with a further call from where the answer stopped.
        """
        if not _is_int(start) or not _is_int(end) or start < 0 or end <= start:
            raise InvalidRequest("entry range must satisfy 0 <= start < end")
        size = self.size()
        if start >= size:
            raise InvalidRequest(f"start {start} is beyond the log size {size}")
        return self._storage.entries(start, min(end, size, start + MAX_ENTRIES_PER_CALL))

    def inclusion_proof(self, index: int, tree_size: int) -> list[bytes]:
        """The RFC 9162 §2.1.3 audit path of entry ``index`` in the tree of ``tree_size``."""
        with self._tree_lock, _tiles_intact():
            self._sync()
            return self._tree.inclusion_proof(index, tree_size)

    def consistency_proof(self, size1: int, size2: int) -> list[bytes]:
        """The RFC 9162 §2.1.4 consistency proof from tree size ``size1`` to ``size2``."""
        with self._tree_lock, _tiles_intact():
            self._sync()
            return self._tree.consistency_proof(size1, size2)

    def find(self, leaf_hash_hex: str) -> int:
        """The index of the entry with this leaf hash (64 hex digits); :class:`NotFound` if absent."""
        if not isinstance(leaf_hash_hex, str) or not _HEX_HASH.fullmatch(leaf_hash_hex):
            raise InvalidRequest("leaf hash must be 64 hexadecimal digits")
        index = self._storage.index_of(bytes.fromhex(leaf_hash_hex))
        if index is None:
            raise NotFound("no ledger entry has this leaf hash")
        return index

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Commit what is queued, stop the writer thread, close the storage. Idempotent."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._writer.join()
        if self._remote is not None:
            self._remote.close()
        self._storage.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextmanager
def _tiles_intact() -> Iterator[None]:
    """A tile whose rows no longer rebuild its recorded root is corruption, reported as such (503)."""
    try:
        yield
    except TileMismatch as exc:
        raise LedgerCorrupt(f"{exc}: the ledger storage was altered", kind="fork",
                            index=exc.tile << TILE_LEVEL) from None
    except MissingEntry as exc:
        raise LedgerCorrupt(f"ledger storage is missing entry {exc.index} (a row was deleted)",
                            kind="corrupt", index=exc.index) from None


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(r for r in ranges if r[0] < r[1]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
