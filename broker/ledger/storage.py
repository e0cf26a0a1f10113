"""The ledger's storage interface: an append-only, durable array of leaves.

The embedded default is :class:`broker.ledger.sqlite.SqliteLedgerStorage`; a PostgreSQL
implementation for many replicas implements the same Protocol. Storage knows nothing of trees or
signatures: it assigns indexes, keeps bytes and their leaf hashes, and says when it cannot.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from broker.errors import LedgerUnavailable

__all__ = ["DuplicateLeaf", "LedgerCorrupt", "LedgerStorage", "MissingEntry", "TileRootStorage"]


class DuplicateLeaf(LedgerUnavailable):
    """A batch held a leaf whose hash is already stored (or twice); nothing was written.

    A leaf hash names exactly one index, so auditors can look entries up by hash. The ledger
    resolves this by answering the existing index for the identical entry.
    """


class LedgerCorrupt(LedgerUnavailable):
    """Storage no longer holds what the log acknowledged or published (corrupt, torn or cut short).

    Raised when a ledger is opened, instead of serving or signing: the broker never truncates or
    repairs the ledger itself, because an operator (and the auditors) must see the evidence as it
    is. ``kind`` is ``"rollback"`` (fewer entries than a published checkpoint covered), ``"fork"``
    (the entries no longer hash to a published root: signing now would publish a second history)
    or ``"corrupt"`` (a row is missing or does not match its leaf hash). ``index`` is the first bad
    index, or, for a fork, the index from which on the first altered entry lies.
    """

    def __init__(self, description: str, *, kind: str = "corrupt", index: int | None = None) -> None:
        super().__init__(description)
        self.kind = kind
        self.index = index


class MissingEntry(LedgerUnavailable):
    """Storage has no row at ``index`` although later rows exist (a deleted row)."""

    def __init__(self, index: int) -> None:
        super().__init__(f"ledger storage is missing entry {index}")
        self.index = index


class LedgerStorage(Protocol):
    """Durable, append-only leaves. Every method raises :class:`LedgerUnavailable` on failure."""

    def append_batch(self, leaves: list[bytes]) -> int:
        """Store ``leaves`` at consecutive indexes in one durable transaction; the first index.

        Several writers (threads or processes) may call it at once: indexes are decided inside
        the write transaction. Raises :class:`DuplicateLeaf` if a leaf hash is already present.
        """
        ...

    def size(self) -> int:
        """Number of durable leaves."""
        ...

    def leaf_hashes(self, start: int, end: int) -> list[bytes]:
        """Leaf hashes of indexes ``[start, end)``, all of them or an error.

        A row missing inside the range raises :class:`MissingEntry` naming the first missing index.
        """
        ...

    def entries(self, start: int, end: int) -> list[bytes]:
        """Leaves of indexes ``[start, end)``, all of them or an error (:class:`MissingEntry` for a gap)."""
        ...

    def index_of(self, leaf_hash: bytes) -> int | None:
        """The index of the leaf with this hash, if stored."""
        ...

    def record_checkpoint(self, size: int, root: bytes, note: str) -> None:
        """Durably remember a checkpoint before it is published (idempotent per size)."""
        ...

    def published_checkpoints(self, limit: int) -> list[tuple[int, bytes]]:
        """``(size, root)`` of the ``limit`` largest checkpoints recorded, largest first."""
        ...

    def record_cosignatures(self, size: int, lines: dict[str, str]) -> None:
        """Durably keep verified witness cosignature lines (by witness name) for a recorded checkpoint."""
        ...

    def cosignatures(self, size: int | None) -> tuple[str, list[str]] | None:
        """``(note, cosignature lines)`` of checkpoint ``size`` (``None``: the largest cosigned one)."""
        ...

    def close(self) -> None:
        """Release connections; later calls raise :class:`LedgerUnavailable`."""
        ...


@runtime_checkable
class TileRootStorage(Protocol):
    """A storage that also keeps interior hashes: the roots of complete tiles (optional).

    With it, a process opens the ledger from the tile roots and the leaf hashes after them instead
    of every leaf hash (:meth:`broker.ledger.Ledger.check_integrity` says what start-up checks);
    without it, the ledger reads every leaf hash on open, as before. Both methods raise
    :class:`LedgerUnavailable` on failure.
    """

    def record_tile_roots(self, start: int, roots: list[bytes]) -> None:
        """Durably keep the roots of complete tiles ``start, start + 1, ...`` (idempotent per tile).

        A tile is 256 consecutive leaves (C2SP tlog-tiles); its root is the level-8 interior
        hash over their leaf hashes. Several processes may record the same tile: the first value
        stays. Interior hashes let a process start without reading every leaf hash.
        """
        ...

    def tile_roots(self, start: int, end: int) -> list[bytes]:
        """Recorded roots of tiles ``[start, end)``, in order, stopping at the first tile not recorded."""
        ...
