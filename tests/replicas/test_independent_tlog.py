"""The independent verifier (``independent_tlog``, written from RFC 6962/9162 and C2SP, no broker code):
RFC 6962 test vectors, then a live broker's signed checkpoint, entries, inclusion and consistency
proofs, and a table of tampered inputs each naming the failure it must raise.

The multi-host test uses the same verifier on the ledger three replicas wrote; this module keeps it
honest where network namespaces are not available.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.helpers import SUPPORT, LiveBroker, exchange_form, intent
from tests.replicas.independent_tlog import (
    TlogError,
    leaf_hash,
    tree_hash,
    verify_checkpoint,
    verify_consistency,
    verify_inclusion,
)

# The leaves and roots of the RFC 6962 reference test vectors (certificate-transparency, merkle tree
# tests): the roots of the first n leaves, n = 1..8.
LEAVES = [bytes.fromhex(h) for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                                     "606162636465666768696a6b6c6d6e6f")]
ROOTS = [bytes.fromhex(h) for h in (
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
)]
READ = intent("orders.read", "customers/c-42/orders/ord-1001", customer="c-42")


def test_rfc6962_vectors() -> None:
    hashes = [leaf_hash(leaf) for leaf in LEAVES]
    assert [tree_hash(hashes[:n]) for n in range(1, 9)] == ROOTS
    assert tree_hash([]) == hashlib.sha256(b"").digest()


def _audit_path(hashes: list[bytes], index: int) -> list[bytes]:
    """RFC 6962 §2.1.1 PATH(m, D[n]), built here only to test the verifier against the vectors."""
    if len(hashes) <= 1:
        return []
    k = 1
    while k * 2 < len(hashes):
        k *= 2
    if index < k:
        return [*_audit_path(hashes[:k], index), tree_hash(hashes[k:])]
    return [*_audit_path(hashes[k:], index - k), tree_hash(hashes[:k])]


def test_inclusion_of_every_vector_leaf_in_every_vector_tree() -> None:
    hashes = [leaf_hash(leaf) for leaf in LEAVES]
    for size in range(1, 9):
        for index in range(size):
            verify_inclusion(hashes[index], index, size, _audit_path(hashes[:size], index), ROOTS[size - 1])
            with pytest.raises(TlogError):
                verify_inclusion(hashes[index], index, size, _audit_path(hashes[:size], index), ROOTS[size % 8])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveBroker, str]]:
    broker = LiveBroker(tmp_path_factory.mktemp("tlog") / "data")
    try:
        from broker.attest.dev import DevIssuer  # only to make trial identities: the log is what is checked
        from broker.clock import SystemClock

        issuer = DevIssuer.load_or_create(broker.data_dir)
        for _ in range(11):
            token = issuer.mint(SUPPORT, "nhi-broker", clock=SystemClock())
            r = httpx.post(broker.url + "/v1/token", data=exchange_form(token, "orders-api", READ))
            assert r.status_code == 200, r.text
        key = httpx.get(broker.url + "/.well-known/oauth-authorization-server").json()["ledger_verifier_key"]
        yield broker, key
    finally:
        broker.stop()


def origin_of(key: str) -> str:
    return key.split("+")[0]


def test_a_live_ledger_verifies_independently(served: tuple[LiveBroker, str]) -> None:
    broker, key = served
    with httpx.Client(base_url=broker.url) as http:
        checkpoint = verify_checkpoint(http.get("/v1/ledger/checkpoint").text, key, origin_of(key))
        entries = http.get("/v1/ledger/entries", params={"start": 0, "end": checkpoint.size}).json()["entries"]
        hashes = [leaf_hash(base64.b64decode(e["leaf"])) for e in entries]
        assert [h.hex() for h in hashes] == [e["leaf_hash"] for e in entries]
        assert tree_hash(hashes) == checkpoint.root
        for index in range(checkpoint.size):
            proof = http.get("/v1/ledger/proof/inclusion", params={"index": index, "tree_size": checkpoint.size}).json()
            verify_inclusion(hashes[index], index, checkpoint.size,
                             [base64.b64decode(h) for h in proof["audit_path"]], checkpoint.root)
        for first in range(1, checkpoint.size + 1):
            proof = http.get("/v1/ledger/proof/consistency", params={"first": first, "second": checkpoint.size}).json()
            verify_consistency(first, checkpoint.size, tree_hash(hashes[:first]), checkpoint.root,
                               [base64.b64decode(h) for h in proof["proof"]])


def _flip(data: bytes) -> bytes:
    return bytes([data[0] ^ 1]) + data[1:]


def _other_key(key: str) -> str:
    raw = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    name = key.split("+")[0]
    blob = b"\x01" + raw
    keyid = hashlib.sha256(name.encode() + b"\n" + blob).digest()[:4].hex()
    return f"{name}+{keyid}+{base64.b64encode(blob).decode()}"


def _resized(note: str) -> str:
    lines = note.split("\n")
    lines[1] = str(int(lines[1]) - 1)  # the signed tree size, rewritten
    return "\n".join(lines)


NoteCase = tuple[str, Callable[[str, str], tuple[str, str, str]], str]
NOTE_CASES: list[NoteCase] = [
    ("size rewritten", lambda n, k: (_resized(n), k, origin_of(k)), "signature does not verify"),
    ("another key", lambda n, k: (n, _other_key(k), origin_of(k)), "no signature of"),
    ("key id not of the key", lambda n, k: (n, k.split("+")[0] + "+00000000+" + k.split("+", 2)[2], origin_of(k)),
     "key's id is not the hash"),
    ("another origin expected", lambda n, k: (n, k, "elsewhere.example/log"), "is not 'elsewhere.example/log'"),
    ("signature block cut off", lambda n, k: (n.split("\n\n")[0] + "\n", k, origin_of(k)), "no signature block"),
]


@pytest.mark.parametrize(("name", "change", "says"), NOTE_CASES, ids=[c[0] for c in NOTE_CASES])
def test_tampered_checkpoints_are_refused(served: tuple[LiveBroker, str], name: str,
                                          change: Callable[[str, str], tuple[str, str, str]], says: str) -> None:
    broker, key = served
    note, used_key, origin = change(httpx.get(broker.url + "/v1/ledger/checkpoint").text, key)
    with pytest.raises(TlogError, match=says):
        verify_checkpoint(note, used_key, origin)


def test_tampered_proofs_are_refused(served: tuple[LiveBroker, str]) -> None:
    broker, key = served
    with httpx.Client(base_url=broker.url) as http:
        checkpoint = verify_checkpoint(http.get("/v1/ledger/checkpoint").text, key, origin_of(key))
        size, root = checkpoint.size, checkpoint.root
        entries = http.get("/v1/ledger/entries", params={"start": 0, "end": size}).json()["entries"]
        hashes = [leaf_hash(base64.b64decode(e["leaf"])) for e in entries]
        inclusion: Any = http.get("/v1/ledger/proof/inclusion", params={"index": 5, "tree_size": size}).json()
        path = [base64.b64decode(h) for h in inclusion["audit_path"]]
        consistency: Any = http.get("/v1/ledger/proof/consistency", params={"first": 6, "second": size}).json()
        cons = [base64.b64decode(h) for h in consistency["proof"]]
    old_root = tree_hash(hashes[:6])
    inclusion_cases = [
        ("a flipped path hash", (hashes[5], 5, size, [_flip(path[0]), *path[1:]], root), "does not lead to the root"),
        ("another leaf", (hashes[4], 5, size, path, root), "does not lead to the root"),
        ("a path one hash short", (hashes[5], 5, size, path[:-1], root), "shorter than the tree is deep"),
        ("a path one hash long", (hashes[5], 5, size, [*path, path[0]], root), "longer than the tree is deep"),
        ("an index past the tree", (hashes[5], size, size, path, root), "outside a tree"),
    ]
    for case, args, says in inclusion_cases:
        with pytest.raises(TlogError, match=says):
            verify_inclusion(*args)
        assert case
    consistency_cases = [
        ("a flipped proof hash", (6, size, old_root, root, [_flip(cons[0]), *cons[1:]]), "does not lead to the"),
        ("another old root", (6, size, _flip(old_root), root, cons), "does not lead to the first root"),
        ("a proof one hash short", (6, size, old_root, root, cons[:-1]), "shorter than needed|does not lead"),
        ("an empty proof", (6, size, old_root, root, []), "empty"),
        ("the sizes swapped", (size, 6, root, old_root, cons), "no consistency proof between"),
    ]
    for case, cargs, says in consistency_cases:
        with pytest.raises(TlogError, match=says):
            verify_consistency(*cargs)
        assert case
