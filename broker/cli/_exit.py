"""Exit statuses of ``nhi-broker`` commands that read, verify or sign the ledger (docs/ledger.md §Exit status).

A cron job or a CI step must tell a routine problem from evidence of tampering without parsing
text, so each outcome has its own status:

    0  verified (or done)
    1  integrity failure: an entry, a leaf hash, a signature or the schema does not check out
    2  usage: a malformed argument (verifier key, URL, empty token) — nothing was checked
    3  rollback or fork: the log contradicts a checkpoint it (or the auditor) saw before
    4  the source is unreachable or a file cannot be read or written — nothing was checked
"""

from __future__ import annotations

from broker.audit.errors import AuditFailure, ConsistencyViolation, SourceUnavailable
from broker.errors import LedgerUnavailable, VerificationError
from broker.ledger.storage import LedgerCorrupt

__all__ = ["EXIT_FORK", "EXIT_INTEGRITY", "EXIT_IO", "EXIT_OK", "EXIT_USAGE", "exit_status"]

EXIT_OK = 0
EXIT_INTEGRITY = 1
EXIT_USAGE = 2
EXIT_FORK = 3
EXIT_IO = 4


def exit_status(exc: BaseException) -> int:
    """The documented exit status for an error a ledger or audit command ended with."""
    if isinstance(exc, ConsistencyViolation):
        return EXIT_FORK
    if isinstance(exc, LedgerCorrupt):
        return EXIT_FORK if exc.kind in ("rollback", "fork") else EXIT_INTEGRITY
    if isinstance(exc, SourceUnavailable | LedgerUnavailable | OSError):
        return EXIT_IO
    if isinstance(exc, AuditFailure | VerificationError):
        return EXIT_INTEGRITY
    if isinstance(exc, ValueError):
        return EXIT_USAGE
    return EXIT_INTEGRITY
