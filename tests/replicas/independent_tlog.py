"""An independent verifier of the broker's transparency log, written from the specifications alone.

Nothing here imports the broker: it is a second implementation, so a bug shared by the broker's own
``broker.ledger`` / ``broker.audit`` code and its verifier cannot hide. Only ``hashlib`` and the
Ed25519 primitive of ``cryptography`` are used.

- RFC 6962 §2.1 (and RFC 9162 §2.1.1): leaf hash ``SHA-256(0x00 || leaf)``, node hash
  ``SHA-256(0x01 || left || right)``, the Merkle Tree Hash split at the largest power of two below n.
- RFC 9162 §2.1.3.2: verifying an inclusion proof (audit path).
- RFC 9162 §2.1.4.2: verifying a consistency proof.
- C2SP signed-note (https://c2sp.org/signed-note): verifier key ``<name>+<hex key id>+<base64(0x01 ||
  Ed25519 public key)>``, key id = the first 4 bytes of ``SHA-256(name || 0x0A || 0x01 || key)``; a
  note is text ending in a newline, a blank line, then lines ``— <name> <base64(key id || sig)>``.
- C2SP tlog-checkpoint (https://c2sp.org/tlog-checkpoint): origin line, decimal tree size, base64 root
  hash, optional extension lines.

Every check raises :class:`TlogError` naming what failed; nothing returns a bare boolean.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = [
    "Checkpoint", "TlogError", "leaf_hash", "node_hash", "tree_hash", "verify_checkpoint", "verify_consistency",
    "verify_inclusion",
]

_ED25519 = 0x01  # C2SP signed-note signature type of Ed25519 keys
_EM_DASH = "\u2014"


class TlogError(Exception):
    """A proof, note or checkpoint that does not verify."""


def leaf_hash(leaf: bytes) -> bytes:
    """RFC 6962 §2.1: MTH({d(0)}) = SHA-256(0x00 || d(0))."""
    return hashlib.sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962 §2.1: SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n]))."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def tree_hash(leaf_hashes: list[bytes]) -> bytes:
    """RFC 6962 §2.1 Merkle Tree Hash over leaf hashes: split at k, the largest power of two < n."""
    n = len(leaf_hashes)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return leaf_hashes[0]
    k = 1
    while k * 2 < n:
        k *= 2
    return node_hash(tree_hash(leaf_hashes[:k]), tree_hash(leaf_hashes[k:]))


def verify_inclusion(leaf: bytes, index: int, size: int, path: list[bytes], root: bytes) -> None:
    """RFC 9162 §2.1.3.2, step by step; raises unless ``path`` proves ``leaf`` (a leaf hash) at ``index``."""
    # (1) the index must be inside the tree.
    if not 0 <= index < size:
        raise TlogError(f"leaf index {index} is outside a tree of size {size}")
    # (2) fn = leaf_index, sn = tree_size - 1, r = hash.
    fn, sn, r = index, size - 1, leaf
    # (3) for each p in path ...
    for p in path:
        if sn == 0:
            raise TlogError("the inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    # (4) sn must be 0 and r the root.
    if sn != 0:
        raise TlogError("the inclusion proof is shorter than the tree is deep")
    if r != root:
        raise TlogError("the inclusion proof does not lead to the root")


def verify_consistency(size1: int, size2: int, root1: bytes, root2: bytes, proof: list[bytes]) -> None:
    """RFC 9162 §2.1.4.2, step by step; raises unless ``proof`` shows tree ``size2`` extends tree ``size1``."""
    if not 0 < size1 <= size2:
        raise TlogError(f"no consistency proof between sizes {size1} and {size2}")
    if size1 == size2:
        if proof:
            raise TlogError("a consistency proof between equal sizes must be empty")
        if root1 != root2:
            raise TlogError("two different roots for the same tree size")
        return
    # (1) an empty proof fails.
    if not proof:
        raise TlogError("the consistency proof is empty")
    # (2) if first is an exact power of two, prepend first_hash to the proof.
    if size1 & (size1 - 1) == 0:
        proof = [root1, *proof]
    # (3) fn = first - 1, sn = second - 1.
    fn, sn = size1 - 1, size2 - 1
    # (4) while LSB(fn) is set, shift both right.
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # (5) fr = sr = c[0].
    fr = sr = proof[0]
    # (6) for each subsequent c ...
    for c in proof[1:]:
        if sn == 0:
            raise TlogError("the consistency proof is longer than needed")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    # (7) fr = first_hash, sr = second_hash, sn = 0.
    if sn != 0:
        raise TlogError("the consistency proof is shorter than needed")
    if fr != root1:
        raise TlogError("the consistency proof does not lead to the first root")
    if sr != root2:
        raise TlogError("the consistency proof does not lead to the second root")


@dataclass(frozen=True)
class Checkpoint:
    """A C2SP tlog-checkpoint whose signed note verified under the given key."""

    origin: str
    size: int
    root: bytes


def _verifier(key: str) -> tuple[str, bytes, Ed25519PublicKey]:
    """(name, key id, public key) of a C2SP signed-note verifier key, its key id recomputed."""
    try:
        name, keyid_hex, encoded = key.split("+", 2)  # base64 may contain "+"
        raw = base64.b64decode(encoded, validate=True)
        keyid = bytes.fromhex(keyid_hex)
    except (ValueError, binascii.Error):
        raise TlogError("the verifier key is not <name>+<hex key id>+<base64 key>") from None
    if not name or len(keyid) != 4 or len(raw) != 33 or raw[0] != _ED25519:
        raise TlogError("the verifier key is not an Ed25519 signed-note key")
    if hashlib.sha256(name.encode() + b"\n" + raw).digest()[:4] != keyid:
        raise TlogError("the verifier key's id is not the hash of its name and key")
    return name, keyid, Ed25519PublicKey.from_public_bytes(raw[1:])


def verify_checkpoint(note: str, key: str, origin: str) -> Checkpoint:
    """Verify a signed note under ``key`` and parse its text as a checkpoint of ``origin``."""
    name, keyid, public = _verifier(key)
    # (1) text, a blank line, signature lines; the text is everything up to and including the
    # newline before the blank line.
    text, sep, signatures = note.rpartition("\n\n")
    if not sep or not signatures.endswith("\n"):
        raise TlogError("the note has no signature block")
    text += "\n"
    # (2) a signature line of this key (name and key id) that verifies over the text.
    verified = False
    for line in signatures[:-1].split("\n"):
        parts = line.split(" ")
        if len(parts) != 3 or parts[0] != _EM_DASH:
            raise TlogError(f"malformed signature line {line!r}")
        try:
            blob = base64.b64decode(parts[2], validate=True)
        except binascii.Error:
            raise TlogError("a signature is not base64") from None
        if parts[1] != name or blob[:4] != keyid:
            continue  # another signer's line (a witness): not ours to check
        try:
            public.verify(blob[4:], text.encode())
        except InvalidSignature:
            raise TlogError("the note's signature does not verify") from None
        verified = True
    if not verified:
        raise TlogError(f"the note carries no signature of {name}")
    # (3) the checkpoint body: origin, size, root hash, then extension lines.
    lines = text[:-1].split("\n")
    if len(lines) < 3:
        raise TlogError("a checkpoint has an origin, a size and a root hash")
    if lines[0] != origin:
        raise TlogError(f"checkpoint origin {lines[0]!r} is not {origin!r}")
    if not lines[1].isdigit() or (lines[1] != "0" and lines[1].startswith("0")):
        raise TlogError("the tree size is not a decimal number")
    try:
        root = base64.b64decode(lines[2], validate=True)
    except binascii.Error:
        raise TlogError("the root hash is not base64") from None
    if len(root) != 32:
        raise TlogError("the root hash is not 32 bytes")
    return Checkpoint(lines[0], int(lines[1]), root)
