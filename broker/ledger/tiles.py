"""The C2SP ``tlog-tiles`` layout of the tree: tile paths, hash tiles and entry bundles.

A tile at level ``L``, index ``N`` holds up to 256 consecutive hashes at tree height ``8 * L``:
hash ``i`` is ``MTH(D[(N*256 + i) * 256**L : (N*256 + i + 1) * 256**L])``, the root of a *complete*
subtree, which is exactly what :class:`~broker.ledger.merkle.MerkleTree` stores at that height. A
partial tile (``.p/<W>``) holds the first ``W`` of them. Entry bundles hold the same ranges of leaves,
each prefixed by its length as a big-endian uint16. Tile indexes are written as 3-digit path
elements, all but the last prefixed with ``x`` (``1234067`` -> ``x001/x234/067``).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from broker.errors import InvalidRequest, NotFound
from broker.ledger.merkle import HASH_SIZE, MerkleTree

__all__ = ["TILE_WIDTH", "TilePath", "entry_bundle", "parse_tile_path", "tile_hashes", "tile_path"]

TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT
_MAX_LEVEL = 63
_ELEMENT = re.compile(r"x?[0-9]{3}")
_WIDTH = re.compile(r"[1-9][0-9]{0,2}")


@dataclass(frozen=True, slots=True)
class TilePath:
    """A parsed tile path: ``level`` is ``None`` for an entry bundle; ``width`` ``None`` for a full tile."""

    level: int | None
    index: int
    width: int | None

    @property
    def count(self) -> int:
        """How many hashes (or entries) the tile holds."""
        return self.width if self.width is not None else TILE_WIDTH


def tile_path(level: int | None, index: int, width: int | None = None) -> str:
    """The path of a tile below ``<prefix>/tile/`` (``entries/...`` when ``level`` is ``None``)."""
    digits = f"{index:03d}"
    digits = "0" * (-len(digits) % 3) + digits
    groups = [digits[i : i + 3] for i in range(0, len(digits), 3)]
    encoded = "/".join([*("x" + g for g in groups[:-1]), groups[-1]])
    suffix = f".p/{width}" if width is not None else ""
    return f"{'entries' if level is None else level}/{encoded}{suffix}"


def parse_tile_path(path: str) -> TilePath:
    """Parse ``<L>/<N>[.p/<W>]`` or ``entries/<N>[.p/<W>]``; :class:`InvalidRequest` unless canonical."""
    parts = path.split("/")
    if len(parts) < 2:
        raise InvalidRequest("a tile path is <level>/<index> or entries/<index>")
    head, elements = parts[0], parts[1:]
    width: int | None = None
    if len(elements) >= 2 and elements[-2].endswith(".p"):
        if not _WIDTH.fullmatch(elements[-1]) or int(elements[-1]) >= TILE_WIDTH:
            raise InvalidRequest("a partial tile width is 1..255 without leading zeros")
        width = int(elements[-1])
        elements = [*elements[:-2], elements[-2][: -len(".p")]]
    if not elements or any(_ELEMENT.fullmatch(e) is None for e in elements):
        raise InvalidRequest("a tile index is 3-digit path elements, all but the last prefixed with 'x'")
    if any(e.startswith("x") for e in elements[-1:]) or any(not e.startswith("x") for e in elements[:-1]):
        raise InvalidRequest("a tile index is 3-digit path elements, all but the last prefixed with 'x'")
    if len(elements) > 1 and elements[0] == "x000":
        raise InvalidRequest("a tile index has no leading zero path elements")
    index = int("".join(e.lstrip("x") for e in elements))
    if head == "entries":
        return TilePath(None, index, width)
    if not re.fullmatch(r"0|[1-9][0-9]?", head) or int(head) > _MAX_LEVEL:
        raise InvalidRequest("a tile level is 0..63 without leading zeros")
    return TilePath(int(head), index, width)


def tile_hashes(tree: MerkleTree, size: int, tile: TilePath) -> bytes:
    """The hash tile ``tile`` of the tree of ``size`` leaves; :class:`NotFound` if that tree lacks it."""
    assert tile.level is not None
    height = TILE_HEIGHT * tile.level
    start = tile.index * TILE_WIDTH
    if start + tile.count > size >> height:
        raise NotFound("this tile is not part of the published tree")
    return tree.nodes(height, start, start + tile.count)


def entry_bundle(leaves: Sequence[bytes]) -> bytes:
    """Leaves as uint16-length-prefixed records (tlog-tiles entry bundle)."""
    out = bytearray()
    for leaf in leaves:
        if len(leaf) > 0xFFFF:
            raise InvalidRequest("an entry is too large for a tlog-tiles entry bundle")
        out += struct.pack(">H", len(leaf)) + leaf
    return bytes(out)


assert HASH_SIZE == 32  # tiles are 8,192 bytes wide: 256 SHA-256 hashes
