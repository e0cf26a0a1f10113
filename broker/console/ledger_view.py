"""What the auditors' pages show: ledger search, one entry proven, and the latest checkpoint's status.

Everything goes through :mod:`broker.audit` exactly as an outside auditor's tools do: the ledger of
this process is an untrusted :class:`~broker.audit.LocalLedgerSource`, checked against the signed
checkpoint with the ledger's verifier key. A downloaded entry (:meth:`LedgerBrowser.entry_proof`)
is an :mod:`broker.audit.entry_proof` document, proven with :func:`~broker.audit.prove_attribution`
before it is served.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from broker.audit import AuditFailure, VerifiedLedger, extend_verified, prove_attribution, verify_ledger
from broker.audit.causes import denial_cause
from broker.audit.entry_proof import EntryProofSource, entry_proof_document
from broker.audit.local import LocalLedgerSource
from broker.audit.verify import verify_note
from broker.errors import BrokerError, InvalidRequest, NotFound
from broker.ledger.log import MAX_ENTRIES_PER_CALL, Ledger
from broker.ledger.merkle import leaf_hash
from broker.ledger.schema import ENTRY_KINDS

__all__ = [
    "CheckpointStatus", "LedgerBrowser", "ProofUnavailable", "SearchFilter", "SearchPage", "SearchProblems",
    "denial_cause",
]

#: A search page looks at most this many entries, and lists at most PAGE_SIZE of them.
SCAN_LIMIT = 20000
PAGE_SIZE = 50
_FILTER_MAX = 256
#: Up to this many entries a full verification takes about a second: the page waits for it. Above it,
#: the page shows the last completed verification while a new one runs in the background. Once one
#: verification succeeded, later ones only check the entries appended since (fast at any size).
SYNC_VERIFY_LIMIT = 50_000

DECISIONS = ("allow", "deny", "review")
_ERROR_CODE = re.compile(r"[a-z][a-z_]{0,63}")
_RULE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_HEX = re.compile(r"[0-9a-f]{8,64}")
_JTI = re.compile(r"[A-Za-z0-9_-]{1,128}")
_TIME = re.compile(r"(\d{4}-\d{2}-\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2}))?)?Z?")


class ProofUnavailable(BrokerError):
    """The entry cannot be proven against the latest signed checkpoint (an integrity problem, or too new)."""

    code = "proof_unavailable"
    status = 409


class SearchProblems(InvalidRequest):
    """Search criteria that cannot be searched for; ``fields`` maps each bad field to what is wrong."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__("; ".join(f"{name}: {problem}" for name, problem in fields.items()))
        self.fields = fields


def _time_bound(value: str, *, end: bool) -> str:
    """An RFC 3339 second (``...Z``) for a date or date-time; for ``end``, the last second it covers."""
    match = _TIME.fullmatch(value)
    if match is None:
        raise ValueError("is not a UTC date or time like 2026-11-23 or 2026-11-23T10:00")
    day, hour, minute, second = match.groups()
    try:
        start = datetime.strptime(f"{day} {hour or '00'}:{minute or '00'}:{second or '00'}", "%Y-%m-%d %H:%M:%S")
    except ValueError:
        raise ValueError("is not a real date and time (check the month, day and hour)") from None
    if end:
        step = timedelta(days=1) if hour is None else timedelta(minutes=1) if second is None else timedelta(seconds=1)
        start = start + step - timedelta(seconds=1)
    return start.replace(tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class SearchFilter:
    """Validated ledger search criteria; empty strings match everything.

    ``workload``, ``owner``, ``action`` and ``resource`` match case-insensitive substrings;
    ``customer``, ``conversation``, ``rule``, ``decision``, ``error``, ``kind`` and ``jti`` match
    exactly; ``leaf_hash`` by prefix (8 to 64 hex digits); ``since``/``until`` are UTC dates or times,
    both inclusive (``until`` 2026-11-23 covers that whole day).
    """

    workload: str = ""
    owner: str = ""
    resource: str = ""
    customer: str = ""
    conversation: str = ""
    action: str = ""
    rule: str = ""
    decision: str = ""
    error: str = ""
    kind: str = ""
    jti: str = ""
    leaf_hash: str = ""
    since: str = ""
    until: str = ""
    _since_at: str = field(default="", repr=False, compare=False)
    _until_at: str = field(default="", repr=False, compare=False)

    @classmethod
    def fields(cls) -> list[str]:
        """The criteria a query string may carry, in form order."""
        return [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]

    @classmethod
    def from_query(cls, query: dict[str, str]) -> SearchFilter:
        """The filter from the page's query string, or :class:`SearchProblems` naming every bad field."""
        values: dict[str, str] = {}
        problems: dict[str, str] = {}
        for name in cls.fields():
            value = query.get(name, "").strip()
            values[name] = value
            if len(value) > _FILTER_MAX or any(ord(c) < 32 or ord(c) == 127 for c in value):
                problems[name] = "is too long or has control characters"
        for name in ("kind", "decision", "leaf_hash", "error"):
            values[name] = values[name].lower()
        checks: dict[str, tuple[Callable[[str], bool], str]] = {
            "kind": (lambda v: v in ENTRY_KINDS, f"is not an entry kind ({', '.join(sorted(ENTRY_KINDS))})"),
            "decision": (lambda v: v in DECISIONS, f"is not a decision ({', '.join(DECISIONS)})"),
            "error": (lambda v: _ERROR_CODE.fullmatch(v) is not None,
                      "is not an error code (lower-case letters and _, e.g. temporarily_unavailable)"),
            "rule": (lambda v: _RULE_ID.fullmatch(v) is not None, "is not a rule id (letters, digits, ._:-)"),
            "leaf_hash": (lambda v: _HEX.fullmatch(v) is not None, "is not 8 to 64 hex digits of a leaf hash"),
            "jti": (lambda v: _JTI.fullmatch(v) is not None, "is not a token id (base64url characters)"),
        }
        for name, (ok, problem) in checks.items():
            if values[name] and name not in problems and not ok(values[name]):
                problems[name] = problem
        bounds = {}
        for name, end in (("since", False), ("until", True)):
            if values[name] and name not in problems:
                try:
                    bounds[name] = _time_bound(values[name], end=end)
                except ValueError as exc:
                    problems[name] = str(exc)
        if "since" in bounds and "until" in bounds and bounds["since"] > bounds["until"]:
            problems["until"] = "is before since"
        if problems:
            raise SearchProblems(problems)
        return cls(**values, _since_at=bounds.get("since", ""), _until_at=bounds.get("until", ""))

    def query(self) -> dict[str, str]:
        """The non-empty criteria, as a query string carries them."""
        return {name: getattr(self, name) for name in self.fields() if getattr(self, name)}

    def matches(self, entry: dict[str, Any], digest: str) -> bool:
        """True if the entry (whose leaf hash is ``digest``) fits every non-empty criterion."""
        workload = entry.get("workload") or {}
        intent = entry.get("intent") or {}
        context = intent.get("context") or {}
        decision = entry.get("decision") or {}
        credential = entry.get("credential") or {}
        revocation = entry.get("revocation") or {}
        suspension = entry.get("suspension") or {}
        user = entry.get("user") or {}
        scope, scoped = revocation.get("scope"), str(revocation.get("value", ""))
        workload_text = " ".join(str(x) for x in (
            workload.get("name", ""), workload.get("spiffe_id", ""), revocation.get("workload", ""),
            suspension.get("workload", ""), scoped if scope == "workload" else "") if x)
        contains = [
            (self.workload, workload_text),
            (self.owner, str(workload.get("owner", ""))),
            (self.action, str(intent.get("action", ""))),
            (self.resource, str(intent.get("resource", ""))),
        ]
        if any(want and want.casefold() not in have.casefold() for want, have in contains):
            return False
        customers = {context.get("customer"), user.get("sub"), scoped if scope == "end_user" else None}
        conversations = {context.get("conversation"), scoped if scope == "conversation" else None}
        exact = [
            (self.customer, customers),
            (self.conversation, conversations),
            (self.rule, {decision.get("rule")}),
            (self.decision, {decision.get("effect")}),
            (self.error, {decision.get("error")}),
            (self.kind, {entry.get("kind")}),
            (self.jti, {credential.get("jti"), revocation.get("jti") if scope == "token" else None}),
        ]
        if any(want and want not in have for want, have in exact):
            return False
        if self.leaf_hash and not digest.startswith(self.leaf_hash):
            return False
        when = str(entry.get("time", ""))
        return not (self._since_at and when < self._since_at) and not (self._until_at and when > self._until_at)


@dataclass(frozen=True)
class SearchPage:
    """One page of matches, newest first, and where the neighbouring pages start.

    ``older`` is the ``before`` cursor of the next older page, ``newer`` the ``after`` cursor of the
    next newer one (``None`` when there is nothing that way); ``scanned`` the index range looked at.
    """

    rows: list[dict[str, Any]]
    older: int | None
    newer: int | None
    scanned: tuple[int, int]
    size: int


@dataclass(frozen=True)
class CheckpointStatus:
    """Whether the latest signed checkpoint verified, with every entry it commits to.

    ``pending`` while the first verification of a large ledger runs; ``behind`` counts the entries
    appended since the checkpoint this status is about (a newer verification is then under way).
    ``trusted_key`` is the verifier key the console trusts; ``signed_by`` the key whose signature
    verified (a rotated key the ledger endorsed, when it differs).
    """

    verified: bool
    size: int
    root_b64: str
    checked_at: float
    problem: str | None = None
    pending: bool = False
    behind: int = 0
    trusted_key: str = ""
    signed_by: str = ""


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

    @property
    def verifier_key(self) -> str:
        """The ledger verifier key this browser trusts."""
        return self._key

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
                return CheckpointStatus(False, size, "", time.time(), pending=True, trusted_key=self._key)
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
            return CheckpointStatus(False, size, "", time.time(), problem=str(exc), trusted_key=self._key), None
        status = CheckpointStatus(True, verified.checkpoint.size,
                                  base64.b64encode(verified.checkpoint.root).decode(), time.time(),
                                  trusted_key=self._key, signed_by=verified.signed_by or self._key)
        return status, verified

    def search(self, criteria: SearchFilter, *, before: int | None = None, after: int | None = None,
               page_size: int | None = None) -> SearchPage:
        """One page of matching entries, newest first, each ``{index, leaf_hash, entry, cause}``.

        Without a cursor the page starts at the newest entry; ``before`` pages to older entries (below
        that index), ``after`` to newer ones (above it). One page looks at most :data:`SCAN_LIMIT` entries.
        """
        size = self._ledger.size()
        page_size = page_size or PAGE_SIZE
        if after is not None:
            return self._search_up(criteria, min(after + 1, size), size, page_size)
        top = size if before is None else max(0, min(before, size))
        rows: list[dict[str, Any]] = []
        end, floor = top, max(0, top - SCAN_LIMIT)
        while end > floor and len(rows) < page_size:
            start = max(floor, end - MAX_ENTRIES_PER_CALL)
            leaves = self._ledger.entries(start, end)
            for offset in range(len(leaves) - 1, -1, -1):
                row = self._row(criteria, start + offset, leaves[offset])
                if row is not None:
                    rows.append(row)
                    if len(rows) >= page_size:
                        end = start + offset
                        break
            else:
                end = start
        low = end  # everything from low to top was looked at
        return SearchPage(rows, older=low if low > 0 else None, newer=top - 1 if top < size else None,
                          scanned=(low, top), size=size)

    def _search_up(self, criteria: SearchFilter, bottom: int, size: int, page_size: int) -> SearchPage:
        rows: list[dict[str, Any]] = []
        start, ceiling = bottom, min(size, bottom + SCAN_LIMIT)
        while start < ceiling and len(rows) < page_size:
            end = min(ceiling, start + MAX_ENTRIES_PER_CALL)
            leaves = self._ledger.entries(start, end)
            for offset, leaf in enumerate(leaves):
                row = self._row(criteria, start + offset, leaf)
                if row is not None:
                    rows.append(row)
                    if len(rows) >= page_size:
                        end = start + offset + 1
                        break
            start = end
        high = start  # everything from bottom to high was looked at
        rows.reverse()
        return SearchPage(rows, older=bottom if bottom > 0 else None, newer=high - 1 if high < size else None,
                          scanned=(bottom, high), size=size)

    @staticmethod
    def _row(criteria: SearchFilter, index: int, leaf: bytes) -> dict[str, Any] | None:
        digest = leaf_hash(leaf).hex()
        entry = json.loads(leaf)
        if not criteria.matches(entry, digest):
            return None
        return {"index": index, "leaf_hash": digest, "entry": entry, "cause": denial_cause(entry)}

    def recent_decisions(self, spiffe_id: str, *, customer: str, conversation: str,
                         limit: int = 10) -> list[dict[str, Any]]:
        """The workload's newest decisions (issuance, denial, approval) for this customer or conversation."""
        rows: list[dict[str, Any]] = []
        if not customer and not conversation:
            return rows
        size = self._ledger.size()
        end, floor = size, max(0, size - SCAN_LIMIT)
        while end > floor and len(rows) < limit:
            start = max(floor, end - MAX_ENTRIES_PER_CALL)
            leaves = self._ledger.entries(start, end)
            for offset in range(len(leaves) - 1, -1, -1):
                entry = json.loads(leaves[offset])
                if entry.get("kind") not in ("issuance", "denial", "approval"):
                    continue
                if (entry.get("workload") or {}).get("spiffe_id") != spiffe_id:
                    continue
                context = (entry.get("intent") or {}).get("context") or {}
                if not ((customer and context.get("customer") == customer)
                        or (conversation and context.get("conversation") == conversation)):
                    continue
                rows.append({"index": start + offset, "entry": entry, "cause": denial_cause(entry)})
                if len(rows) >= limit:
                    break
            end = start
        return rows

    def entry(self, index: int) -> dict[str, Any]:
        """One entry proven included in the latest signed checkpoint: attribution, audit path, entry."""
        size = self._ledger.size()
        if index < 0 or index >= size:
            raise NotFound(f"no ledger entry {index} (the ledger has {size})")
        leaf = self._ledger.entries(index, index + 1)[0]
        digest = leaf_hash(leaf).hex()
        entry = json.loads(leaf)
        common = {"index": index, "leaf_hash": digest, "size": size, "cause": denial_cause(entry)}
        try:
            attribution = prove_attribution(self._source, self._key, leaf_hash_hex=digest, origin=self._origin)
        except AuditFailure as exc:
            return {**common, "entry": entry, "proven": False, "problem": str(exc), "lines": [], "path": []}
        path = self._ledger.inclusion_proof(attribution.index, attribution.checkpoint.size)
        return {
            **common, "entry": attribution.entry.entry, "proven": True, "problem": None,
            "lines": attribution.lines(), "path": [p.hex() for p in path],
            "tree_size": attribution.checkpoint.size,
            "root_b64": base64.b64encode(attribution.checkpoint.root).decode(),
            "signed_by": attribution.signed_by or self._key,
        }

    def entry_proof(self, index: int) -> dict[str, Any]:
        """Entry ``index`` with its inclusion proof and the signed checkpoint it is proven in, as a
        self-contained document (:mod:`broker.audit.entry_proof`), proven before it is returned."""
        size = self._ledger.size()
        if index < 0 or index >= size:
            raise NotFound(f"no ledger entry {index} (the ledger has {size})")
        note = self._ledger.checkpoint()
        # The trusted key, and a rotated key the last full verification followed the ledger's endorsement to.
        status = self._status
        keys = [self._key] + ([status.signed_by] if status is not None and status.signed_by not in ("", self._key)
                              else [])
        try:
            checkpoint, signed_by = verify_note(note, keys, self._origin)
        except AuditFailure as exc:
            raise ProofUnavailable(f"the latest checkpoint does not verify with the console's key: {exc}") from None
        if index >= checkpoint.size:
            raise ProofUnavailable(f"entry {index} is not yet under a signed checkpoint (size {checkpoint.size})")
        leaf = self._ledger.entries(index, index + 1)[0]
        document = entry_proof_document(
            origin=self._origin, checkpoint=note, verifier_key=signed_by, index=index, leaf=leaf,
            audit_path=self._ledger.inclusion_proof(index, checkpoint.size),
        )
        source = EntryProofSource.from_document(document)
        try:
            prove_attribution(source, signed_by, leaf_hash_hex=leaf_hash(leaf).hex(), origin=self._origin)
        except AuditFailure as exc:
            raise ProofUnavailable(f"entry {index} could not be proven: {exc}") from None
        return document
