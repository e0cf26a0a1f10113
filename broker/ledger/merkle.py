"""RFC 6962 / RFC 9162 Merkle tree hashing, proofs and their verification.

Hashes follow RFC 9162 §2.1.1 (RFC 6962 §2.1): a leaf hash is ``SHA-256(0x00 || leaf)``, an
interior node ``SHA-256(0x01 || left || right)`` and the empty tree's hash ``SHA-256("")``. The
two prefixes keep a leaf from ever being passed off as an interior node (second preimages).

The verifiers are pure functions that return ``None`` or raise :class:`VerificationError` with the
reason; nothing on a verification path returns a boolean. :class:`MerkleTree` is the log's side:
it keeps every perfect, aligned subtree so that roots and proofs for *any* earlier tree size are
cheap, which is what an auditor asks for when it holds an old checkpoint.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from broker.errors import InvalidRequest, VerificationError

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "TILE_LEVEL",
    "MerkleTree",
    "TileMismatch",
    "leaf_hash",
    "node_hash",
    "root_from_leaf_hashes",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
TILE_LEVEL = 8  # C2SP tlog-tiles: a tile is 2**8 = 256 hashes wide; its root is a level-8 node
_LEAF_PREFIX = b"\x00"  # RFC 9162 §2.1.1: leaf hashes are domain-separated from nodes ...
_NODE_PREFIX = b"\x01"  # ... by a one-byte prefix.
EMPTY_ROOT = hashlib.sha256(b"").digest()  # MTH({}) = SHA-256() (RFC 9162 §2.1.1)


class TileMismatch(ValueError):
    """The leaf hashes of a complete tile no longer hash to the tile root the tree holds for it."""

    def __init__(self, tile: int) -> None:
        super().__init__(f"the leaf hashes of entries {tile << TILE_LEVEL}..{((tile + 1) << TILE_LEVEL) - 1} "
                         "no longer hash to their recorded tile root")
        self.tile = tile


def leaf_hash(data: bytes) -> bytes:
    """``MTH({d}) = SHA-256(0x00 || d)`` (RFC 9162 §2.1.1)."""
    return hashlib.sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)`` (RFC 9162 §2.1.1)."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly less than ``n`` (``n > 1``): RFC 9162 §2.1.1's ``k``."""
    return 1 << ((n - 1).bit_length() - 1)


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """The Merkle Tree Hash of a list of leaf hashes (RFC 9162 §2.1.1), in O(n)."""
    if not hashes:
        return EMPTY_ROOT
    # Reduce level by level; an odd node at the end is promoted unchanged, which is exactly the
    # shape of RFC 6962's left-heavy split (the left subtree is always the larger perfect one).
    level = list(hashes)
    while len(level) > 1:
        paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def _check_hash(value: bytes, what: str) -> None:
    if not isinstance(value, bytes | bytearray) or len(value) != HASH_SIZE:
        raise VerificationError(f"{what} is not a {HASH_SIZE}-byte SHA-256 hash")


def _check_proof(proof: Sequence[bytes]) -> None:
    for i, element in enumerate(proof):
        _check_hash(element, f"proof element {i}")


def verify_inclusion(
    leaf_hash: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check an RFC 9162 §2.1.3.2 inclusion proof of ``leaf_hash`` at ``index`` in a tree.

    Returns ``None`` when the proof shows the leaf in the tree of ``tree_size`` leaves whose
    root is ``root``; raises :class:`VerificationError` otherwise.
    """
    _check_hash(leaf_hash, "leaf hash")
    _check_hash(root, "root hash")
    _check_proof(proof)
    # (1) the index must lie inside the tree.
    if index < 0 or tree_size < 0:
        raise VerificationError("index and tree size must be non-negative")
    if index >= tree_size:
        raise VerificationError(f"leaf index {index} is outside a tree of size {tree_size}")
    # (2)-(4) walk from the leaf to the root; fn is our position, sn the last position at this level.
    fn, sn = index, tree_size - 1
    r = bytes(leaf_hash)
    for p in proof:
        if sn == 0:
            raise VerificationError("inclusion proof is longer than the path to the root")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            # A right-edge node with no sibling at this level is promoted; skip those levels.
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    # (5) all levels consumed, and the result is the root.
    if sn != 0:
        raise VerificationError("inclusion proof is shorter than the path to the root")
    if not hmac.compare_digest(r, root):
        raise VerificationError("inclusion proof does not lead to the expected root")


def verify_consistency(size1: int, size2: int, root1: bytes, root2: bytes, proof: Sequence[bytes]) -> None:
    """Check an RFC 9162 §2.1.4.2 consistency proof between two tree heads.

    Returns ``None`` when the tree of ``size2`` leaves with root ``root2`` extends the tree of
    ``size1`` leaves with root ``root1``; raises :class:`VerificationError` otherwise. By
    convention (RFC 9162 §2.1.4.1 defines proofs only for ``0 < size1 < size2``), the proof for
    ``size1 == 0`` or ``size1 == size2`` is empty: the empty tree (whose root must then be
    :data:`EMPTY_ROOT`) is a prefix of every tree, and a tree is consistent with itself when the
    roots are equal.
    """
    _check_hash(root1, "first root")
    _check_hash(root2, "second root")
    _check_proof(proof)
    if size1 < 0 or size2 < 0:
        raise VerificationError("tree sizes must be non-negative")
    if size1 > size2:
        raise VerificationError(f"tree size {size1} is larger than tree size {size2}: a log never shrinks")
    if size1 == size2:
        if proof:
            raise VerificationError("a proof between equal tree sizes must be empty")
        if not hmac.compare_digest(root1, root2):
            raise VerificationError("roots differ for the same tree size")
        return
    if size1 == 0:
        if proof:
            raise VerificationError("a proof from the empty tree must be empty")
        if not hmac.compare_digest(root1, EMPTY_ROOT):
            raise VerificationError("the root of an empty tree must be SHA-256 of the empty string")
        return
    # (1) 0 < size1 < size2 needs at least one hash.
    if not proof:
        raise VerificationError("consistency proof is empty")
    path = list(proof)
    # (2) when size1 is a power of two, the old root is itself a node of the new tree, and the
    # proof omits it.
    if size1 & (size1 - 1) == 0:
        path.insert(0, bytes(root1))
    # (3)-(4) skip the levels where the old tree's last node is a right child.
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # (5)-(6) rebuild both roots from the same hashes.
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise VerificationError("consistency proof is longer than needed")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    # (7) both roots match and the path reached the top of the new tree.
    if sn != 0:
        raise VerificationError("consistency proof is shorter than needed")
    if not hmac.compare_digest(fr, root1):
        raise VerificationError("consistency proof does not lead to the first root")
    if not hmac.compare_digest(sr, root2):
        raise VerificationError("consistency proof does not lead to the second root")


class MerkleTree:
    """An append-only RFC 6962 tree over leaf hashes, kept in memory.

    Level ``k`` stores, back to back in one ``bytearray``, the hash of every *complete* aligned
    subtree of ``2**k`` leaves: node ``i`` covers leaves ``[i * 2**k, (i + 1) * 2**k)``, so level
    ``k`` always holds ``size >> k`` nodes. Any RFC 6962 subtree hash ``MTH(D[a:b])`` that a root
    or proof needs decomposes into at most ``log2(n)`` of these stored nodes (RFC 9162 §2.1.1
    always splits at the largest power of two), which gives roots in O(log n) and proofs in
    O(log² n) for every earlier size, not just the latest. Memory is about 64 bytes per leaf.

    Not thread-safe: callers serialise :meth:`append`/:meth:`extend` with readers.
    """

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        self._levels: list[bytearray] = [bytearray()]
        self._size = 0
        # Leaves [0, _base) are complete tiles whose levels below TILE_LEVEL are not in memory:
        # _loader(t) returns tile t's 256 leaf hashes when a proof or a tile request needs them.
        self._base = 0
        self._loader: Callable[[int], bytes] | None = None
        self._tile_cache: OrderedDict[int, list[list[bytes]]] = OrderedDict()
        self.extend(leaf_hashes)

    @classmethod
    def from_tile_roots(
        cls, tile_roots: bytes, tail: Iterable[bytes], loader: Callable[[int], bytes]
    ) -> MerkleTree:
        """A tree over complete tiles given by their roots, then the ``tail`` leaf hashes.

        ``tile_roots`` are the hashes of the first ``len // 32`` complete subtrees of
        ``2**TILE_LEVEL`` leaves (persisted interior nodes); ``loader(t)`` returns the leaf hashes of
        tile ``t`` (8,192 bytes) on demand. Start-up costs O(n / 256) hashes and memory, not O(n);
        roots for any size are exact, and the few lower nodes a proof needs are loaded per tile.
        """
        if len(tile_roots) % HASH_SIZE:
            raise ValueError("tile roots are 32-byte hashes")
        tree = cls()
        tiles = len(tile_roots) // HASH_SIZE
        tree._base = tree._size = tiles << TILE_LEVEL
        tree._loader = loader
        tree._levels = [bytearray() for _ in range(TILE_LEVEL)] + [bytearray(tile_roots)]
        tree._complete_levels(tree._size, TILE_LEVEL + 1)
        tree.extend(tail)
        return tree

    @property
    def size(self) -> int:
        """Number of leaves."""
        return self._size

    def __len__(self) -> int:
        return self._size

    def append(self, leaf_hash: bytes) -> int:
        """Add one leaf hash; returns its index. O(log n)."""
        index = self._size
        self.extend((leaf_hash,))
        return index

    def _offset(self, level: int) -> int:
        """Index of the first node kept in memory at ``level`` (below it: complete tiles on disk)."""
        return self._base >> level if level < TILE_LEVEL else 0

    def extend(self, leaf_hashes: Iterable[bytes]) -> None:
        """Add leaf hashes in order, then complete every subtree they finish."""
        batch = list(leaf_hashes)
        # Validate everything before touching the levels, so a bad hash leaves the tree unchanged.
        for h in batch:
            if not isinstance(h, bytes | bytearray) or len(h) != HASH_SIZE:
                raise ValueError(f"a leaf hash is {HASH_SIZE} bytes")
        if not batch:
            return
        self._levels[0] += b"".join(batch)
        size = self._size + len(batch)
        self._complete_levels(size, 1)
        self._size = size

    def _complete_levels(self, size: int, first_level: int) -> None:
        k = first_level
        sha256 = hashlib.sha256
        while size >> k:
            if k == len(self._levels):
                self._levels.append(bytearray())
            below, here = self._levels[k - 1], self._levels[k]
            below_offset, here_offset = self._offset(k - 1), self._offset(k)
            # Children 2i and 2i+1 sit next to each other one level down, so a node's preimage
            # is 0x01 followed by one 64-byte slice.
            view = memoryview(below)
            try:
                for i in range(len(here) // HASH_SIZE + here_offset, size >> k):
                    j = 2 * i - below_offset
                    here += sha256(_NODE_PREFIX + view[j * HASH_SIZE : (j + 2) * HASH_SIZE]).digest()
            finally:
                view.release()  # a live view would pin ``below`` and block its next resize
            k += 1

    def nodes(self, height: int, start: int, end: int) -> bytes:
        """Concatenated hashes of the complete subtrees of ``2**height`` leaves numbered ``[start, end)``."""
        if not 0 <= height < len(self._levels) or not 0 <= start <= end <= self._size >> height:
            raise InvalidRequest("no such complete subtrees in this tree")
        offset = self._offset(height)
        if start >= offset:
            return bytes(self._levels[height][(start - offset) * HASH_SIZE : (end - offset) * HASH_SIZE])
        return b"".join(self._node(height, i) for i in range(start, end))

    def leaf_hash(self, index: int) -> bytes:
        """The stored hash of leaf ``index``."""
        self._check_index(index, self._size)
        return self._node(0, index)

    def root(self, size: int | None = None) -> bytes:
        """``MTH(D[0:size])`` for the current or any earlier size."""
        size = self._size if size is None else self._check_size(size)
        return self._range_hash(0, size)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """RFC 9162 §2.1.3.1 ``PATH(index, D[0:size])``: the audit path of one leaf."""
        size = self._size if size is None else self._check_size(size)
        self._check_index(index, size)
        # Walk down from the root, noting the sibling of each subtree holding the leaf; PATH lists
        # them bottom-up, so reverse at the end.
        siblings: list[bytes] = []
        lo, hi = 0, size
        while hi - lo > 1:
            k = _split(hi - lo)
            if index < lo + k:
                siblings.append(self._range_hash(lo + k, hi))
                hi = lo + k
            else:
                siblings.append(self._range_hash(lo, lo + k))
                lo += k
        siblings.reverse()
        return siblings

    def consistency_proof(self, size1: int, size2: int | None = None) -> list[bytes]:
        """RFC 9162 §2.1.4.1 ``PROOF(size1, D[0:size2])``; empty when ``size1`` is 0 or ``size2``."""
        size2 = self._size if size2 is None else self._check_size(size2)
        if not isinstance(size1, int) or isinstance(size1, bool) or size1 < 0:
            raise InvalidRequest("the first tree size must be a non-negative integer")
        if size1 > size2:
            raise InvalidRequest(f"the first tree size ({size1}) is larger than the second ({size2})")
        if size1 == 0 or size1 == size2:
            return []
        # SUBPROOF(m, D[lo:hi], start) unrolled: each step records the sibling subtree; the step
        # that reaches a subtree equal to the old tree adds that subtree's hash unless it is the
        # old tree itself (start still true).
        hashes: list[bytes] = []
        lo, hi, m, start = 0, size2, size1, True
        while True:
            n = hi - lo
            if m == n:
                if not start:
                    hashes.append(self._range_hash(lo, hi))
                break
            k = _split(n)
            if m <= k:
                hashes.append(self._range_hash(lo + k, hi))
                hi = lo + k
            else:
                hashes.append(self._range_hash(lo, lo + k))
                lo += k
                m -= k
                start = False
        hashes.reverse()
        return hashes

    # -- internals -------------------------------------------------------------------------

    def _node(self, level: int, i: int) -> bytes:
        offset = self._offset(level)
        if i >= offset:
            return bytes(self._levels[level][(i - offset) * HASH_SIZE : (i - offset + 1) * HASH_SIZE])
        return self._tile_levels(i >> (TILE_LEVEL - level))[level][i & ((1 << (TILE_LEVEL - level)) - 1)]

    def _tile_levels(self, tile: int) -> list[list[bytes]]:
        """Levels 0..TILE_LEVEL-1 of a complete tile on disk, each as a list (a few tiles cached)."""
        cached = self._tile_cache.get(tile)
        if cached is not None:
            self._tile_cache.move_to_end(tile)
            return cached
        assert self._loader is not None
        raw = self._loader(tile)
        if len(raw) != HASH_SIZE << TILE_LEVEL:
            raise ValueError(f"tile {tile} does not hold {1 << TILE_LEVEL} leaf hashes")
        levels: list[list[bytes]] = [[raw[i : i + HASH_SIZE] for i in range(0, len(raw), HASH_SIZE)]]
        while len(levels) <= TILE_LEVEL:
            below = levels[-1]
            levels.append([node_hash(below[i], below[i + 1]) for i in range(0, len(below), 2)])
        if levels[TILE_LEVEL][0] != self._node(TILE_LEVEL, tile):
            # The leaf hashes on disk no longer rebuild the tile root this tree was built on.
            raise TileMismatch(tile)
        self._tile_cache[tile] = levels
        if len(self._tile_cache) > 16:
            self._tile_cache.popitem(last=False)
        return levels

    def _range_hash(self, lo: int, hi: int) -> bytes:
        """``MTH(D[lo:hi])`` for a subtree that RFC 6962's splitting produces.

        Such a range starts at a multiple of the largest power of two not above its length, so it
        is a run of stored perfect subtrees of decreasing size; fold them from the right.
        """
        if hi == lo:
            return EMPTY_ROOT
        nodes: list[bytes] = []
        start, remaining = lo, hi - lo
        while remaining:
            level = remaining.bit_length() - 1
            nodes.append(self._node(level, start >> level))
            start += 1 << level
            remaining -= 1 << level
        acc = nodes[-1]
        for node in reversed(nodes[:-1]):
            acc = node_hash(node, acc)
        return acc

    def _check_size(self, size: int) -> int:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidRequest("tree size must be a non-negative integer")
        if size > self._size:
            raise InvalidRequest(f"tree size {size} is larger than the log ({self._size} entries)")
        return size

    @staticmethod
    def _check_index(index: int, size: int) -> None:
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise InvalidRequest("leaf index must be a non-negative integer")
        if index >= size:
            raise InvalidRequest(f"leaf index {index} is not below the tree size {size}")
