"""RFC 6962 Merkle trees: published vectors, a naive reference, every small shape, tampering."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from broker.errors import InvalidRequest, VerificationError
from broker.ledger.merkle import (
    EMPTY_ROOT,
    MerkleTree,
    leaf_hash,
    node_hash,
    root_from_leaf_hashes,
    verify_consistency,
    verify_inclusion,
)

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "rfc6962.json").read_text())
LEAVES = [bytes.fromhex(x) for x in VECTORS["leaves"]]
HASHES = [leaf_hash(x) for x in LEAVES]


# -- a naive reference, written straight from RFC 6962 §2.1 ------------------------------------


def ref_mth(d: list[bytes]) -> bytes:
    """MTH(D[n]) over leaf *hashes* (the leaf step already applied)."""
    n = len(d)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return d[0]
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + ref_mth(d[:k]) + ref_mth(d[k:])).digest()


def ref_path(m: int, d: list[bytes]) -> list[bytes]:
    n = len(d)
    if n <= 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if m < k:
        return [*ref_path(m, d[:k]), ref_mth(d[k:])]
    return [*ref_path(m - k, d[k:]), ref_mth(d[:k])]


def ref_subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [ref_mth(d)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return [*ref_subproof(m, d[:k], b), ref_mth(d[k:])]
    return [*ref_subproof(m - k, d[k:], False), ref_mth(d[:k])]


def ref_proof(m: int, d: list[bytes]) -> list[bytes]:
    return ref_subproof(m, d, True)


def tree(n: int) -> tuple[MerkleTree, list[bytes]]:
    hashes = [leaf_hash(i.to_bytes(4, "big")) for i in range(n)]
    return MerkleTree(hashes), hashes


# -- published vectors ---------------------------------------------------------------------------


def test_hash_prefixes():
    assert leaf_hash(b"") == hashlib.sha256(b"\x00").digest()
    assert node_hash(b"a" * 32, b"b" * 32) == hashlib.sha256(b"\x01" + b"a" * 32 + b"b" * 32).digest()
    assert EMPTY_ROOT.hex() == VECTORS["empty_root"]
    assert MerkleTree().root() == EMPTY_ROOT == root_from_leaf_hashes([])


@pytest.mark.parametrize("size", range(1, 9))
def test_vector_roots(size):
    expected = VECTORS["roots"][size - 1]
    assert MerkleTree(HASHES[:size]).root().hex() == expected
    assert MerkleTree(HASHES).root(size).hex() == expected  # an earlier size of a bigger tree
    assert root_from_leaf_hashes(HASHES[:size]).hex() == expected
    assert ref_mth(HASHES[:size]).hex() == expected


@pytest.mark.parametrize("case", VECTORS["inclusion"], ids=lambda c: f"{c['leaf_index']}@{c['tree_size']}")
def test_vector_inclusion(case):
    index, size = case["leaf_index"], case["tree_size"]
    proof = MerkleTree(HASHES).inclusion_proof(index, size)
    assert [p.hex() for p in proof] == case["proof"]
    verify_inclusion(HASHES[index], index, size, proof, bytes.fromhex(VECTORS["roots"][size - 1]))


@pytest.mark.parametrize("case", VECTORS["consistency"], ids=lambda c: f"{c['size1']}-{c['size2']}")
def test_vector_consistency(case):
    size1, size2 = case["size1"], case["size2"]
    proof = MerkleTree(HASHES).consistency_proof(size1, size2)
    assert [p.hex() for p in proof] == case["proof"]
    roots = VECTORS["roots"]
    verify_consistency(size1, size2, bytes.fromhex(roots[size1 - 1]), bytes.fromhex(roots[size2 - 1]), proof)


# -- every small shape against the reference ------------------------------------------------------


def test_all_inclusion_proofs_up_to_16():
    full, hashes = tree(16)
    for size in range(1, 17):
        root = ref_mth(hashes[:size])
        assert full.root(size) == root
        for index in range(size):
            proof = full.inclusion_proof(index, size)
            assert proof == ref_path(index, hashes[:size]), (index, size)
            verify_inclusion(hashes[index], index, size, proof, root)


def test_all_consistency_proofs_up_to_16():
    full, hashes = tree(16)
    for size2 in range(0, 17):
        for size1 in range(0, size2 + 1):
            proof = full.consistency_proof(size1, size2)
            expected = [] if size1 in (0, size2) else ref_proof(size1, hashes[:size2])
            assert proof == expected, (size1, size2)
            verify_consistency(size1, size2, ref_mth(hashes[:size1]), ref_mth(hashes[:size2]), proof)


def test_incremental_append_matches_bulk_build():
    hashes = [leaf_hash(bytes([i])) for i in range(100)]
    grown = MerkleTree()
    for i, h in enumerate(hashes):
        assert grown.append(h) == i
        assert grown.root() == ref_mth(hashes[: i + 1])
    assert grown.root(37) == MerkleTree(hashes).root(37)


def test_earlier_sizes_of_a_larger_tree():
    rng = random.Random(6962)
    full, hashes = tree(1500)
    for _ in range(60):
        size2 = rng.randint(1, 1500)
        size1 = rng.randint(1, size2)
        index = rng.randrange(size2)
        root2 = full.root(size2)
        assert root2 == root_from_leaf_hashes(hashes[:size2])
        verify_inclusion(hashes[index], index, size2, full.inclusion_proof(index, size2), root2)
        proof = full.consistency_proof(size1, size2)
        verify_consistency(size1, size2, full.root(size1), root2, proof)
        if size1 < size2:
            assert proof == ref_proof(size1, hashes[:size2])


# -- tampering: each probe must fail verification --------------------------------------------------


def _flip(proof: list[bytes], i: int) -> list[bytes]:
    out = list(proof)
    out[i] = bytes([out[i][0] ^ 0x08]) + out[i][1:]
    return out


def inclusion_probes(index, size, proof, root, leaf):
    probes = [
        ("index - 1", (leaf, index - 1, size, proof, root)),
        ("index + 1", (leaf, index + 1, size, proof, root)),
        ("index ^ 2", (leaf, index ^ 2, size, proof, root)),
        ("size * 2", (leaf, index, size * 2, proof, root)),
        ("size / 2", (leaf, index, size // 2, proof, root)),
        ("wrong leaf", (leaf_hash(b"wrong"), index, size, proof, root)),
        ("short leaf", (b"WrongLeaf", index, size, proof, root)),
        ("empty root", (leaf, index, size, proof, EMPTY_ROOT)),
        ("other root", (leaf, index, size, proof, hashlib.sha256(b"x").digest())),
        ("extra element", (leaf, index, size, [*proof, root], root)),
        ("extra garbage", (leaf, index, size, [*proof, b""], root)),
        ("preceding root", (leaf, index, size, [root, *proof], root)),
    ]
    for i in range(len(proof)):
        probes.append((f"flipped bit in proof[{i}]", (leaf, index, size, _flip(proof, i), root)))
    if proof:
        probes.append(("truncated proof", (leaf, index, size, proof[:-1], root)))
    if len(proof) > 1:
        probes.append(("swapped elements", (leaf, index, size, [proof[1], proof[0], *proof[2:]], root)))
    return probes


@pytest.mark.parametrize("index,size", [(0, 8), (5, 8), (2, 3), (1, 5), (6, 7), (4, 5), (0, 2), (12, 13)])
def test_inclusion_tamper(index, size):
    full, hashes = tree(16)
    proof = full.inclusion_proof(index, size)
    root = full.root(size)
    verify_inclusion(hashes[index], index, size, proof, root)
    for desc, args in inclusion_probes(index, size, proof, root, hashes[index]):
        with pytest.raises(VerificationError):
            verify_inclusion(*args)
            pytest.fail(f"accepted: {desc}")


def consistency_probes(size1, size2, root1, root2, proof):
    probes = [
        ("size1 - 1", (size1 - 1, size2, root1, root2, proof)),
        ("size1 + 1", (size1 + 1, size2, root1, root2, proof)),
        ("size1 ^ 2", (size1 ^ 2, size2, root1, root2, proof)),
        ("size2 * 2", (size1, size2 * 2, root1, root2, proof)),
        ("size2 / 2", (size1, size2 // 2, root1, root2, proof)),
        ("wrong root1", (size1, size2, hashlib.sha256(b"1").digest(), root2, proof)),
        ("wrong root2", (size1, size2, root1, hashlib.sha256(b"2").digest(), proof)),
        ("swapped roots", (size1, size2, root2, root1, proof)),
        ("empty proof", (size1, size2, root1, root2, [])),
        ("trailing root1", (size1, size2, root1, root2, [*proof, root1])),
        ("trailing root2", (size1, size2, root1, root2, [*proof, root2])),
        ("trailing garbage", (size1, size2, root1, root2, [*proof, b""])),
        ("preceding root1", (size1, size2, root1, root2, [root1, *proof])),
        ("preceding proof[0]", (size1, size2, root1, root2, [proof[0], *proof])),
        ("truncated proof", (size1, size2, root1, root2, proof[:-1])),
    ]
    for i in range(len(proof)):
        probes.append((f"flipped bit in proof[{i}]", (size1, size2, root1, root2, _flip(proof, i))))
    return probes


@pytest.mark.parametrize("size1,size2", [(1, 8), (6, 8), (2, 5), (6, 7), (3, 7), (4, 16), (5, 13)])
def test_consistency_tamper(size1, size2):
    full, _ = tree(16)
    proof = full.consistency_proof(size1, size2)
    root1, root2 = full.root(size1), full.root(size2)
    verify_consistency(size1, size2, root1, root2, proof)
    for desc, args in consistency_probes(size1, size2, root1, root2, proof):
        with pytest.raises(VerificationError):
            verify_consistency(*args)
            pytest.fail(f"accepted: {desc}")


@pytest.mark.parametrize(
    "size1,size2,root1,root2,proof,reason",
    [
        (0, 0, EMPTY_ROOT, EMPTY_ROOT, [EMPTY_ROOT], "must be empty"),
        (0, 3, b"\x07" * 32, b"\x08" * 32, [], "empty tree"),
        (1, 1, b"\x01" * 32, b"\x02" * 32, [], "roots differ"),
        (2, 1, b"\x01" * 32, b"\x02" * 32, [], "never shrinks"),
        (1, 2, b"\x01" * 32, b"\x02" * 32, [], "empty"),
        (-1, 2, b"\x01" * 32, b"\x02" * 32, [], "non-negative"),
        (1, 2, b"\x01" * 31, b"\x02" * 32, [], "32-byte"),
    ],
)
def test_consistency_edge_cases(size1, size2, root1, root2, proof, reason):
    with pytest.raises(VerificationError, match=reason):
        verify_consistency(size1, size2, root1, root2, proof)


def test_consistency_trivial_cases_accept():
    root = hashlib.sha256(b"r").digest()
    verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    verify_consistency(0, 5, EMPTY_ROOT, root, [])
    verify_consistency(3, 3, root, root, [])


@pytest.mark.parametrize(
    "index,size,reason",
    [
        (0, 0, "outside"),
        (1, 1, "outside"),
        (2, 1, "outside"),
        (-1, 4, "non-negative"),
        (0, -1, "non-negative"),
    ],
)
def test_inclusion_edge_cases(index, size, reason):
    h = leaf_hash(b"x")
    with pytest.raises(VerificationError, match=reason):
        verify_inclusion(h, index, size, [], h)


def test_single_leaf_tree():
    h = leaf_hash(b"data")
    verify_inclusion(h, 0, 1, [], h)
    with pytest.raises(VerificationError):
        verify_inclusion(h, 0, 1, [], b"")
    with pytest.raises(VerificationError):
        verify_inclusion(b"", 0, 1, [], h)


# -- bad arguments to the tree are request errors ---------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda t: t.inclusion_proof(8, 8),
        lambda t: t.inclusion_proof(-1, 8),
        lambda t: t.inclusion_proof(0, 9),
        lambda t: t.inclusion_proof(0, 0),
        lambda t: t.inclusion_proof(True, 8),
        lambda t: t.root(9),
        lambda t: t.root(-1),
        lambda t: t.consistency_proof(5, 4),
        lambda t: t.consistency_proof(1, 9),
        lambda t: t.consistency_proof(-1, 4),
        lambda t: t.leaf_hash(8),
    ],
)
def test_tree_rejects_bad_arguments(call):
    with pytest.raises(InvalidRequest):
        call(MerkleTree(HASHES))


def test_tree_rejects_bad_leaf_hash_and_stays_unchanged():
    t = MerkleTree(HASHES[:3])
    with pytest.raises(ValueError):
        t.extend([HASHES[3], b"short"])
    assert t.size == 3 and t.root() == ref_mth(HASHES[:3])
