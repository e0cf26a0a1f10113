"""A witness: cosigns (C2SP ``tlog-cosignature`` v1) only checkpoints it verified as consistent.

The wire format lives in :mod:`broker.ledger.cosignature`; this module adds the rule that makes a
cosignature mean something: :meth:`WitnessSigner.cosign` accepts nothing but a
:class:`~broker.audit.monitor.ConsistentCheckpoint`, which only
:func:`~broker.audit.monitor.check_consistency` builds.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit.monitor import ConsistentCheckpoint
from broker.ledger.cosignature import (
    Cosignature,
    CosignatureVerifier,
    cosignature_line,
    cosigner_verifier_key,
    split_note,
)

__all__ = ["Cosignature", "WitnessSigner", "WitnessVerifier"]

WitnessVerifier = CosignatureVerifier
"""Verifies one witness's cosignatures (alias of :class:`~broker.ledger.cosignature.CosignatureVerifier`)."""


class WitnessSigner:
    """A witness's named Ed25519 key."""

    def __init__(self, name: str, key: Ed25519PrivateKey) -> None:
        self.verifier_key = cosigner_verifier_key(name, key)  # validates the name
        self.name = name
        self._key = key

    def cosign(self, consistent: ConsistentCheckpoint, timestamp: int) -> str:
        """The checkpoint note with this witness's cosignature line appended."""
        if not isinstance(consistent, ConsistentCheckpoint):
            raise TypeError("a witness cosigns only a checkpoint verified consistent (ConsistentCheckpoint)")
        body, _ = split_note(consistent.note)
        return consistent.note + cosignature_line(self.name, self._key, body, timestamp)
