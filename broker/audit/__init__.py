"""The auditor's side of the ledger: verify, prove, monitor, witness — trusting only a verifier key.

Entry points (each returns a verified object or raises an :class:`~broker.audit.errors.AuditFailure`):

- :func:`verify_ledger` -> :class:`VerifiedLedger`: every entry against a signed checkpoint.
- :func:`prove_attribution` -> :class:`Attribution`: one credential's entry, proven included.
- :func:`check_consistency` -> :class:`ConsistentCheckpoint`: append-only monitoring with state.
- :class:`WitnessSigner` / :class:`WitnessVerifier`: C2SP tlog-cosignature v1.

Sources (untrusted): :class:`HttpLedgerSource` (a live broker), :class:`BundleLedgerSource` (an
export written by :func:`write_bundle`). The format is documented in docs/ledger.md.
"""

from broker.audit.bundle import BundleLedgerSource, write_bundle
from broker.audit.errors import AuditFailure, ConsistencyViolation, EntrySchemaError, SourceUnavailable
from broker.audit.live import HttpLedgerSource
from broker.audit.monitor import ConsistentCheckpoint, check_consistency
from broker.audit.prove import Attribution, prove_attribution
from broker.audit.schema import ValidatedEntry, validate_entry
from broker.audit.source import LedgerSource, RawEntry
from broker.audit.verify import LedgerSummary, VerifiedLedger, extend_verified, verify_ledger
from broker.audit.witness import Cosignature, WitnessSigner, WitnessVerifier

__all__ = [
    "Attribution",
    "AuditFailure",
    "BundleLedgerSource",
    "ConsistencyViolation",
    "ConsistentCheckpoint",
    "Cosignature",
    "EntrySchemaError",
    "HttpLedgerSource",
    "LedgerSource",
    "LedgerSummary",
    "RawEntry",
    "SourceUnavailable",
    "ValidatedEntry",
    "VerifiedLedger",
    "WitnessSigner",
    "WitnessVerifier",
    "check_consistency",
    "extend_verified",
    "prove_attribution",
    "validate_entry",
    "verify_ledger",
    "write_bundle",
]
