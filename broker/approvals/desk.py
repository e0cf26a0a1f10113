"""Pending approval requests in the shared state store, their decisions and their ledger entries.

A request a ``review`` rule decides becomes a record in the state store (namespace ``approval``, key
``auth_req_id``), so every broker process (SQLite across workers, Redis across replicas) sees the
same state. Every change is a compare-and-swap on the record's version: two approvers, or an
approver and the expiry, racing on one request never both win.

Life of a record::

    pending --approve (n of n)--> approved --poll (claim)--> issued
       |  \\--deny--> denied
       \\----max_wait passes--> expired

Every decision (each approval, a denial, an expiry) is an ``approval`` ledger entry, appended after
the swap that made it; if the append fails the swap is undone and the caller gets 503. An approved
request is released to the poller only once its final approval entry is durable, and the token
binds that entry's leaf hash.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import anyio

from broker.approvals.errors import AlreadyDecided, ApprovalDenied, AuthorizationPending, ExpiredToken, SlowDown
from broker.clock import Clock
from broker.dpop import DPoPBindingRequired
from broker.entries import approval_entry, workload_json
from broker.errors import AccessDenied, InsufficientRole, InvalidGrant, InvalidRequest, NotFound
from broker.models import EndUser, Grant, Held, Receipt, WorkloadIdentity
from broker.operators import Operator
from broker.state.store import StateStore
from broker.text import unsafe_character

__all__ = ["Approval", "ApprovalDesk", "PendingApproval", "is_owner"]

log = logging.getLogger("nhi_broker.approvals")

NAMESPACE = "approval"
#: How long a decided or expired record stays readable (``expired_token`` instead of ``invalid_grant``).
RETAIN_SECONDS = 3600
#: An approved token may still be collected this long after the request's own expiry.
COLLECT_GRACE_SECONDS = 60
SLOW_DOWN_STEP = 5  # RFC 8628 §3.5 / CIBA §11: the interval grows by at least 5 seconds
MAX_INTERVAL = 60
MAX_LISTED = 200
_AUTH_REQ_ID = re.compile(r"[A-Za-z0-9_-]{20,64}")
_EMAIL = re.compile(r"<([^<>\s]+@[^<>\s]+)>")


def is_owner(operator_name: str, owner: str) -> bool:
    """True if ``operator_name`` is the workload's accountable owner (``Name <address>`` or a bare name)."""
    match = _EMAIL.search(owner)
    address = match.group(1) if match else owner.strip()
    return operator_name.casefold() == address.casefold()


class AppendOnlyLog(Protocol):
    async def append_async(self, entry: dict) -> Receipt: ...  # type: ignore[type-arg]


@dataclass(frozen=True)
class PendingApproval:
    """One approval request as the store holds it (``version`` is the store's record version)."""

    auth_req_id: str
    status: str  # pending | approved | denied | expired | issued | refused
    created_at: float
    expires_at: float
    interval: int
    next_poll_at: float
    request_id: str
    workload: dict[str, Any]
    audience: str
    intent: dict[str, Any]
    rule: str
    policy_version: str
    group: str
    needed: int
    owner_may_approve: bool
    dpop_jkt: str | None = None
    approvals: tuple[dict[str, Any], ...] = ()
    denial: dict[str, Any] | None = None
    decided_at: float | None = None
    entry: dict[str, Any] | None = None  # {index, leaf_hash} of the final decision's ledger entry
    jti: str | None = None
    #: The verified end user of a delegated request: ``{iss, sub, claims, evidence_digest}``.
    user: dict[str, Any] | None = None
    #: The W3C trace id of the token request that was held: every decision's entry records it.
    trace_id: str | None = None
    version: int = 0

    def end_user(self) -> EndUser | None:
        """The verified end user the held intent is for (verified when it was held), or ``None``."""
        if self.user is None:
            return None
        return EndUser(issuer=self.user["iss"], subject=self.user["sub"], claims=dict(self.user.get("claims", {})),
                       evidence_digest=self.user.get("evidence_digest"))

    @property
    def owner(self) -> str:
        """The workload's accountable owner."""
        return str(self.workload.get("owner", ""))

    def to_json(self) -> dict[str, Any]:
        """The record as stored (without the store's version)."""
        return {
            "auth_req_id": self.auth_req_id, "status": self.status, "created_at": self.created_at,
            "expires_at": self.expires_at, "interval": self.interval, "next_poll_at": self.next_poll_at,
            "request_id": self.request_id, "workload": self.workload, "audience": self.audience,
            "intent": self.intent, "rule": self.rule, "policy_version": self.policy_version, "group": self.group,
            "needed": self.needed, "owner_may_approve": self.owner_may_approve, "dpop_jkt": self.dpop_jkt,
            "approvals": list(self.approvals), "denial": self.denial, "decided_at": self.decided_at,
            "entry": self.entry, "jti": self.jti, "user": self.user,
            **({"trace_id": self.trace_id} if self.trace_id is not None else {}),
        }

    @classmethod
    def from_store(cls, value: str, version: int) -> PendingApproval:
        """Parse a stored record."""
        data = json.loads(value)
        data["approvals"] = tuple(data.get("approvals", ()))
        return cls(**data, version=version)


@dataclass(frozen=True)
class Approval:
    """A fully approved request, claimed by its workload's poll; built only by :meth:`ApprovalDesk.claim`."""

    record: PendingApproval

    @property
    def approvers(self) -> list[str]:
        """Who approved, in order."""
        return [a["name"] for a in self.record.approvals]

    def token_claim(self) -> dict[str, Any]:
        """The ``approval`` claim of the task token: who approved, when, and the approval entry's leaf hash."""
        assert self.record.entry is not None and self.record.decided_at is not None
        return {
            "auth_req_id": self.record.auth_req_id,
            "approvers": self.approvers,
            "approved_at": int(self.record.decided_at),
            "txn": self.record.entry["leaf_hash"],
        }

    def ledger_ref(self) -> dict[str, Any]:
        """The ``approval`` member of the issuance entry, pointing at the approval entry."""
        assert self.record.entry is not None
        return {
            "auth_req_id": self.record.auth_req_id,
            "index": self.record.entry["index"],
            "leaf_hash": self.record.entry["leaf_hash"],
            "approvers": self.approvers,
        }


Notify = Callable[[dict[str, Any]], None]


class ApprovalDesk:
    """Holds intents for review, records decisions, and releases approved ones to their workload.

    ``notify`` is called (it must not block) with the public view of every new pending request; the
    webhook notifier (:mod:`broker.approvals.webhook`) is one.
    """

    def __init__(
        self,
        store: StateStore,
        ledger: AppendOnlyLog,
        clock: Clock,
        *,
        poll_interval: int = 5,
        notify: Notify | None = None,
    ) -> None:
        self._store = store
        self._ledger = ledger
        self._clock = clock
        self.poll_interval = poll_interval
        self._notify = notify

    # -- store access (async: the store never blocks the event loop) ------------------------------

    async def _get(self, auth_req_id: str) -> PendingApproval | None:
        if _AUTH_REQ_ID.fullmatch(auth_req_id) is None:
            return None
        found = await self._store.get_record(NAMESPACE, auth_req_id)
        return None if found is None else PendingApproval.from_store(*found)

    async def _swap(self, old: PendingApproval, new: PendingApproval) -> PendingApproval | None:
        keep_until = new.expires_at + RETAIN_SECONDS
        value = json.dumps(new.to_json(), separators=(",", ":"))
        won = await self._store.swap_record(NAMESPACE, old.auth_req_id, old.version, value, keep_until
        )
        return replace(new, version=old.version + 1) if won else None

    async def _record(self, old: PendingApproval, new: PendingApproval, entry: dict[str, Any]) -> PendingApproval:
        """Swap ``old`` for ``new``, then make ``entry`` durable; undo the swap if the ledger fails."""
        # Until the new entry is durable the record names no entry, so nothing is released early.
        swapped = await self._swap(old, replace(new, entry=None))
        if swapped is None:
            raise AlreadyDecided("the request changed meanwhile; reload it")
        try:
            receipt = await self._ledger.append_async(entry)
        except Exception:
            await self._swap(swapped, old)  # best effort: the decision did not happen
            raise
        durable = {"index": receipt.index, "leaf_hash": receipt.leaf_hash}
        done = await self._swap(swapped, replace(swapped, entry=durable))
        log.info("approval %s %s index=%d", old.auth_req_id[:8], new.status, receipt.index)
        return done or swapped

    def _entry(self, record: PendingApproval, approval: dict[str, Any]) -> dict[str, Any]:
        return approval_entry(
            now=self._clock.now(), request_id=record.request_id, workload=record.workload,
            audience=record.audience, intent=record.intent, rule_id=record.rule,
            policy_version=record.policy_version,
            approval={"auth_req_id": record.auth_req_id, "group": record.group, "needed": record.needed, **approval},
            user=record.end_user(), trace_id=record.trace_id,
        )

    # -- the workload's side ----------------------------------------------------------------------

    async def hold(
        self, grant: Grant, request_id: str, dpop_jkt: str | None = None, *, trace_id: str | None = None
    ) -> Held:
        """Create the pending request for a grant a review rule decided; notify approvers.

        ``trace_id`` (the held request's trace) is recorded in every ``approval`` entry of the request,
        so the approvers' decisions sit in the assistant's trace, between its prompt and its credential.
        """
        terms = grant.review
        assert terms is not None
        now = self._clock.now()
        record = PendingApproval(
            auth_req_id=secrets.token_urlsafe(24), status="pending", created_at=now,
            expires_at=now + terms.max_wait, interval=self.poll_interval, next_poll_at=now,
            request_id=request_id, workload=workload_json(grant.identity, grant.workload),
            audience=grant.audience, intent=grant.intent.to_json(), rule=grant.rule_id,
            policy_version=grant.policy_version, group=terms.approvers, needed=terms.approvals,
            owner_may_approve=terms.owner_may_approve, dpop_jkt=dpop_jkt,
            user=None if grant.user is None else {**grant.user.ledger_json(), "claims": dict(grant.user.claims)},
            trace_id=trace_id,
        )
        value = json.dumps(record.to_json(), separators=(",", ":"))
        created = await self._store.put_record(NAMESPACE, record.auth_req_id, value, record.expires_at + RETAIN_SECONDS
        )
        if not created:  # 192 random bits: a collision means the store misbehaves
            raise RuntimeError("auth_req_id collision")
        log.info("held request=%s rule=%s auth_req=%s", request_id, grant.rule_id, record.auth_req_id[:8])
        if self._notify is not None:
            self._notify(self.public_view(record))
        await self.sweep()
        return Held(auth_req_id=record.auth_req_id, expires_in=terms.max_wait, interval=self.poll_interval,
                    grant=grant)

    async def claim(self, auth_req_id: str, identity: WorkloadIdentity, dpop_jkt: str | None = None) -> Approval:
        """The poll of ``identity``'s workload (with a DPoP proof of key ``dpop_jkt``, if any): the
        approved request (claimed: it issues once), or the CIBA error saying why not yet (or never)."""
        record = await self._get(auth_req_id)
        if record is None or record.workload.get("spiffe_id") != identity.spiffe_id:
            raise InvalidGrant("auth_req_id is not a request of this workload (unknown, or forgotten long ago)")
        now = self._clock.now()
        if record.status == "pending":
            if now >= record.expires_at:
                await self._expire(record)
                raise ExpiredToken("the request expired before anyone approved it")
            # A small leeway: the client measures the interval from when it read our answer.
            if now < record.next_poll_at - 0.2 * record.interval:
                interval = min(record.interval + SLOW_DOWN_STEP, MAX_INTERVAL)
                await self._swap(record, replace(record, interval=interval, next_poll_at=now + interval))
                raise SlowDown(f"polled too fast; wait {interval} seconds between polls")
            await self._swap(record, replace(record, next_poll_at=now + record.interval))
            raise AuthorizationPending("the request is waiting for approval")
        if record.status == "denied":
            raise ApprovalDenied("an approver denied this request")
        if record.status == "expired":
            raise ExpiredToken("the request expired before anyone approved it")
        if record.status in ("issued", "refused"):
            raise InvalidGrant("this auth_req_id was already redeemed")
        if record.status == "approved" and record.entry is None:
            raise AuthorizationPending("the approval is being recorded")
        if now >= record.expires_at + COLLECT_GRACE_SECONDS:
            raise ExpiredToken("the approved request was not collected in time")
        if record.dpop_jkt is not None and dpop_jkt != record.dpop_jkt:
            # Checked before the claim: a poll with the wrong key does not use up the approval.
            raise DPoPBindingRequired("this request was held with a DPoP key: poll with a proof made with the same key",
                                      rule_id=record.rule)
        claimed = await self._swap(record, replace(record, status="issued"))
        if claimed is None:
            raise InvalidGrant("this auth_req_id was already redeemed")
        return Approval(record=claimed)

    async def settle(self, approval: Approval, *, jti: str | None, retry: bool = False) -> None:
        """After the issuance attempt: the token's ``jti``; or ``retry`` (a backend was down: the
        approval may be collected again); or neither (refused at issuance: it never issues)."""
        record = approval.record
        if retry:
            await self._swap(record, replace(record, status="approved"))
        else:
            await self._swap(record, replace(record, jti=jti, status="issued" if jti else "refused"))

    # -- the approvers' side ----------------------------------------------------------------------

    async def get(self, auth_req_id: str) -> PendingApproval:
        """One request (any status); :class:`NotFound` if unknown."""
        record = await self._get(auth_req_id)
        if record is None:
            raise NotFound("no approval request with this id")
        return record

    async def listing(self, limit: int = MAX_LISTED) -> list[PendingApproval]:
        """Every live record (pending first, soonest expiry first), after expiring overdue ones."""
        await self.sweep()
        rows = await self._store.list_records(NAMESPACE, min(limit, MAX_LISTED))
        records = [PendingApproval.from_store(value, version) for _, value, version in rows]
        return sorted(records, key=lambda r: (r.status != "pending", r.expires_at))

    async def sweep(self) -> int:
        """Expire every overdue pending request (each expiry is a ledger entry); returns how many."""
        rows = await self._store.list_records(NAMESPACE, MAX_LISTED)
        now = self._clock.now()
        expired = 0
        for _, value, version in rows:
            record = PendingApproval.from_store(value, version)
            if record.status == "pending" and now >= record.expires_at:
                expired += await self._expire(record)
        return expired

    async def run_sweeper(self, every: float = 15.0) -> None:
        """Expire overdue requests every ``every`` seconds until cancelled (one task per broker process;
        the compare-and-swap makes each expiry, and its ledger entry, happen once across processes)."""
        while True:
            await anyio.sleep(every)
            try:
                await self.sweep()
            except Exception as exc:  # a store or ledger outage: try again next round
                log.warning("approval sweep failed (%s)", type(exc).__name__)

    async def _expire(self, record: PendingApproval) -> int:
        try:
            await self._record(record, replace(record, status="expired", decided_at=self._clock.now()),
                               self._entry(record, {"outcome": "expired", "approver": None, "reason": None,
                                                    "approvers": [a["name"] for a in record.approvals],
                                                    "final": True}))
        except AlreadyDecided:
            return 0  # another process expired or decided it first
        return 1

    async def decide(self, operator: Operator, auth_req_id: str, *, approve: bool, reason: str) -> PendingApproval:
        """Record ``operator``'s approval or denial (with a reason) of a pending request.

        Raises :class:`InsufficientRole` unless the operator may approve for the request's group,
        :class:`AccessDenied` when the workload's owner would be its only approver and the rule does
        not allow that, and :class:`AlreadyDecided` when the request is no longer pending.
        """
        operator.require("approve")
        # The ledger holds single-line text: line breaks and tabs of a typed reason become spaces.
        reason = " ".join(reason.split())[:500]
        if not reason:
            raise InvalidRequest("a decision needs a reason (printable text)")
        bad = unsafe_character(reason)
        if bad is not None:
            # Other approvers and auditors read it: nothing that displays otherwise than it is.
            raise InvalidRequest(f"the reason holds {bad}: control and bidirectional-formatting characters "
                                 "are refused")
        record = await self.get(auth_req_id)
        # (1) the operator must belong to the group the rule names.
        if record.group not in operator.groups:
            raise InsufficientRole(f"operator {operator.name} is not in approver group {record.group}")
        # (2) only a pending, unexpired request can be decided, once per approver.
        if record.status != "pending":
            raise AlreadyDecided(f"the request is already {record.status}")
        now = self._clock.now()
        if now >= record.expires_at:
            await self._expire(record)
            raise AlreadyDecided("the request expired")
        if any(a["name"] == operator.name for a in record.approvals):
            raise AlreadyDecided("you have already approved this request")
        owner = is_owner(operator.name, record.owner)
        decision = {"name": operator.name, "role": operator.role, "auth": operator.method, "time": int(now),
                    "reason": reason, "owner": owner}
        approvals = [*record.approvals, decision] if approve else list(record.approvals)
        final = approve and len(approvals) >= record.needed
        # (3) the owner cannot be the only approver unless the rule allows it.
        if approve and final and not record.owner_may_approve and all(a["owner"] for a in approvals):
            raise AccessDenied("the workload's owner cannot be the only approver of its own intent")
        if approve:
            new = replace(record, approvals=tuple(approvals), status="approved" if final else "pending",
                          decided_at=now if final else None)
        else:
            new = replace(record, status="denied", denial=decision, decided_at=now)
        actor = operator.to_json()
        entry = self._entry(record, {
            "outcome": "approved" if approve else "denied", "approver": actor, "reason": reason,
            "approvers": [a["name"] for a in approvals], "final": final or not approve,
        })
        return await self._record(record, new, entry)

    @staticmethod
    def public_view(record: PendingApproval) -> dict[str, Any]:
        """What approvers (and the webhook) see: the full intent and context, never a token or secret."""
        return {
            "auth_req_id": record.auth_req_id,
            "status": record.status,
            "workload": {k: record.workload.get(k) for k in ("name", "spiffe_id", "owner", "attestation")},
            "audience": record.audience,
            "intent": record.intent,
            "user": None if record.user is None else {"iss": record.user["iss"], "sub": record.user["sub"]},
            "rule": record.rule,
            "policy_version": record.policy_version,
            "approvers_group": record.group,
            "approvals_needed": record.needed,
            "approvals": [{k: a[k] for k in ("name", "time", "reason")} for a in record.approvals],
            "denial": None if record.denial is None else {k: record.denial[k] for k in ("name", "time", "reason")},
            "created_at": int(record.created_at),
            "expires_at": int(record.expires_at),
            "ledger_entry": record.entry,
        }

