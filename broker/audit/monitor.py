"""``audit consistency``: append-only monitoring with a local state file.

The state file holds the last checkpoint this monitor verified (the signed note, verbatim). Each
run (1) verifies the source's latest checkpoint with the auditor's key, (2) re-verifies the stored
one with the same key, (3) checks that the new tree extends the old one — a smaller tree is a
rollback, the same size with another root or a consistency proof that fails is a fork — and only
then (4) replaces the state, atomically. A violation leaves the state untouched and carries both
signed notes: two statements by the log's key that no append-only log can both have made.
"""

from __future__ import annotations

import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path

from broker.audit.errors import AuditFailure, ConsistencyViolation
from broker.audit.source import LedgerSource
from broker.audit.verify import VerifierKeys, rollback_violation, verify_note, verify_signed_checkpoint
from broker.errors import VerificationError
from broker.ledger.checkpoint import Checkpoint
from broker.ledger.merkle import HASH_SIZE, leaf_hash, root_from_leaf_hashes, verify_consistency

__all__ = ["ConsistentCheckpoint", "check_consistency", "load_state", "load_state_hashes", "save_state"]

_STATE_FORMAT = "nhi-broker-monitor-state"


@dataclass(frozen=True)
class ConsistentCheckpoint:
    """A checkpoint verified as extending the previously verified one. Built by :func:`check_consistency`."""

    checkpoint: Checkpoint
    note: str
    previous: Checkpoint | None
    signed_by: str = ""


def load_state(path: Path) -> str | None:
    """The checkpoint note stored at ``path`` (``None`` when there is no state yet); unverified."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise AuditFailure(f"cannot read monitor state {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != _STATE_FORMAT or not isinstance(data.get("checkpoint"), str):
        raise AuditFailure(f"{path} is not a monitor state file")
    return str(data["checkpoint"])


def _hashes_path(path: Path) -> Path:
    return path.with_name(path.name + ".leaves")


def load_state_hashes(path: Path) -> bytes | None:
    """The leaf hashes saved with the state (``None`` if none); unverified until checked against its root."""
    try:
        return _hashes_path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuditFailure(f"cannot read monitor state {_hashes_path(path)}: {exc.strerror}") from None


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_state(path: Path, note: str, leaf_hashes: bytes | None = None) -> None:
    """Store ``note`` as the last verified checkpoint (temp file, fsync, rename).

    ``leaf_hashes`` (32 bytes per entry of that checkpoint, from a full verification) let a later
    verification name the exact entry a rewrite changed; without them any stale copy is removed.
    """
    if leaf_hashes is not None:
        _write(_hashes_path(path), leaf_hashes)
    else:
        _hashes_path(path).unlink(missing_ok=True)
    _write(path, json.dumps({"format": _STATE_FORMAT, "checkpoint": note}).encode())


def check_consistency(source: LedgerSource, verifier_key: VerifierKeys, state: Path, *, origin: str | None = None,
                      update: bool = True) -> ConsistentCheckpoint:
    """Verify that the source's latest checkpoint extends the one in ``state``; then store it.

    Raises :class:`ConsistencyViolation` (rollback, fork, origin) with both notes, or
    :class:`AuditFailure` when a checkpoint does not verify. A ledger key rotation is followed as
    :func:`~broker.audit.verify.verify_ledger` follows it. When the state carries leaf hashes
    (saved by ``audit verify --state``), a violation names the first entry that is gone or
    changed, exactly as ``audit verify --state`` does, and the hashes are kept up to date.
    """
    # (1) the latest signed checkpoint (through the ledger's own key endorsements if rotated).
    signed = verify_signed_checkpoint(source, verifier_key, origin)
    latest, note = signed.checkpoint, signed.note
    # (2) the previous one, re-verified: a state file is only as good as its signature.
    previous_note = load_state(state)
    previous: Checkpoint | None = None
    hashes: bytes | None = None
    if previous_note is not None:
        try:
            previous = verify_note(previous_note, list(signed.keys), None)[0]
        except AuditFailure as exc:
            raise AuditFailure(
                f"the stored checkpoint in {state} does not verify with these keys: {exc.reason}"
            ) from None
        saved = load_state_hashes(state)
        hashes = _checked_hashes(saved, previous) if saved is not None else None
        # (3) append-only.
        if previous.origin != latest.origin:
            raise ConsistencyViolation("origin", f"the log now calls itself {latest.origin!r}, "
                                       f"not {previous.origin!r}", previous=previous_note, latest=note)
        if latest.size < previous.size:
            first_diff = _first_difference(source, hashes, latest.size) if hashes is not None else None
            raise rollback_violation(latest.size, previous.size, previous_note, note,
                                     located=hashes is not None, first_diff=first_diff)
        forked = False
        if latest.size == previous.size:
            forked = not hmac.compare_digest(latest.root, previous.root)
            reason = f"two different roots signed for tree size {latest.size}"
        else:
            try:
                proof = source.consistency_proof(previous.size, latest.size)
                verify_consistency(previous.size, latest.size, previous.root, latest.root, proof)
            except VerificationError as exc:
                forked = True
                reason = f"the tree of {latest.size} does not extend the tree of {previous.size}: {exc}"
        if forked:
            index = _first_difference(source, hashes, previous.size) if hashes is not None else None
            raise ConsistencyViolation("fork", reason, previous=previous_note, latest=note, index=index,
                                       exact=index is not None)
        if hashes is not None and latest.size > previous.size:
            hashes = _extended(source, hashes, previous.size, latest)
    # (4) remember it (with the leaf hashes, when this state keeps them).
    if update:
        save_state(state, note, hashes if previous_note is not None else None)
    return ConsistentCheckpoint(checkpoint=latest, note=note, previous=previous, signed_by=signed.signed_by)


def _checked_hashes(saved: bytes, previous: Checkpoint) -> bytes:
    if len(saved) != previous.size * HASH_SIZE or root_from_leaf_hashes(
        [saved[i : i + HASH_SIZE] for i in range(0, len(saved), HASH_SIZE)]
    ) != previous.root:
        raise AuditFailure("the saved leaf hashes do not match the trusted checkpoint (damaged monitor state)")
    return saved


def _first_difference(source: LedgerSource, saved: bytes, size: int) -> int | None:
    """The first index below ``min(size, saved)`` whose leaf differs from the saved hash; ``None`` if none."""
    limit = min(size, len(saved) // HASH_SIZE)
    for raw in source.entries(0, limit) if limit else ():
        if leaf_hash(raw.leaf) != saved[raw.index * HASH_SIZE : (raw.index + 1) * HASH_SIZE]:
            return raw.index
    return None


def _extended(source: LedgerSource, saved: bytes, old: int, latest: Checkpoint) -> bytes:
    """The saved hashes plus those of the new entries, which must rebuild the signed root."""
    new = b"".join(leaf_hash(raw.leaf) for raw in source.entries(old, latest.size))
    hashes = saved + new
    if root_from_leaf_hashes([hashes[i : i + HASH_SIZE] for i in range(0, len(hashes), HASH_SIZE)]) != latest.root:
        raise AuditFailure("the new entries do not hash to the signed checkpoint", index=old, exact=False)
    return hashes
