"""C2SP tlog-tiles: paths, hash tiles over a 70,000-leaf tree (the spec's example) and entry bundles."""

from __future__ import annotations

import hashlib
import struct

import pytest

from broker.errors import InvalidRequest, NotFound
from broker.ledger.merkle import MerkleTree, root_from_leaf_hashes
from broker.ledger.tiles import TilePath, entry_bundle, parse_tile_path, tile_hashes, tile_path


@pytest.mark.parametrize(
    ("path", "parsed"),
    [
        ("0/000", TilePath(0, 0, None)),
        ("0/x001/x234/067", TilePath(0, 1234067, None)),
        ("1/017.p/5", TilePath(1, 17, 5)),
        ("entries/x001/000.p/255", TilePath(None, 1000, 255)),
        ("63/999", TilePath(63, 999, None)),
    ],
)
def test_paths_round_trip(path: str, parsed: TilePath) -> None:
    assert parse_tile_path(path) == parsed
    assert tile_path(parsed.level, parsed.index, parsed.width) == path


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("0", "a tile path is"),
        ("64/000", "level is 0..63"),
        ("01/000", "level is 0..63"),
        ("0/0", "3-digit path elements"),
        ("0/001/002", "3-digit path elements"),
        ("0/x001", "3-digit path elements"),
        ("0/x000/001", "no leading zero"),
        ("0/000.p/0", "width is 1..255"),
        ("0/000.p/256", "width is 1..255"),
        ("0/000.p/007", "width is 1..255"),
        ("0/../000", "3-digit path elements"),
        ("blobs/000", "level is 0..63"),
    ],
)
def test_bad_paths(path: str, expected: str) -> None:
    with pytest.raises(InvalidRequest, match=expected):
        parse_tile_path(path)


def test_tiles_of_the_spec_example_tree() -> None:
    size = 70_000
    leaves = [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(size)]
    tree = MerkleTree(leaves)
    # 273 full level-0 tiles and a partial one of width 112.
    assert tile_hashes(tree, size, TilePath(0, 272, None)) == b"".join(leaves[272 * 256 : 273 * 256])
    assert tile_hashes(tree, size, TilePath(0, 273, 112)) == b"".join(leaves[273 * 256 :])
    with pytest.raises(NotFound):
        tile_hashes(tree, size, TilePath(0, 273, None))
    with pytest.raises(NotFound):
        tile_hashes(tree, size, TilePath(0, 273, 113))
    # Each level-1 hash is the root of a full level-0 tile.
    level1 = tile_hashes(tree, size, TilePath(1, 0, None))
    assert level1[32:64] == root_from_leaf_hashes(leaves[256:512])
    assert len(tile_hashes(tree, size, TilePath(1, 1, 17))) == 17 * 32
    # The level-2 partial tile of width 1 is MTH(D[0:65536]).
    assert tile_hashes(tree, size, TilePath(2, 0, 1)) == tree.root(65536)
    with pytest.raises(NotFound):
        tile_hashes(tree, size, TilePath(2, 0, 2))


def test_entry_bundle_format() -> None:
    assert entry_bundle([b"ab", b""]) == struct.pack(">H", 2) + b"ab" + struct.pack(">H", 0)
    with pytest.raises(InvalidRequest, match="too large"):
        entry_bundle([b"x" * 65536])
