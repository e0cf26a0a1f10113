"""The ledger stage: an RFC 6962/9162 transparency log of every decision the broker makes.

Entry points:
- :class:`Ledger` — ``append(entry) -> Receipt`` (durable before it returns), signed checkpoints,
  entries by range, inclusion and consistency proofs.
- :class:`SqliteLedgerStorage` — the embedded storage (one SQLite file, WAL, fsync per batch).
- :func:`verify_checkpoint`, :func:`verify_inclusion`, :func:`verify_consistency` — what an
  auditor runs offline; each returns the verified object (or ``None``) or raises
  :class:`~broker.errors.VerificationError`.

Modules: ``merkle`` (pure RFC 6962 hashing and proofs), ``canonical`` (RFC 8785 leaves),
``checkpoint`` (C2SP tlog-checkpoint and signed-note), ``storage`` (the storage Protocol),
``sqlite`` (its embedded implementation), ``log`` (the :class:`Ledger`).
"""

from broker.ledger.canonical import decode_entry, encode_entry
from broker.ledger.checkpoint import Checkpoint, NoteSigner, NoteVerifier, sign_checkpoint, verify_checkpoint
from broker.ledger.log import MAX_ENTRIES_PER_CALL, Ledger
from broker.ledger.merkle import (
    EMPTY_ROOT,
    MerkleTree,
    leaf_hash,
    node_hash,
    root_from_leaf_hashes,
    verify_consistency,
    verify_inclusion,
)
from broker.ledger.sqlite import SqliteLedgerStorage
from broker.ledger.storage import DuplicateLeaf, LedgerCorrupt, LedgerStorage

__all__ = [
    "EMPTY_ROOT",
    "MAX_ENTRIES_PER_CALL",
    "Checkpoint",
    "DuplicateLeaf",
    "Ledger",
    "LedgerCorrupt",
    "LedgerStorage",
    "MerkleTree",
    "NoteSigner",
    "NoteVerifier",
    "SqliteLedgerStorage",
    "decode_entry",
    "encode_entry",
    "leaf_hash",
    "node_hash",
    "root_from_leaf_hashes",
    "sign_checkpoint",
    "verify_checkpoint",
    "verify_consistency",
    "verify_inclusion",
]
