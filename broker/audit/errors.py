"""What an audit reports when the ledger does not verify.

Every audit failure is a :class:`~broker.errors.VerificationError`, so callers that already catch
the ledger's verification errors catch these too::

    VerificationError
    ├── EntrySchemaError        one entry breaks the documented schema (names the member)
    ├── SourceUnavailable       the log or the bundle could not be read at all
    └── AuditFailure            the ledger does not verify (names the first bad index, if any)
        └── ConsistencyViolation  rollback or fork: two signed checkpoints that cannot both be true
"""

from __future__ import annotations

from broker.errors import VerificationError

__all__ = ["AuditFailure", "ConsistencyViolation", "EntrySchemaError", "SourceUnavailable"]


class EntrySchemaError(VerificationError):
    """A ledger entry does not match the schema of its kind.

    ``member`` is the dotted path of the offending member (``workload.evidence_digest``), or
    ``""`` for the entry as a whole; ``problem`` says what is wrong with it.
    """

    def __init__(self, member: str, problem: str) -> None:
        super().__init__(f"{member}: {problem}" if member else problem)
        self.member = member
        self.problem = problem


class SourceUnavailable(VerificationError):
    """The ledger source could not be read (network, HTTP status, unreadable bundle).

    Not evidence of tampering by itself: nothing was verified, and nothing may be trusted.
    """


class AuditFailure(VerificationError):
    """The ledger failed verification.

    ``index`` is the first entry that is wrong or missing (``None`` when the problem is not tied
    to an entry, such as a checkpoint signed by another key). ``exact`` is ``False`` when the
    evidence only bounds the first bad entry from below: every entry before ``index`` checked
    out, but which entry at or after it was changed cannot be told from what the source offers.
    """

    def __init__(self, reason: str, *, index: int | None = None, exact: bool = True) -> None:
        where = "" if index is None else (f"index {index}: " if exact else f"at or after index {index}: ")
        super().__init__(where + reason)
        self.index = index
        self.reason = reason
        self.exact = exact


class ConsistencyViolation(AuditFailure):
    """Two checkpoints signed by the log's key that no append-only log can both have published.

    ``kind`` is ``"rollback"`` (the newer one is smaller), ``"fork"`` (same size, different root,
    or a consistency proof that does not verify) or ``"origin"`` (a different log). ``previous``
    and ``latest`` are the two signed notes, verbatim: together they are the evidence.
    """

    def __init__(
        self, kind: str, reason: str, *, previous: str, latest: str, index: int | None = None,
        exact: bool | None = None,
    ) -> None:
        super().__init__(reason, index=index, exact=kind == "rollback" if exact is None else exact)
        self.kind = kind
        self.previous = previous
        self.latest = latest
