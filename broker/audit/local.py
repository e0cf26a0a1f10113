"""A :class:`~broker.ledger.Ledger` in this process as a :class:`~broker.audit.source.LedgerSource`.

For operators who check their own data directory and for tests; an outside auditor uses
:class:`~broker.audit.live.HttpLedgerSource` or a bundle. The ledger's answers are treated exactly
like a remote source's: nothing is believed until it verifies against a signed checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator

from broker.audit.errors import SourceUnavailable
from broker.audit.source import ENTRIES_PAGE, RawEntry
from broker.errors import BrokerError, NotFound
from broker.ledger.log import Ledger

__all__ = ["LocalLedgerSource"]


class LocalLedgerSource:
    """Reads ``ledger`` directly (it stays open; the caller closes it)."""

    def __init__(self, ledger: Ledger, description: str = "local ledger") -> None:
        self._ledger = ledger
        self._description = description

    @property
    def description(self) -> str:
        return self._description

    def checkpoint(self) -> str:
        try:
            return self._ledger.checkpoint()
        except BrokerError as exc:
            raise SourceUnavailable(f"{self._description}: {exc.description}") from None

    def entries(self, start: int, end: int) -> Iterator[RawEntry]:
        for page in range(start, end, ENTRIES_PAGE):
            try:
                leaves = self._ledger.entries(page, min(end, page + ENTRIES_PAGE))
            except BrokerError as exc:
                raise SourceUnavailable(f"{self._description}: {exc.description}") from None
            for offset, leaf in enumerate(leaves):
                yield RawEntry(page + offset, leaf, None)

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        try:
            return self._ledger.consistency_proof(first, second)
        except BrokerError as exc:
            raise SourceUnavailable(f"{self._description}: {exc.description}") from None

    def inclusion_proof(self, index: int, tree_size: int) -> list[bytes]:
        try:
            return self._ledger.inclusion_proof(index, tree_size)
        except BrokerError as exc:
            raise SourceUnavailable(f"{self._description}: {exc.description}") from None

    def find(self, leaf_hash: bytes, tree_size: int) -> int | None:
        try:
            index = self._ledger.find(leaf_hash.hex())
        except NotFound:
            return None
        return index if index < tree_size else None

    def close(self) -> None:
        """Nothing to do: the ledger belongs to the caller."""
