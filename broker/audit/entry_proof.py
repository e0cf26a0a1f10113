"""Entry proofs: one ledger entry with its inclusion proof and signed checkpoint, in one JSON file.

The console's "download" of an entry writes this document; ``nhi-broker audit prove --entry-proof
FILE --verifier-key KEY`` (or :func:`~broker.audit.prove_attribution` over :class:`EntryProofSource`)
verifies it offline, trusting only the verifier key the auditor passes::

    {"format": "nhi-broker-entry-proof", "version": 1,
     "origin": "<checkpoint origin>", "checkpoint": "<signed note, verbatim>",
     "verifier_key": "<the key the exporter saw; informative only>",
     "index": I, "tree_size": N, "leaf_hash": "<64 hex>", "leaf": "<base64 of the exact leaf bytes>",
     "audit_path": ["<64 hex>", ...],   # RFC 9162 PATH(I, D[0:N]), bottom-up
     "entry": {...}}                    # the leaf decoded, for reading; the leaf bytes are what is proven

Nothing in the file is believed: the checkpoint must verify with the auditor's key (the file holds no
key-rotation endorsements, so a checkpoint signed by a rotated key needs that key passed too), the
leaf must hash to a leaf the audit path proves under that checkpoint's root, and the entry must pass
the schema.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from broker.audit.errors import AuditFailure, SourceUnavailable
from broker.audit.source import RawEntry
from broker.ledger.merkle import leaf_hash

__all__ = ["ENTRY_PROOF_FORMAT", "EntryProofSource", "entry_proof_document"]

ENTRY_PROOF_FORMAT = "nhi-broker-entry-proof"
_VERSION = 1
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MAX_FILE = 4 << 20


def entry_proof_document(*, origin: str, checkpoint: str, verifier_key: str, index: int, leaf: bytes,
                         audit_path: list[bytes]) -> dict[str, Any]:
    """The document for entry ``index`` (``leaf``) proven by ``audit_path`` under the signed ``checkpoint``."""
    size = _signed_size(checkpoint)
    return {
        "format": ENTRY_PROOF_FORMAT, "version": _VERSION, "origin": origin, "checkpoint": checkpoint,
        "verifier_key": verifier_key, "index": index, "tree_size": size, "leaf_hash": leaf_hash(leaf).hex(),
        "leaf": base64.b64encode(leaf).decode(), "audit_path": [h.hex() for h in audit_path],
        "entry": json.loads(leaf),
    }


def _signed_size(note: str) -> int:
    # The checkpoint body's second line is the tree size (C2SP tlog-checkpoint); verified later.
    lines = note.split("\n")
    if len(lines) < 3 or not lines[1].isdigit():
        raise AuditFailure("the entry proof's checkpoint is not a signed tlog checkpoint")
    return int(lines[1])


class EntryProofSource:
    """An entry-proof document as an untrusted :class:`~broker.audit.source.LedgerSource` of one entry."""

    def __init__(self, document: dict[str, Any], description: str = "entry proof") -> None:
        self._description = description
        try:
            if document.get("format") != ENTRY_PROOF_FORMAT or document.get("version") != _VERSION:
                raise AuditFailure(f"{description} is not a {ENTRY_PROOF_FORMAT} version {_VERSION} document")
            self._checkpoint = str(document["checkpoint"])
            self._index = document["index"]
            self._size = document["tree_size"]
            self._leaf = base64.b64decode(document["leaf"], validate=True)
            self._path = [bytes.fromhex(h) for h in document["audit_path"] if _HEX64.fullmatch(h)]
            if len(self._path) != len(document["audit_path"]):
                raise AuditFailure(f"{description}: audit_path holds a value that is not 64 hex digits")
        except (KeyError, TypeError, AttributeError, binascii.Error, ValueError) as exc:
            if isinstance(exc, AuditFailure):
                raise
            raise AuditFailure(f"{description} is malformed ({type(exc).__name__}: {exc})") from None
        if not isinstance(self._index, int) or not isinstance(self._size, int) or not 0 <= self._index < self._size:
            raise AuditFailure(f"{description}: index and tree_size must be integers, index below tree_size")
        self.leaf_hash = leaf_hash(self._leaf).hex()

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> EntryProofSource:
        """The source of an in-memory document."""
        return cls(document)

    @classmethod
    def from_file(cls, path: Path) -> EntryProofSource:
        """The source of a downloaded file (:class:`SourceUnavailable` if it cannot be read)."""
        try:
            with open(path, "rb") as f:
                raw = f.read(_MAX_FILE + 1)
        except OSError as exc:
            raise SourceUnavailable(f"cannot read entry proof {path}: {exc.strerror}") from None
        if len(raw) > _MAX_FILE:
            raise AuditFailure(f"{path} is larger than an entry proof can be")
        try:
            document = json.loads(raw)
        except ValueError:
            raise AuditFailure(f"{path} is not JSON") from None
        if not isinstance(document, dict):
            raise AuditFailure(f"{path} is not a JSON object")
        return cls(document, str(path))

    @property
    def description(self) -> str:
        return self._description

    def checkpoint(self) -> str:
        return self._checkpoint

    def entries(self, start: int, end: int) -> Iterator[RawEntry]:
        """Its one entry, if in ``[start, end)``; nothing else. A partial source on purpose: the checkpoint
        must be signed by a key the auditor gives (a rotated key's endorsements are not in the file)."""
        if start <= self._index < end:
            yield RawEntry(self._index, self._leaf, None)

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        raise AuditFailure(f"{self._description} holds no consistency proofs")

    def inclusion_proof(self, index: int, tree_size: int) -> list[bytes]:
        if index != self._index or tree_size != self._size:
            raise AuditFailure(f"{self._description} proves entry {self._index} in a tree of {self._size} only")
        return list(self._path)

    def find(self, leaf_hash: bytes, tree_size: int) -> int | None:
        return self._index if leaf_hash.hex() == self.leaf_hash and tree_size == self._size else None

    def close(self) -> None:
        """Nothing to release."""
