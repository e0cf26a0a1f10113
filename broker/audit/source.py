"""Where an auditor reads a ledger from: the :class:`LedgerSource` interface.

Implementations: :class:`~broker.audit.live.HttpLedgerSource` (a running broker's read API),
:class:`~broker.audit.bundle.BundleLedgerSource` (a file written by ``nhi-broker ledger export``)
and :class:`~broker.audit.local.LocalLedgerSource` (a :class:`~broker.ledger.Ledger` in this
process). A source is *untrusted*: it hands over bytes, and the verifier decides what they are
worth. Everything it returns is raw; nothing it says is believed until a signature or a hash
over the verified checkpoint confirms it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

__all__ = ["ENTRIES_PAGE", "LedgerSource", "RawEntry"]

ENTRIES_PAGE = 1000  # the read API's largest page (broker.ledger.MAX_ENTRIES_PER_CALL)


@dataclass(frozen=True, slots=True)
class RawEntry:
    """One entry as a source hands it over; nothing about it is verified yet.

    ``leaf`` is the exact leaf bytes; ``recorded_leaf_hash`` the leaf hash the source states for
    them (the bundle's or the server's), which the verifier recomputes and compares.
    """

    index: int
    leaf: bytes
    recorded_leaf_hash: bytes | None


class LedgerSource(Protocol):
    """Read access to one ledger. Methods raise :class:`~broker.audit.errors.SourceUnavailable`
    when the source cannot be read, and :class:`~broker.audit.errors.AuditFailure` (with the
    index) when an entry it should hold is missing or malformed."""

    @property
    def description(self) -> str:
        """Where the entries come from (a URL or a file name), for reports."""
        ...

    def checkpoint(self) -> str:
        """The source's latest signed checkpoint note, unverified."""
        ...

    def entries(self, start: int, end: int) -> Iterator[RawEntry]:
        """Entries ``[start, end)`` in index order, every one of them or an error."""
        ...

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        """The source's RFC 9162 consistency proof between two of its tree sizes."""
        ...

    def inclusion_proof(self, index: int, tree_size: int) -> list[bytes]:
        """The source's RFC 9162 audit path of entry ``index`` in its tree of ``tree_size``."""
        ...

    def find(self, leaf_hash: bytes, tree_size: int) -> int | None:
        """The index below ``tree_size`` the source gives for this leaf hash, if it knows one."""
        ...

    def close(self) -> None:
        """Release connections and files."""
        ...
