"""``audit verify``: rebuild the whole ledger from an untrusted source and check it against a signed checkpoint.

The only way to hold a :class:`VerifiedLedger` is :func:`verify_ledger`. The steps are numbered in
the code and in docs/ledger.md §Verifying a ledger:

1. verify the source's latest checkpoint with the verifier key given out of band;
2. if the auditor holds an earlier trusted checkpoint, the new one must not be smaller;
3. fetch every entry ``[0, size)`` (paged), recompute each leaf hash, check that the leaf is
   canonical RFC 8785 JSON and that the entry matches the schema of its kind;
4. recompute the RFC 6962 root and compare it with the checkpoint (and the trusted checkpoint);
5. on a root mismatch, find the first entry that differs by bisecting with the source's
   consistency proofs, which only an unaltered prefix can satisfy.

The first problem (smallest index) is raised as :class:`~broker.audit.errors.AuditFailure`.
"""

from __future__ import annotations

import hmac
import multiprocessing
import struct
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from broker.audit._canonical import decode_leaf
from broker.audit.errors import AuditFailure, ConsistencyViolation, EntrySchemaError, SourceUnavailable
from broker.audit.schema import validate_entry
from broker.audit.source import LedgerSource
from broker.errors import VerificationError
from broker.ledger.checkpoint import Checkpoint, _parse_checkpoint_body, verify_checkpoint
from broker.ledger.merkle import HASH_SIZE, MerkleTree, leaf_hash, verify_consistency, verify_inclusion
from broker.ledger.rotation import endorsed_key

__all__ = [
    "LedgerSummary",
    "Progress",
    "SignedCheckpoint",
    "VerifiedLedger",
    "VerifierKeys",
    "extend_verified",
    "rollback_violation",
    "verified_entries",
    "verify_checkpoint_from",
    "verify_ledger",
    "verify_note",
    "verify_signed_checkpoint",
]

Progress = Callable[[int, int], None]
"""Called as ``progress(done, total)`` while entries are verified."""

_BATCH = 2048  # entries per unit of work (about 2 MB of leaves)


def _pool(jobs: int) -> ProcessPoolExecutor:
    # spawn, not fork: the caller may hold threads (HTTP prefetch) whose locks a fork would copy.
    return ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))


@dataclass(frozen=True)
class _BatchResult:
    hashes: bytes
    summary: LedgerSummary
    endorsements: list[tuple[int, dict[str, Any]]]
    error: tuple[int, str] | None
    entries: list[dict[str, Any]] | None = None


def _check_batch(first: int, leaves: list[bytes], recorded: list[bytes | None], keep: bool = False) -> _BatchResult:
    """Leaf hashes of a batch, its summary, and its first bad entry (index, reason), if any.

    ``keep``: also return the decoded entries (in order, until the first bad one).
    """
    kept: list[dict[str, Any]] | None = [] if keep else None
    hashes = bytearray()
    summary = LedgerSummary()
    endorsements: list[tuple[int, dict[str, Any]]] = []
    error: tuple[int, str] | None = None
    for offset, leaf in enumerate(leaves):
        computed = leaf_hash(leaf)
        hashes += computed
        if error is not None:
            continue  # keep hashing for the root check; the first error is the one reported
        index = first + offset
        stated = recorded[offset]
        if stated is not None and not hmac.compare_digest(stated, computed):
            error = (index, "the leaf hash the source states does not match the entry's bytes")
            continue
        try:
            valid = validate_entry(decode_leaf(leaf))
        except EntrySchemaError as exc:
            error = (index, f"entry breaks the version 1 schema: {exc}")
            continue
        except VerificationError as exc:
            error = (index, f"leaf is not canonical JSON: {exc}")
            continue
        summary.add(valid.kind, valid.time, valid.workload or valid.spiffe_id, valid.owner)
        if valid.kind == "key_rotation" and "endorsement" in valid.entry["key"]:
            endorsements.append((index, valid.entry["key"]))
        if kept is not None:
            kept.append(valid.entry)
    return _BatchResult(bytes(hashes), summary, endorsements, error, kept)


@dataclass
class LedgerSummary:
    """What a verified ledger holds: counts by kind, workload and owner, and its time range."""

    size: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    by_workload: Counter[str] = field(default_factory=Counter)
    by_owner: Counter[str] = field(default_factory=Counter)
    first_time: str | None = None
    last_time: str | None = None

    def merge(self, other: LedgerSummary) -> None:
        """Add the counts and time range of ``other`` (a later batch)."""
        self.size += other.size
        self.by_kind.update(other.by_kind)
        self.by_workload.update(other.by_workload)
        self.by_owner.update(other.by_owner)
        for time in (other.first_time, other.last_time):
            if time is not None:
                self.first_time = time if self.first_time is None else min(self.first_time, time)
                self.last_time = time if self.last_time is None else max(self.last_time, time)

    def add(self, kind: str, time: str, workload: str | None, owner: str | None) -> None:
        self.size += 1
        self.by_kind[kind] += 1
        if workload is not None:
            self.by_workload[workload] += 1
        if owner is not None:
            self.by_owner[owner] += 1
        # RFC 3339 UTC at fixed width: string order is time order.
        if self.first_time is None or time < self.first_time:
            self.first_time = time
        if self.last_time is None or time > self.last_time:
            self.last_time = time


@dataclass(frozen=True)
class VerifiedLedger:
    """A ledger whose every entry was checked against a signed checkpoint. Built by :func:`verify_ledger`.

    ``tree`` holds the recomputed leaf hashes, so proofs for any verified size can be derived
    locally; ``note`` is the verified checkpoint, verbatim; ``signed_by`` the verifier key that
    verified it (a rotated key when the ledger endorsed one).
    """

    checkpoint: Checkpoint
    note: str
    summary: LedgerSummary
    tree: MerkleTree
    signed_by: str = ""


VerifierKeys = str | Sequence[str]
"""One verifier key, or several the auditor trusts (oldest first), e.g. across a key rotation."""


def _keys(verifier_keys: VerifierKeys) -> list[str]:
    keys = [verifier_keys] if isinstance(verifier_keys, str) else list(verifier_keys)
    if not keys:
        raise AuditFailure("no verifier key given")
    return keys


def verify_note(note: str, keys: list[str], origin: str | None) -> tuple[Checkpoint, str]:
    """The checkpoint verified by the newest of ``keys`` that signed it, and that key; or :class:`AuditFailure`."""
    failure: VerificationError | None = None
    for key in reversed(keys):
        try:
            return verify_checkpoint(note, key, expected_origin=origin), key
        except VerificationError as exc:
            failure = failure or exc
    raise AuditFailure(f"checkpoint does not verify: {failure}")


@dataclass(frozen=True)
class SignedCheckpoint:
    """A source's latest checkpoint, verified by a trusted key or one the ledger endorsed.

    Built only by :func:`verify_signed_checkpoint`. ``signed_by`` is the verifier key whose
    signature verified; ``keys`` the trusted keys followed by every key the ledger endorsed
    (docs/ledger.md §5.3), in ledger order, so an older checkpoint signed by any of them verifies.
    """

    checkpoint: Checkpoint
    note: str
    signed_by: str
    keys: tuple[str, ...]
    trusted_count: int

    @property
    def rotated(self) -> bool:
        """The checkpoint is signed by a key the auditor did not give, reached through endorsements."""
        return self.signed_by not in self.keys[: self.trusted_count]


def verify_signed_checkpoint(
    source: LedgerSource, verifier_keys: VerifierKeys, origin: str | None = None
) -> SignedCheckpoint:
    """The source's latest checkpoint, verified exactly as :func:`verify_ledger` accepts signers.

    (1) a key the auditor gave; otherwise (2) the ``key_rotation`` entries of the tree the note
    claims are read, their endorsements followed from the trusted keys, and the note must verify
    with an endorsed key; (3) each endorsement entry must then be proven included in that signed
    tree. Raises :class:`AuditFailure` with the first reason when no trusted or endorsed key signed it.
    """
    keys = _keys(verifier_keys)
    note = source.checkpoint()
    try:
        checkpoint, signed_by = verify_note(note, keys, origin)
        return SignedCheckpoint(checkpoint, note, signed_by, tuple(keys), len(keys))
    except AuditFailure as exc:
        failure = exc
    unverified = _unverified_checkpoint(note)
    found: list[tuple[int, bytes, dict[str, Any]]] = []
    for raw in source.entries(0, unverified.size):
        if b'"key_rotation"' not in raw.leaf:
            continue  # cheap pre-filter: only rotations can carry an endorsement
        try:
            valid = validate_entry(decode_leaf(raw.leaf))
        except VerificationError:
            continue  # `audit verify` reports bad entries; here only endorsements matter
        if valid.kind == "key_rotation" and "endorsement" in valid.entry["key"]:
            found.append((raw.index, leaf_hash(raw.leaf), valid.entry["key"]))
    accepted = _follow_endorsements(keys, [(index, key) for index, _, key in found], unverified.origin)
    try:
        checkpoint, signed_by = verify_note(note, accepted[len(keys) :], origin)
    except AuditFailure:
        raise failure from None
    for index, digest, _ in found:
        try:
            verify_inclusion(digest, index, checkpoint.size, source.inclusion_proof(index, checkpoint.size),
                             checkpoint.root)
        except VerificationError as exc:
            raise AuditFailure(f"the key rotation entry is not in the signed tree: {exc}", index=index) from None
    return SignedCheckpoint(checkpoint, note, signed_by, tuple(accepted), len(keys))


def verify_checkpoint_from(
    source: LedgerSource, verifier_keys: VerifierKeys, origin: str | None = None
) -> tuple[Checkpoint, str]:
    """:func:`verify_signed_checkpoint` as ``(checkpoint, note)``; :class:`AuditFailure` otherwise."""
    signed = verify_signed_checkpoint(source, verifier_keys, origin)
    return signed.checkpoint, signed.note


def _trusted(note: str, keys: list[str], origin: str | None) -> Checkpoint:
    try:
        return verify_note(note, keys, origin)[0]
    except AuditFailure as exc:
        raise AuditFailure(f"the trusted checkpoint does not verify with these keys: {exc.reason}") from None


def _unverified_checkpoint(note: str) -> Checkpoint:
    """The checkpoint body *without* its signature: only to know how far to read before verifying."""
    split = note.rfind("\n\n") if isinstance(note, str) else -1
    try:
        if split < 0:
            raise VerificationError("not a signed note")
        return _parse_checkpoint_body(note[: split + 1])
    except VerificationError as exc:
        raise AuditFailure(f"checkpoint does not verify: {exc}") from None


def _follow_endorsements(keys: list[str], endorsements: list[tuple[int, dict[str, Any]]], origin: str) -> list[str]:
    """``keys`` plus every ledger key endorsed, in ledger order, by a key already accepted."""
    accepted = list(keys)
    for _, key in endorsements:
        for endorser in reversed(accepted):
            try:
                accepted.append(endorsed_key(key["endorsement"], endorser, origin, key["public_jwk"].get("x", "")))
                break
            except VerificationError:
                continue
    return accepted


def verify_ledger(
    source: LedgerSource,
    verifier_key: VerifierKeys,
    *,
    origin: str | None = None,
    trusted_note: str | None = None,
    trusted_leaf_hashes: bytes | None = None,
    progress: Progress | None = None,
    jobs: int = 1,
    parallel_threshold: int = 50_000,
    on_entry: Callable[[int, bytes, dict[str, Any]], None] | None = None,
) -> VerifiedLedger:
    """Verify every entry of ``source`` against its latest checkpoint; raise :class:`AuditFailure` otherwise.

    ``verifier_key`` (``<name>+<keyid>+<base64>``, or several) must come from the auditor, never
    from the source. A checkpoint signed by a later ledger key is accepted when the tree holds a
    ``key_rotation`` entry endorsing that key by a trusted one (docs/ledger.md §5.3).
    ``trusted_note`` is an earlier checkpoint the auditor verified before: the ledger must still
    contain exactly the entries it committed to; with ``trusted_leaf_hashes`` (the leaf hashes of
    that checkpoint's tree, saved by an earlier full verification) a rewrite is located exactly
    even when the source can no longer give honest proofs. With ``jobs > 1``, ledgers of at least
    ``parallel_threshold`` entries are decoded and validated on that many processes.

    ``on_entry(index, leaf hash, entry)`` is called with each valid entry, in index order, while
    the ledger is read (one pass instead of two for replays and reports). It sees entries before
    the verdict: a caller may use what it gathered only if this function returns.
    """
    keys = _keys(verifier_key)
    # (1) the signed checkpoint, with the key given out of band; after a key rotation the
    # signature is checked once the endorsement is found in the entries (step 4).
    note = source.checkpoint()
    signature_failure: AuditFailure | None = None
    try:
        checkpoint, signed_by = verify_note(note, keys, origin)
    except AuditFailure as exc:
        signature_failure = exc
        checkpoint, signed_by = _unverified_checkpoint(note), ""
    size = checkpoint.size
    # (2) an append-only log never shrinks below what an auditor saw before.
    trusted = _trusted(trusted_note, keys, origin or checkpoint.origin) if trusted_note else None
    saved = _saved_hashes(trusted, trusted_leaf_hashes)
    if trusted is not None and trusted.size > size and signature_failure is None and saved is None:
        raise rollback_violation(size, trusted.size, trusted_note or "", note, located=False, first_diff=None)
    # (3) every entry: bytes, leaf hash, canonical form, schema (in batches, on ``jobs`` processes).
    tree = MerkleTree()
    summary = LedgerSummary()
    endorsements: list[tuple[int, dict[str, Any]]] = []
    first_error: AuditFailure | None = None
    unique = _UniqueLeaves()
    expected = 0

    def merge(result: _BatchResult) -> None:
        nonlocal first_error
        duplicate = unique.add(tree, result.hashes)
        if duplicate is not None and (first_error is None or (first_error.index or 0) > duplicate[0]):
            first_error = AuditFailure(f"the same leaf as entry {duplicate[1]} (leaf hashes are unique in this log)",
                                       index=duplicate[0])
        first_index = tree.size
        tree.extend(result.hashes[i : i + HASH_SIZE] for i in range(0, len(result.hashes), HASH_SIZE))
        if on_entry is not None and result.entries is not None:
            for offset, entry in enumerate(result.entries):
                on_entry(first_index + offset, result.hashes[offset * HASH_SIZE : (offset + 1) * HASH_SIZE], entry)
        summary.merge(result.summary)
        endorsements.extend(result.endorsements)
        if first_error is None and result.error is not None:
            first_error = AuditFailure(result.error[1], index=result.error[0])
        if progress is not None:
            progress(tree.size, size)

    pool = _pool(jobs) if jobs > 1 and size >= parallel_threshold else None
    try:
        pending: deque[Future[_BatchResult]] = deque()
        leaves: list[bytes] = []
        recorded: list[bytes | None] = []

        def flush() -> None:
            if not leaves:
                return
            first = expected - len(leaves)
            if pool is None:
                merge(_check_batch(first, leaves.copy(), recorded.copy(), on_entry is not None))
            else:
                pending.append(pool.submit(_check_batch, first, leaves.copy(), recorded.copy(), on_entry is not None))
                while len(pending) > 2 * jobs:  # bounded memory: a few batches in flight
                    merge(pending.popleft().result())
            leaves.clear()
            recorded.clear()

        short: AuditFailure | None = None
        try:
            for raw in source.entries(0, size):
                if raw.index != expected:
                    raise AuditFailure(f"the source returned entry {raw.index} out of order", index=expected)
                leaves.append(raw.leaf)
                recorded.append(raw.recorded_leaf_hash)
                expected += 1
                if len(leaves) >= _BATCH:
                    flush()
        except AuditFailure as exc:
            if saved is None:
                raise
            short = exc  # a removed row: the saved leaf hashes may name it (below)
        flush()
        while pending:
            merge(pending.popleft().result())
        if short is not None:
            assert trusted is not None and trusted_note is not None and saved is not None
            # (2, with saved hashes) a row removed and the rest renumbered: the first entry that
            # is not the one verified before comes before where the source ran out.
            _compare_saved(tree, tree.size, trusted, trusted_note, saved, note, None, before=short.index)
            raise short
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if expected != size:
        raise AuditFailure(f"the source ended after {expected} of {size} entries", index=expected)
    if signature_failure is not None:
        # (1, deferred) a checkpoint signed by a rotated key: only an endorsed key may have signed it.
        accepted = _follow_endorsements(keys, endorsements, checkpoint.origin)
        try:
            checkpoint, signed_by = verify_note(note, accepted[len(keys) :], origin)
        except AuditFailure:
            raise signature_failure from None
        if trusted is not None and trusted.size > size and saved is None:
            raise rollback_violation(size, trusted.size, trusted_note or "", note, located=False, first_diff=None)
    if trusted is not None and saved is not None:
        # (2, with saved hashes) the exact first entry that is not the one verified before.
        assert trusted_note is not None
        _compare_saved(tree, size, trusted, trusted_note, saved, note, first_error)
    # (4) the recomputed roots.
    root_ok = hmac.compare_digest(tree.root(size), checkpoint.root)
    trusted_ok = trusted is None or hmac.compare_digest(tree.root(trusted.size), trusted.root)
    if root_ok and trusted_ok:
        if first_error is not None:
            raise first_error
        return VerifiedLedger(checkpoint=checkpoint, note=note, summary=summary, tree=tree, signed_by=signed_by)
    # (5) name the first entry that differs from what a signed checkpoint commits to.
    reference, reference_note = checkpoint, note
    if not trusted_ok:
        assert trusted is not None and trusted_note is not None
        reference, reference_note = trusted, trusted_note
    mismatch = _locate_divergence(source, tree, reference)
    if first_error is not None and (not mismatch.exact or (first_error.index or 0) <= (mismatch.index or 0)):
        # A located entry error beats a mere lower bound, and an earlier one beats a later mismatch.
        raise first_error
    if not trusted_ok and root_ok:
        # The source signed a new history that does not extend the trusted one: a fork.
        raise ConsistencyViolation("fork", mismatch.reason, previous=reference_note, latest=note, index=mismatch.index)
    raise mismatch


def extend_verified(
    source: LedgerSource, previous: VerifiedLedger, verifier_key: VerifierKeys, *, origin: str | None = None
) -> VerifiedLedger:
    """Verify what ``source`` appended since ``previous`` (an earlier :func:`verify_ledger` result).

    Checks the latest checkpoint's signature, then only the new entries (bytes, leaf hash, canonical
    form, schema), extends ``previous.tree`` with their leaf hashes and requires the recomputed root to
    be the signed one — so the old entries are covered by the signed root too. O(new entries).
    Raises :class:`AuditFailure` on any problem, including a shrunk log or a new ledger key (verify
    in full then: :func:`verify_ledger` follows endorsements and names the exact bad entry). On
    failure ``previous.tree`` may hold unverified leaf hashes: discard ``previous``.
    """
    keys = _keys(verifier_key)
    if previous.signed_by and previous.signed_by not in keys:
        keys.append(previous.signed_by)  # a rotated key the full verification already followed
    note = source.checkpoint()
    checkpoint, signed_by = verify_note(note, keys, origin or previous.checkpoint.origin)
    old, size = previous.checkpoint.size, checkpoint.size
    if size < old:
        raise AuditFailure(f"the log has {size} entries but a verified checkpoint covered {old}", index=size)
    tree = previous.tree
    if tree.size != old:
        raise AuditFailure("the verified tree does not match its checkpoint; verify in full")
    summary = LedgerSummary()
    summary.merge(previous.summary)
    leaves: list[bytes] = []
    recorded: list[bytes | None] = []
    expected = old
    for raw in source.entries(old, size) if size > old else ():
        if raw.index != expected:
            raise AuditFailure(f"the source returned entry {raw.index} out of order", index=expected)
        leaves.append(raw.leaf)
        recorded.append(raw.recorded_leaf_hash)
        expected += 1
    if expected != size:
        raise AuditFailure(f"the source ended after {expected} of {size} entries", index=expected)
    result = _check_batch(old, leaves, recorded)
    if result.error is not None:
        raise AuditFailure(result.error[1], index=result.error[0])
    if result.endorsements:
        raise AuditFailure("the new entries rotate the ledger key; verify in full", index=result.endorsements[0][0])
    tree.extend(result.hashes[i : i + HASH_SIZE] for i in range(0, len(result.hashes), HASH_SIZE))
    if not hmac.compare_digest(tree.root(size), checkpoint.root):
        raise AuditFailure("the recomputed root differs from the signed checkpoint; verify in full", index=old)
    summary.merge(result.summary)
    return VerifiedLedger(checkpoint=checkpoint, note=note, summary=summary, tree=tree, signed_by=signed_by)


def verified_entries(source: LedgerSource, verified: VerifiedLedger) -> Iterator[tuple[int, bytes, dict[str, Any]]]:
    """The source's entries again, ``(index, leaf hash, entry)``, each accepted only if it is the
    leaf the verified tree holds (a source that changes after verification fails at that index)."""
    tree = verified.tree
    for raw in source.entries(0, verified.checkpoint.size):
        digest = leaf_hash(raw.leaf)
        if not hmac.compare_digest(digest, tree.leaf_hash(raw.index)):
            raise AuditFailure("the source changed the entry after it was verified", index=raw.index)
        try:
            yield raw.index, digest, decode_leaf(raw.leaf)
        except VerificationError as exc:  # cannot happen for a verified leaf; never silently skip
            raise AuditFailure(f"leaf is not canonical JSON: {exc}", index=raw.index) from None


def _saved_hashes(trusted: Checkpoint | None, hashes: bytes | None) -> bytes | None:
    """Saved leaf hashes, accepted only if they rebuild the trusted (signed) root."""
    if trusted is None or hashes is None:
        return None
    if (
        len(hashes) != trusted.size * HASH_SIZE
        or MerkleTree(hashes[i : i + HASH_SIZE] for i in range(0, len(hashes), HASH_SIZE)).root() != trusted.root
    ):
        raise AuditFailure("the saved leaf hashes do not match the trusted checkpoint (damaged monitor state)")
    return hashes


class _UniqueLeaves:
    """Leaf hashes seen so far, to find an entry logged twice (docs/ledger.md: leaf hashes are unique).

    Keyed by the hash's first 8 bytes (an int, a fraction of the memory of the hash); a prefix
    shared by two leaves, which an attacker can arrange with 2**32 work, falls back to comparing
    full hashes, so a crafted prefix collision cannot hide a duplicate.
    """

    def __init__(self) -> None:
        self._by_prefix: dict[int, int] = {}
        self._full: dict[bytes, int] = {}

    def add(self, tree: MerkleTree, hashes: bytes) -> tuple[int, int] | None:
        """Check a batch that follows ``tree``'s leaves; ``(index, earlier index)`` of its first repeated leaf."""
        first = tree.size
        found: tuple[int, int] | None = None

        def hash_of(index: int) -> bytes:
            if index >= first:
                return hashes[(index - first) * HASH_SIZE : (index - first + 1) * HASH_SIZE]
            return tree.leaf_hash(index)

        for offset, (prefix,) in enumerate(struct.iter_unpack(">Q24x", hashes)):
            index = first + offset
            earlier = self._by_prefix.setdefault(prefix, index)
            if earlier == index:
                continue
            self._full.setdefault(hash_of(earlier), earlier)
            same = self._full.setdefault(hash_of(index), index)
            if same != index and found is None:
                found = (index, same)
        return found


def rollback_violation(
    size: int, trusted_size: int, trusted_note: str, note: str, *, located: bool, first_diff: int | None
) -> ConsistencyViolation:
    """The one rollback report of ``audit verify`` and ``audit consistency`` (same index, same words).

    ``located``: leaf hashes saved at the trusted checkpoint were compared, and ``first_diff`` is
    the first entry below ``size`` that differs (``None``: none did, so entry ``size`` is the first
    one gone). Without them, entry ``size`` is the first one known to be gone.
    """
    if located:
        return ConsistencyViolation(
            "rollback",
            f"the log has {size} entries but a trusted checkpoint covered {trusted_size}; "
            "entries from here on are gone or changed",
            previous=trusted_note, latest=note, index=size if first_diff is None else first_diff, exact=True,
        )
    return ConsistencyViolation(
        "rollback",
        f"the log has {size} entries but a trusted checkpoint covered {trusted_size}; entries from here on "
        "are gone, and earlier ones may have changed too (leaf hashes saved by `audit verify --state` locate that)",
        previous=trusted_note, latest=note, index=size, exact=True,
    )


def _compare_saved(
    tree: MerkleTree,
    size: int,
    trusted: Checkpoint,
    trusted_note: str,
    saved: bytes,
    note: str,
    first_error: AuditFailure | None,
    *,
    before: int | None = None,
) -> None:
    """Raise a located rollback or fork if the log no longer holds the entries verified before.

    ``before``: the source ran out at this index; only a difference before it is raised here.
    """
    limit = min(trusted.size, size)
    first_diff: int | None = None
    step = 65_536
    for start in range(0, limit, step):
        end = min(limit, start + step)
        if tree.nodes(0, start, end) != saved[start * HASH_SIZE : end * HASH_SIZE]:
            first_diff = next(
                i for i in range(start, end) if tree.leaf_hash(i) != saved[i * HASH_SIZE : (i + 1) * HASH_SIZE]
            )
            break
    if before is not None:
        if first_diff is not None and first_diff < before:
            raise ConsistencyViolation(
                "fork",
                f"entry differs from the one verified at the trusted checkpoint of {trusted.size} entries "
                "(a row removed or replaced, the rest moved up)",
                previous=trusted_note, latest=note, index=first_diff, exact=True,
            )
        return
    if first_error is not None and first_diff is not None and (first_error.index or 0) < first_diff:
        raise first_error
    if trusted.size > size:
        raise rollback_violation(size, trusted.size, trusted_note, note, located=True, first_diff=first_diff)
    if first_diff is not None:
        raise ConsistencyViolation(
            "fork",
            f"entry differs from the one verified at the trusted checkpoint of {trusted.size} entries",
            previous=trusted_note,
            latest=note,
            index=first_diff,
            exact=True,
        )


def _locate_divergence(source: LedgerSource, tree: MerkleTree, reference: Checkpoint) -> AuditFailure:
    """The first index whose entry differs from the tree ``reference`` signs, found in O(log n) proofs.

    ``P(m)``: the first ``m`` recomputed leaves extend to ``reference`` by a consistency proof. It
    holds for ``m = 0`` and fails for ``m = size``; no proof can make it hold for an altered prefix
    (that would need a SHA-256 collision), so the largest ``m`` where it holds is the first altered
    entry. A source that cannot or will not give proofs only lowers the bound we can state.
    """
    size = reference.size
    reason = "entry differs from the one the signed checkpoint commits to"

    unavailable: list[str] = []

    def holds(m: int) -> bool:
        try:
            proof = source.consistency_proof(m, size)
        except SourceUnavailable as exc:
            unavailable.append(str(exc))
            return False
        try:
            verify_consistency(m, size, tree.root(m), reference.root, proof)
        except VerificationError:
            return False
        return True

    lo, hi = 0, size  # holds(lo) is true (the empty prefix), holds(hi) is false (root mismatch)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if holds(mid):
            lo = mid
        else:
            hi = mid
    if unavailable:
        # Without proofs we only know that every entry before ``lo`` is right.
        return AuditFailure(
            f"{reason} (the source gives no consistency proofs to locate it)", index=lo, exact=size == 1
        )
    if lo == 0 and size > 1:
        # No prefix verified: entry 0 changed, or the source's proofs are themselves wrong.
        return AuditFailure(f"{reason}; no prefix of the log verifies", index=0, exact=False)
    return AuditFailure(f"{reason}; every entry before it verifies", index=lo)
