"""The ledger: durable appends with group commit, signed checkpoints and RFC 6962 proofs.

Write path. :meth:`Ledger.append` encodes the entry (RFC 8785) in the caller's thread and hands it
to one writer thread. The writer takes everything that queued up while the previous transaction
was fsyncing and commits it as one batch, so N concurrent callers share one fsync instead of
paying N. A caller's future resolves only after its batch committed; if the commit fails, every
caller in the batch gets :class:`LedgerUnavailable` and no receipt exists.

:meth:`Ledger.append_async` batches on the event loop first: the entries appended during one turn
of the loop go to the writer as one item, and their receipts come back in one thread-safe callback,
so a busy loop pays one cross-thread hand-off per batch instead of one per entry. One timer per batch
bounds the wait.

Read path. Other processes may append to the same storage, so the in-memory
:class:`~broker.ledger.merkle.MerkleTree` first catches up from storage (new leaf hashes only)
and then answers from memory.
"""

from __future__ import annotations

import asyncio
import re
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from queue import Empty, SimpleQueue
from typing import Any

from broker.clock import Clock
from broker.errors import InvalidRequest, LedgerUnavailable, NotFound, VerificationError
from broker.ledger.canonical import encode_entry
from broker.ledger.checkpoint import NoteSigner, sign_checkpoint, verify_checkpoint
from broker.ledger.cosignature import Cosignature, CosignatureVerifier
from broker.ledger.merkle import EMPTY_ROOT, MerkleTree, leaf_hash
from broker.ledger.storage import DuplicateLeaf, LedgerCorrupt, LedgerStorage
from broker.ledger.tiles import TILE_WIDTH, entry_bundle, parse_tile_path, tile_hashes
from broker.models import Receipt

__all__ = ["MAX_ENTRIES_PER_CALL", "Ledger"]

MAX_ENTRIES_PER_CALL = 1000
_CATCH_UP_CHUNK = 65_536  # leaf hashes read per query when catching up (2 MiB)
_DUPLICATE_RETRIES = 3
_HEX_HASH = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True, slots=True)
class _Pending:
    leaf: bytes
    leaf_hash: bytes
    future: Future[Receipt]


@dataclass(frozen=True, slots=True)
class _LoopPending:
    leaf: bytes
    leaf_hash: bytes
    future: asyncio.Future[Receipt]


@dataclass(slots=True)
class _LoopBatch:
    """Entries appended on one event loop during one turn, handed to the writer together."""

    loop: asyncio.AbstractEventLoop
    items: list[_LoopPending]
    timer: asyncio.TimerHandle | None = None


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
    ) -> None:
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
        self._tree_lock = threading.Lock()
        self._checkpoint_cache: tuple[int, str] | None = None
        self._last_commit_at: float | None = None
        self._queue: SimpleQueue[Any] = SimpleQueue()
        # Entries appended on each event loop since its last hand-off; only that loop's thread touches
        # its list.
        self._loop_batches: dict[asyncio.AbstractEventLoop, _LoopBatch] = {}
        self._state_lock = threading.Lock()
        self._closed = False
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

    async def append_async(self, entry: dict[str, Any]) -> Receipt:
        """:meth:`append` for asyncio callers; the event loop is never blocked on the fsync.

        Entries appended during one turn of the loop reach the writer as one batch (see the module
        docstring); a caller that is cancelled before its batch is written is left out of it.
        """
        leaf = encode_entry(entry)
        if self._closed:
            raise LedgerUnavailable("ledger is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Receipt] = loop.create_future()
        batch = self._loop_batches.get(loop)
        if batch is None:
            batch = self._loop_batches[loop] = _LoopBatch(loop, [])
            loop.call_soon(self._hand_off, batch)
        batch.items.append(_LoopPending(leaf, leaf_hash(leaf), future))
        return await future

    def _hand_off(self, batch: _LoopBatch) -> None:
        """On the loop: send what this turn appended to the writer, with one timer for all of it."""
        if self._loop_batches.get(batch.loop) is batch:
            del self._loop_batches[batch.loop]
        with self._state_lock:
            closed = self._closed
            if not closed:
                # The write may still land after the timeout; the caller must treat it as "not
                # recorded" and not issue: an extra ledger entry at worst, never a missing one.
                batch.timer = batch.loop.call_later(self._append_timeout, self._resolve, batch.items,
                                                    LedgerUnavailable("ledger write timed out"))
                self._queue.put(batch)
        if closed:
            self._resolve(batch.items, LedgerUnavailable("ledger is closed"))

    @staticmethod
    def _resolve(items: list[_LoopPending], outcome: list[Receipt | BaseException] | BaseException,
                 timer: asyncio.TimerHandle | None = None) -> None:
        """On the loop: answer every caller still waiting (a cancelled or timed-out one is skipped)."""
        if timer is not None:
            timer.cancel()
        for i, p in enumerate(items):
            if p.future.done():
                continue
            result = outcome if isinstance(outcome, BaseException) else outcome[i]
            if isinstance(result, BaseException):
                p.future.set_exception(result)
            else:
                p.future.set_result(result)

    def _submit(self, entry: dict[str, Any]) -> Future[Receipt]:
        leaf = encode_entry(entry)
        pending = _Pending(leaf, leaf_hash(leaf), Future())
        with self._state_lock:
            if self._closed:
                raise LedgerUnavailable("ledger is closed")
            self._queue.put(pending)
        return pending.future

    def _run_writer(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            batch = [item]
            size = len(item.items) if isinstance(item, _LoopBatch) else 1
            stop = False
            # Group commit: everything that queued during the last fsync goes into this one.
            while size < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
                size += len(item.items) if isinstance(item, _LoopBatch) else 1
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[_Pending | _LoopBatch]) -> None:
        # A caller that cancelled (asyncio timeout, client gone) before we start is not written;
        # once RUNNING, a future can no longer be cancelled, so set_result below cannot fail. A loop
        # caller's future is only read here (a cancellation racing this check costs an extra entry,
        # never a missing one) and answered on its loop.
        live = [p for p in batch if isinstance(p, _LoopBatch) or p.future.set_running_or_notify_cancel()]
        distinct: dict[bytes, bytes] = {}
        for p in live:
            if isinstance(p, _LoopBatch):
                for q in p.items:
                    if not q.future.done():
                        distinct.setdefault(q.leaf_hash, q.leaf)
            else:
                distinct.setdefault(p.leaf_hash, p.leaf)
        indexes: dict[bytes, int] = {}
        error: BaseException | None = None
        if distinct:
            try:
                indexes = self._store(distinct)
            except LedgerUnavailable as exc:
                error = exc
            except Exception as exc:  # callers must never wait on a dead writer
                error = LedgerUnavailable(f"ledger write failed ({type(exc).__name__})")
        failed = error or LedgerUnavailable("ledger write failed")

        def outcome(digest: bytes) -> Receipt | BaseException:
            index = indexes.get(digest)
            return failed if index is None else Receipt(index=index, leaf_hash=digest.hex())

        for p in live:
            if isinstance(p, _LoopBatch):
                results = [outcome(q.leaf_hash) for q in p.items]
                try:
                    p.loop.call_soon_threadsafe(self._resolve, p.items, results, p.timer)
                except RuntimeError:
                    pass  # the loop is closed: nobody waits on these futures any more
            else:
                result = outcome(p.leaf_hash)
                if isinstance(result, BaseException):
                    p.future.set_exception(result)
                else:
                    p.future.set_result(result)

    def _store(self, distinct: dict[bytes, bytes]) -> dict[bytes, int]:
        """Append the distinct leaves; the index of each (existing ones for identical entries)."""
        indexes: dict[bytes, int] = {}
        todo = dict(distinct)
        for _ in range(_DUPLICATE_RETRIES):
            try:
                first = self._storage.append_batch(list(todo.values()))
            except DuplicateLeaf:
                # Rare: an identical entry is already logged (maybe by another process just now).
                # Answer its index and append the rest; retry in case of a fresh race.
                for digest in list(todo):
                    found = self._storage.index_of(digest)
                    if found is not None:
                        indexes[digest] = found
                        del todo[digest]
                if not todo:
                    return indexes
                continue
            self._last_commit_at = self._clock.now()
            for offset, digest in enumerate(todo):
                indexes[digest] = first + offset
            self._advance_tree(first, list(todo))
            return indexes
        raise LedgerUnavailable("ledger write kept colliding with identical entries")

    def _advance_tree(self, first: int, hashes: list[bytes]) -> None:
        # Saves a read-back when nobody else appended in between; otherwise the next reader
        # catches up from storage. Never wait here: a reader may be catching up a large range.
        if not self._tree_lock.acquire(blocking=False):
            return
        try:
            if self._tree.size == first:
                self._tree.extend(hashes)
        finally:
            self._tree_lock.release()

    # -- read path -----------------------------------------------------------------------------

    def _sync(self) -> int:
        """Catch the tree up with storage (must hold ``_tree_lock``); the tree size."""
        durable = self._storage.size()
        known = self._tree.size
        if durable < known:
            # Storage lost entries it had acknowledged: the file was replaced or rolled back.
            raise LedgerUnavailable("ledger storage is behind the published tree")
        for start in range(known, durable, _CATCH_UP_CHUNK):
            self._tree.extend(self._storage.leaf_hashes(start, min(durable, start + _CATCH_UP_CHUNK)))
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
        with self._tree_lock:
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
        with self._tree_lock:
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

    def check_integrity(self, *, tail: int = 1024, checkpoints: int = 1000) -> int:
        """Check storage on start; the number of entries, or :class:`LedgerCorrupt` with what is wrong.

        (1) indexes are gapless and every leaf hash loads; (2) the last ``tail`` leaves still hash to
        their recorded leaf hashes (a torn or corrupt tail); (3) the tree still has the root of each
        of the last ``checkpoints`` checkpoints this log published. Nothing is repaired or truncated.
        """
        with self._tree_lock:
            try:
                size = self._sync()
            except LedgerCorrupt:
                raise
            except LedgerUnavailable as exc:
                raise LedgerCorrupt(f"ledger storage cannot be read back in full: {exc.description}") from None
            start = max(0, size - tail)
            for chunk in range(start, size, MAX_ENTRIES_PER_CALL):
                end = min(size, chunk + MAX_ENTRIES_PER_CALL)
                leaves = self._storage.entries(chunk, end)
                for offset, (leaf, recorded) in enumerate(zip(leaves, self._storage.leaf_hashes(chunk, end),
                                                              strict=True)):
                    if leaf_hash(leaf) != recorded:
                        raise LedgerCorrupt(f"ledger entry {chunk + offset} does not match its recorded leaf hash "
                                            "(corrupt or torn storage); refusing to start")
            for cp_size, cp_root in self._storage.published_checkpoints(checkpoints):
                if cp_size > size:
                    raise LedgerCorrupt(f"ledger storage holds {size} entries but a checkpoint of {cp_size} was "
                                        f"published: entries from index {size} are missing; refusing to start")
                if self._tree.root(cp_size) != cp_root:
                    raise LedgerCorrupt(f"ledger storage no longer matches the checkpoint of {cp_size} entries it "
                                        "published: history was altered; refusing to start")
            return size

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
        with self._tree_lock:
            self._sync()
            return self._tree.inclusion_proof(index, tree_size)

    def consistency_proof(self, size1: int, size2: int) -> list[bytes]:
        """The RFC 9162 §2.1.4 consistency proof from tree size ``size1`` to ``size2``."""
        with self._tree_lock:
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
        self._storage.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
