"""Cold start from persisted interior hashes (tile roots), and the bounded start-up integrity check.

A process opening a large ledger reads the recorded roots of its complete 256-leaf tiles and the
leaf hashes after them, not every leaf hash; proofs and tiles it serves are the same as from the
whole tree; rows rewritten under an old tile are found by the check or, at the latest, by the
first proof that needs that tile (never a wrong proof).
"""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.clock import FixedClock
from broker.ledger import Ledger, NoteSigner, SqliteLedgerStorage
from broker.ledger.merkle import MerkleTree, leaf_hash
from broker.ledger.storage import LedgerCorrupt

ORIGIN = "cold.example/ledger"
SIGNER = NoteSigner(ORIGIN, Ed25519PrivateKey.from_private_bytes(b"\x07" * 32))
N = 256 * 12 + 37  # twelve complete tiles and a partial one


class CountingStorage(SqliteLedgerStorage):
    """The real SQLite storage, counting the leaf hashes read (how much of the tree a start loads)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.hashes_read = 0

    def leaf_hashes(self, start: int, end: int) -> list[bytes]:
        self.hashes_read += end - start
        return super().leaf_hashes(start, end)


def _open(path: Path, **kwargs) -> Ledger:  # type: ignore[no-untyped-def]
    return Ledger(kwargs.pop("storage", None) or SqliteLedgerStorage(path), SIGNER, ORIGIN,
                  FixedClock(1_800_000_000), **kwargs)


@pytest.fixture
def written(tmp_path: Path) -> tuple[Path, list[bytes]]:
    path = tmp_path / "ledger.sqlite3"
    with _open(path) as ledger:
        for start in range(0, N, 500):
            for i in range(start, min(N, start + 500)):
                ledger.append({"v": 1, "kind": "issuance", "request_id": f"r{i}"})
        ledger.checkpoint()
    conn = sqlite3.connect(path)
    hashes = [bytes(h) for (h,) in conn.execute("SELECT leaf_hash FROM entries ORDER BY idx")]
    tiles = conn.execute("SELECT COUNT(*) FROM tiles").fetchone()[0]
    conn.close()
    assert len(hashes) == N and tiles == 12, "the writer records every tile it completes"
    return path, hashes


def test_cold_start_reads_tile_roots_not_every_leaf_hash(written: tuple[Path, list[bytes]]) -> None:
    path, hashes = written
    storage = CountingStorage(path)
    ledger = _open(path, storage=storage, tail_tiles=2, sample_tiles=1, rng=random.Random(1))
    try:
        # tail (37) + tiles 10, 11 and one sampled tile, each read once for the tree/check, plus
        # the last 1,024 leaves: far below N.
        assert storage.hashes_read <= 37 + 3 * 256 * 2 + 1024, storage.hashes_read
        full = MerkleTree(hashes)
        rng = random.Random(7)
        for _ in range(50):
            size = rng.randint(1, N)
            index = rng.randrange(size)
            assert ledger.inclusion_proof(index, size) == full.inclusion_proof(index, size)
            first = rng.randint(0, size)
            assert ledger.consistency_proof(first, size) == full.consistency_proof(first, size)
        assert ledger.tile("0/003")[0] == full.nodes(0, 3 * 256, 4 * 256)
        assert ledger.tile("1/000.p/12")[0] == full.nodes(8, 0, 12)
        assert ledger.size() == N
    finally:
        ledger.close()


def _rewrite(path: Path, idx: int) -> None:
    leaf = b'{"kind":"issuance","request_id":"forged","v":1}'
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("DROP TRIGGER IF EXISTS entries_no_update")
    conn.execute("UPDATE entries SET leaf = ?, leaf_hash = ? WHERE idx = ?", (leaf, leaf_hash(leaf), idx))
    conn.execute("DELETE FROM checkpoints")  # even with no published checkpoint to contradict
    conn.close()


def test_a_rewrite_under_a_checked_tile_is_refused(written: tuple[Path, list[bytes]]) -> None:
    path, _ = written
    _rewrite(path, 3 * 256 + 17)
    with pytest.raises(LedgerCorrupt) as caught:
        _open(path, tail_tiles=1, sample_tiles=20)  # every older tile sampled
    assert caught.value.index == 3 * 256
    assert "entries 768..1023 no longer hash to their recorded tile root" in caught.value.description


def test_a_rewrite_under_an_unchecked_tile_fails_the_first_proof_that_needs_it(
    written: tuple[Path, list[bytes]]
) -> None:
    path, _ = written
    _rewrite(path, 3 * 256 + 17)
    ledger = _open(path, tail_tiles=1, sample_tiles=0)  # tile 3 not checked at start
    try:
        with pytest.raises(LedgerCorrupt) as caught:
            ledger.inclusion_proof(3 * 256 + 17, N)
        assert caught.value.index == 3 * 256
    finally:
        ledger.close()


def test_a_ledger_without_recorded_tiles_records_them_on_open(written: tuple[Path, list[bytes]]) -> None:
    path, hashes = written
    conn = sqlite3.connect(path)
    conn.execute("DELETE FROM tiles")
    conn.commit()
    conn.close()
    with _open(path) as ledger:
        assert ledger.size() == N
    conn = sqlite3.connect(path)
    roots = [bytes(r) for (r,) in conn.execute("SELECT root FROM tiles ORDER BY idx")]
    conn.close()
    assert b"".join(roots) == MerkleTree(hashes).nodes(8, 0, 12)
