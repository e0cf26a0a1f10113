"""What the auditors' pages show: ledger search, one entry proven, and the latest checkpoint's status.

Everything goes through :mod:`broker.audit` exactly as an outside auditor's tools do: the ledger of
this process is an untrusted :class:`~broker.audit.LocalLedgerSource`, checked against the signed
checkpoint with the ledger's verifier key.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from broker.audit import AuditFailure, VerifiedLedger, extend_verified, prove_attribution, verify_ledger
from broker.audit.local import LocalLedgerSource
from broker.errors import InvalidRequest, NotFound
from broker.ledger.log import MAX_ENTRIES_PER_CALL, Ledger
from broker.ledger.merkle import leaf_hash

__all__ = ["CheckpointStatus", "LedgerBrowser", "SearchFilter"]

#: A search looks at most this many of the newest entries, and lists at most MAX_RESULTS of them.
SCAN_LIMIT = 20000
MAX_RESULTS = 100
_FILTER_MAX = 256
#: Up to this many entries a full verification takes about a second: the page waits for it. Above it,
#: the page shows the last completed verification while a new one runs in the background. Once one
#: verification succeeded, later ones only check the entries appended since (fast at any size).
SYNC_VERIFY_LIMIT = 50_000


@dataclass(frozen=True)
class SearchFilter:
    """Ledger search criteria; empty strings match everything. ``since``/``until`` are RFC 3339 prefixes."""

    workload: str = ""
    owner: str = ""
    action: str = ""
    jti: str = ""
    kind: str = ""
    since: str = ""
    until: str = ""

    @classmethod
    def from_query(cls, query: dict[str, str]) -> SearchFilter:
        """The filter from the page's query string; over-long or control characters are refused."""
        values = {}
        for name in cls.__dataclass_fields__:
            value = query.get(name, "").strip()
            if len(value) > _FILTER_MAX or any(ord(c) < 32 for c in value):
                raise InvalidRequest(f"search field {name} is too long or has control characters")
            values[name] = value
        return cls(**values)

    def matches(self, entry: dict[str, Any]) -> bool:
        """True if the entry fits every non-empty criterion (case-insensitive substring matches)."""
        workload = entry.get("workload") or {}
        intent = entry.get("intent") or {}
        credential = entry.get("credential") or {}
        checks = [
            (self.workload, f"{workload.get('name', '')} {workload.get('spiffe_id', '')}"),
            (self.owner, str(workload.get("owner", ""))),
            (self.action, str(intent.get("action", ""))),
            (self.kind, str(entry.get("kind", ""))),
        ]
        if any(want and want.casefold() not in have.casefold() for want, have in checks):
            return False
        if self.jti and credential.get("jti") != self.jti:
            return False
        when = str(entry.get("time", ""))
        return not (self.since and when < self.since) and not (self.until and when[: len(self.until)] > self.until)


@dataclass(frozen=True)
class CheckpointStatus:
    """Whether the latest signed checkpoint verified, with every entry it commits to.

    ``pending`` while the first verification of a large ledger runs; ``behind`` counts the entries
    appended since the checkpoint this status is about (a newer verification is then under way).
    """

    verified: bool
    size: int
    root_b64: str
    checked_at: float
    problem: str | None = None
    pending: bool = False
    behind: int = 0


class LedgerBrowser:
    """Search and prove entries of ``ledger`` with its ``verifier_key`` (``<name>+<keyid>+<base64>``)."""

    def __init__(
        self, ledger: Ledger, verifier_key: str, origin: str, *, sync_limit: int = SYNC_VERIFY_LIMIT
    ) -> None:
        self._ledger = ledger
        self._source = LocalLedgerSource(ledger, "this broker's ledger")
        self._key = verifier_key
        self._origin = origin
        self._sync_limit = sync_limit
        self._lock = threading.Lock()
        self._status: CheckpointStatus | None = None
        self._verified: VerifiedLedger | None = None  # the last success, extended incrementally
        self._worker: threading.Thread | None = None

    def checkpoint_status(self) -> CheckpointStatus:
        """Verify the latest checkpoint and every entry under it (cached until the ledger grows).

        A ledger larger than ``sync_limit`` is verified in the background (one run at a time): the
        answer is then the last completed verification, marked ``behind`` (or ``pending`` at first).
        """
        with self._lock:
            size = self._ledger.size()
            current = self._status
            if current is not None and current.size == size:
                return current
            if size <= self._sync_limit or self._verified is not None:
                return self._verify(size)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._refresh, name="console-verify", daemon=True)
                self._worker.start()
            if current is None:
                return CheckpointStatus(False, size, "", time.time(), pending=True)
            return dataclasses.replace(current, behind=size - current.size)

    def wait_for_verification(self, timeout: float) -> None:
        """Block until a background verification (if any) finished (tests and shutdown)."""
        worker = self._worker
        if worker is not None:
            worker.join(timeout)

    def _refresh(self) -> None:
        status, verified = self._check(self._ledger.size(), None)
        with self._lock:
            if self._verified is None:  # nothing newer was verified meanwhile
                self._status, self._verified = status, verified

    def _verify(self, size: int) -> CheckpointStatus:
        """Verify now (the caller holds the lock): incrementally from the last success, if any."""
        self._status, self._verified = self._check(size, self._verified)
        return self._status

    def _check(self, size: int, base: VerifiedLedger | None) -> tuple[CheckpointStatus, VerifiedLedger | None]:
        verified: VerifiedLedger | None = None
        if base is not None:
            try:
                verified = extend_verified(self._source, base, self._key, origin=self._origin)
            except AuditFailure:
                verified = None  # verify in full: it names the exact problem, or follows a key rotation
        try:
            if verified is None:
                verified = verify_ledger(self._source, self._key, origin=self._origin)
        except AuditFailure as exc:
            return CheckpointStatus(False, size, "", time.time(), problem=str(exc)), None
        status = CheckpointStatus(True, verified.checkpoint.size,
                                  base64.b64encode(verified.checkpoint.root).decode(), time.time())
        return status, verified

    def search(self, criteria: SearchFilter) -> list[dict[str, Any]]:
        """The newest matching entries (at most :data:`MAX_RESULTS`), each ``{index, leaf_hash, entry}``."""
        size = self._ledger.size()
        results: list[dict[str, Any]] = []
        end = size
        floor = max(0, size - SCAN_LIMIT)
        while end > floor and len(results) < MAX_RESULTS:
            start = max(floor, end - MAX_ENTRIES_PER_CALL)
            leaves = self._ledger.entries(start, end)
            for offset in range(len(leaves) - 1, -1, -1):
                entry = json.loads(leaves[offset])
                if criteria.matches(entry):
                    results.append({"index": start + offset, "leaf_hash": leaf_hash(leaves[offset]).hex(),
                                    "entry": entry})
                    if len(results) >= MAX_RESULTS:
                        break
            end = start
        return results

    def entry(self, index: int) -> dict[str, Any]:
        """One entry proven included in the latest signed checkpoint: attribution, audit path, entry."""
        size = self._ledger.size()
        if index < 0 or index >= size:
            raise NotFound(f"no ledger entry {index} (the ledger has {size})")
        leaf = self._ledger.entries(index, index + 1)[0]
        digest = leaf_hash(leaf).hex()
        try:
            attribution = prove_attribution(self._source, self._key, leaf_hash_hex=digest, origin=self._origin)
        except AuditFailure as exc:
            return {"index": index, "leaf_hash": digest, "entry": json.loads(leaf), "proven": False,
                    "problem": str(exc), "lines": [], "path": []}
        path = self._ledger.inclusion_proof(attribution.index, attribution.checkpoint.size)
        return {
            "index": index, "leaf_hash": digest, "entry": attribution.entry.entry, "proven": True, "problem": None,
            "lines": attribution.lines(), "path": [p.hex() for p in path],
            "tree_size": attribution.checkpoint.size,
            "root_b64": base64.b64encode(attribution.checkpoint.root).decode(),
        }
