"""Vault-backed issuance for one task: mint -> lease book -> ledger -> respond; release; sweep.

Order for a Vault grant (the credential exists before its entry, so failure must destroy it):

1. mint the secret in Vault with the rule's TTL; a Vault failure is a ``denial`` entry and a
   503 (unavailable, sealed) or 403 (refused, naming the Vault role) - no credential;
2. record the lease in the lease book (``pending``) with the SHA-256 of a fresh release token;
3. append the ``issuance`` entry (kind, lease id or accessor, TTL - never the secret);
4. if the append fails, revoke the lease at once, append a ``revocation`` entry if the ledger
   takes it, and answer 503;
5. mark the lease live, then look at the kill switch again: a workload suspended while its request
   was in flight (after admission, before its lease was in the book, where the suspension's sweep
   could not see it) gets no credential. The lease is revoked (a ``revocation`` entry, reason
   ``suspended``) and the answer is 403 ``workload_suspended``. The order makes the race safe: the
   suspension sets its mark *then* lists open leases, the issuer adds its lease *then* reads the mark,
   so at least one of them sees the other (both revoking is harmless: one claim wins).

Every revocation (release, expiry sweep, suspension, failed append) is a ``revocation`` entry.

Nothing here blocks the event loop: hvac calls run on the Vault lane and lease-book writes on the
lease book's lane (:mod:`broker.isolation`), each with its own threads and deadline, so a Vault that
hangs fails Vault intents with 503 and delays nothing else. The synchronous methods (release,
revocations, sweeps) are for those lanes, the sweeper thread and the CLI.
"""

from __future__ import annotations

import logging
import secrets
import threading
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import anyio

from broker.clock import Clock, SystemClock
from broker.entries import denial_entry, issuance_entry, revocation_entry
from broker.errors import InvalidGrant, LedgerUnavailable, TemporarilyUnavailable, WorkloadSuspended
from broker.isolation import Lane
from broker.models import Grant, Issued, Receipt
from broker.telemetry import NO_SPANS, Spans

from .errors import VaultRefused, VaultUnavailable
from .kinds import VaultKind, parse_vault_kind
from .leases import LeaseBook, LeaseRecord
from .minter import MintedSecret, RowScope, VaultMinter

__all__ = ["SuspendedSince", "VaultIssuer"]

log = logging.getLogger("nhi_broker.vault")

# Who revokes on its own account: expiry sweeps and failed issuances.
# The broker itself ended the lease (expiry sweep, a failed ledger append): no person or client acted.
BROKER_ACTOR = {"kind": "broker"}
# RFC 8693 §2.2.1: the token_type of an issued token that is not an OAuth access token.
NOT_AN_ACCESS_TOKEN = "N_A"


# The kill switch as the issuer reads it: when a workload (registry name) was suspended, or ``None``
# (``broker.state.tokens.TokenState.suspended_since``).
SuspendedSince = Callable[[str], Awaitable[float | None]]


class _Ledger(Protocol):
    def append(self, entry: dict[str, Any]) -> Receipt: ...

    async def append_async(self, entry: dict[str, Any]) -> Receipt: ...


def _credential(kind: VaultKind, minted_ref_type: str, ref: str, task_id: str) -> dict[str, Any]:
    # ``jti`` is the task id: one identifier per credential, whatever its kind (docs/ledger.md).
    cred: dict[str, Any] = {"kind": kind.family, "jti": task_id, "vault": kind.target}
    cred["lease_id" if minted_ref_type == "lease" else "accessor"] = ref
    return cred


def _row_scope(kind: VaultKind, grant: Grant) -> RowScope | None:
    """The rows a row-scoped ``vault-db`` grant confines its user to: the intent's ``context[rows]``.

    The rule's resource pattern binds ``{rows}`` (checked when policies load), so the value is a
    resource segment the policy matched, not free text.
    """
    if kind.rows is None:
        return None
    value = grant.intent.context.get(kind.rows)
    try:
        return RowScope(kind.rows, value if isinstance(value, str) else "")
    except ValueError:
        raise VaultRefused(f"{kind.describe} is scoped by context {kind.rows!r}, which is not a plain identifier") \
            from None


class VaultIssuer:
    """Issues, releases and sweeps Vault task secrets, each step on the ledger."""

    def __init__(
        self, minter: VaultMinter, leases: LeaseBook, ledger: _Ledger, clock: Clock | None = None,
        suspended_since: SuspendedSince | None = None, *, spans: Spans = NO_SPANS,
    ) -> None:
        self.spans = spans
        self.minter = minter
        self.leases = leases
        self.ledger = ledger
        self.clock = clock or SystemClock()
        self.suspended_since = suspended_since
        settings = minter.settings
        # A call on the Vault lane is at most a login plus one request, each within settings.timeout.
        self.lane = Lane("Vault", settings.concurrency, 2 * settings.timeout + 0.5)
        self.book_lane = Lane("the lease book", settings.concurrency, settings.timeout + 0.5)
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    # -- issuance -------------------------------------------------------------------------------

    async def issue(
        self, grant: Grant, request_id: str, approval: dict[str, Any] | None = None, *, trace_id: str | None = None
    ) -> Issued:
        """Steps 1-5 of the module docstring for an allowed Vault grant.

        ``approval`` (an approved held intent) points the issuance entry at its approval entry;
        ``trace_id`` is the request's W3C trace id, recorded in the issuance (or denial) entry.
        """
        kind = parse_vault_kind(grant.credential_kind)
        task_id = uuid.uuid4().hex
        meta = {"task_id": task_id, "workload": grant.workload.name, "rule": grant.rule_id}
        try:
            rows = _row_scope(kind, grant)
            with self.spans.span("vault.mint") as span:
                span.set("nhi.credential.kind", kind.family)
                minted = await self.lane.run(self.minter.mint, kind, grant.max_ttl, meta, rows)
        except (VaultUnavailable, VaultRefused) as exc:
            await self._record_denial(grant, request_id, exc, trace_id)
            raise
        now = self.clock.now()
        release_token = secrets.token_urlsafe(32)
        record = LeaseRecord(
            task_id=task_id, workload=grant.workload.name, spiffe_id=grant.identity.spiffe_id, kind=kind.family,
            ref_type=minted.ref_type, ref=minted.ref, issued_at=now, expires_at=now + minted.ttl,
            leaf_hash=None, state="pending", reason=None,
        )
        credential = _credential(kind, minted.ref_type, minted.ref, task_id)
        credential.update({"iat": int(now), "exp": int(now) + minted.ttl})
        receipt: Receipt | None = None
        try:
            await self.book_lane.run(self.leases.add, record, release_token)
            entry = issuance_entry(
                grant=grant, now=now, request_id=request_id, credential=credential, approval=approval,
                trace_id=trace_id,
            )
            with self.spans.span("ledger.append") as span:
                span.set("nhi.ledger.kind", "issuance")
                receipt = await self.ledger.append_async(entry)
                span.set("nhi.ledger.index", receipt.index)
                span.set("nhi.ledger.leaf_hash", receipt.leaf_hash)
            await self.book_lane.run(self.leases.mark_live, task_id, receipt.leaf_hash)
            # (5) the kill switch again, now that the lease is in the book (module docstring). A store
            # that cannot answer fails closed through the except below: the lease is revoked, 503.
            suspended = self.suspended_since is not None and await self.suspended_since(grant.workload.name) is not None
        except BaseException as exc:
            # The secret exists but will not reach the caller: it must not survive. Shielded, so that a
            # cancelled request (client gone) still revokes.
            reason = "ledger_append_failed" if receipt is None else "issuance_failed"
            issuance = None if receipt is None else receipt.leaf_hash
            with anyio.CancelScope(shield=True):
                try:
                    await self.lane.run(self._destroy_unrecorded, record, minted, request_id, reason, issuance)
                except TemporarilyUnavailable:
                    # Still running on its thread, or left to the sweeper once the lease is due.
                    log.error("revocation of unrecorded task=%s is late (the Vault lane is busy)", task_id)
            if isinstance(exc, Exception) and not isinstance(exc, TemporarilyUnavailable):
                raise LedgerUnavailable("the credential could not be recorded; it was revoked") from None
            raise
        if suspended:
            with anyio.CancelScope(shield=True):
                try:
                    await self.lane.run(self._revoke_suspended, record, request_id, receipt.leaf_hash)
                except TemporarilyUnavailable:
                    # Still running on its thread, or left to the sweeper once the lease is due.
                    log.error("revocation of task=%s of a suspended workload is late (the Vault lane is busy)",
                              task_id)
            raise WorkloadSuspended(
                f"workload {grant.workload.name!r} was suspended by an operator while this request was in "
                "flight; its credential was revoked"
            )
        log.info("issued vault %s task=%s workload=%s rule=%s index=%d",
                 kind.family, task_id, grant.workload.name, grant.rule_id, receipt.index)
        extra = {"task_id": task_id, "release_token": release_token, "vault": minted.extra}
        return Issued(
            access_token=minted.secret, issued_token_type=kind.token_type, token_type=NOT_AN_ACCESS_TOKEN,
            expires_in=minted.ttl, jti=task_id, receipt=receipt, grant=grant, extra=extra,
        )

    def _destroy_unrecorded(
        self, record: LeaseRecord, minted: MintedSecret, request_id: str, reason: str, issuance: str | None
    ) -> None:
        try:
            if self.leases.get(record.task_id) is None:
                self.leases.add(record, secrets.token_urlsafe(32))
        except Exception:
            # No lease book either: revoke straight away, without the bookkeeping.
            log.error("lease book unavailable; revoking task=%s directly", record.task_id)
        try:
            if self._leases_has(record.task_id):
                self._revoke(record, reason, request_id, issuance=issuance)
            else:
                self.minter.revoke(minted.ref_type, minted.ref, f"{record.kind} task {record.task_id}")
        except Exception as exc:
            # The row stays open and expires with the task: the sweeper retries.
            log.error("could not revoke unrecorded task=%s: %s", record.task_id, type(exc).__name__)

    def _revoke_suspended(self, record: LeaseRecord, request_id: str, issuance: str) -> None:
        """Revoke a lease issued to a workload suspended meanwhile (step 5); the suspension may have
        revoked it already (then its claim won and this is a no-op)."""
        try:
            self._revoke(record, "suspended", request_id, issuance=issuance)
        except Exception as exc:
            # Not handed out either way; the row stays open and the sweeper revokes it at expiry.
            log.error("could not revoke task=%s of a suspended workload: %s", record.task_id, type(exc).__name__)

    def _leases_has(self, task_id: str) -> bool:
        try:
            return self.leases.get(task_id) is not None
        except Exception:
            return False

    async def _record_denial(
        self, grant: Grant, request_id: str, error: VaultUnavailable | VaultRefused, trace_id: str | None
    ) -> None:
        entry = denial_entry(
            identity=grant.identity, workload=grant.workload, audience=grant.audience, intent=grant.intent,
            now=self.clock.now(), request_id=request_id, error=error.code, reason=error.description,
            rule_id=grant.rule_id, policy_version=grant.policy_version, trace_id=trace_id,
        )
        await self.ledger.append_async(entry)

    # -- revocation -----------------------------------------------------------------------------

    def _revoke(
        self,
        record: LeaseRecord,
        reason: str,
        request_id: str,
        actor: dict[str, str] | None = None,
        issuance: str | None = None,
    ) -> bool:
        """Revoke one lease in Vault and record it; ``False`` if someone else already did.

        Raises VaultUnavailable / VaultRefused (the lease stays open for the sweeper).
        """
        if not self.leases.claim(record.task_id, reason):
            return False
        try:
            self.minter.revoke(record.ref_type, record.ref, f"{record.kind} task {record.task_id}")  # type: ignore[arg-type]
        except BaseException:
            self.leases.unclaim(record.task_id)
            raise
        now = self.clock.now()
        self.leases.mark_revoked(record.task_id, now)
        current = self.leases.get(record.task_id)
        credential = {"kind": record.kind, ("lease_id" if record.ref_type == "lease" else "accessor"): record.ref}
        entry = revocation_entry(
            now=now, request_id=request_id, actor=actor or BROKER_ACTOR, scope="lease",
            target={
                "jti": record.task_id,
                "workload": record.workload,
                "spiffe_id": record.spiffe_id,
                "credential": credential,
                "issuance": issuance or (current.leaf_hash if current else None),
            },
            reason=reason,
        )
        try:
            self.ledger.append(entry)
        except Exception as exc:
            log.error("revoked task=%s (%s) but the ledger refused the entry: %s", record.task_id, reason,
                      type(exc).__name__)
            return True
        log.info("revoked vault %s task=%s reason=%s", record.kind, record.task_id, reason)
        return True

    def release(self, release_token: str, request_id: str) -> LeaseRecord:
        """End a task early: revoke its lease. Idempotent for a task already ended."""
        record = self.leases.by_release_token(release_token)
        if record is None:
            raise InvalidGrant("release_token is not one this broker issued")
        holder = {"kind": "workload", "spiffe_id": record.spiffe_id, "auth": "release_token"}
        self._revoke(record, "released", request_id, holder)
        current = self.leases.get(record.task_id)
        assert current is not None
        return current

    def revoke_workload(
        self, workload: str, request_id: str, actor: dict[str, str], reason: str = "suspended"
    ) -> int:
        """Revoke every open lease of ``workload`` (the kill switch); returns how many were revoked.

        ``actor`` is whoever suspended it, as the ledger records actors (an operator's ``to_json()``).
        """
        return sum(self._revoke(r, reason, request_id, actor) for r in self.leases.open_for_workload(workload))

    def revoke_task(self, task_id: str, request_id: str, actor: dict[str, str], reason: str) -> LeaseRecord | None:
        """An operator ends one task's lease now; ``None`` if no such task. Idempotent for an ended task.

        Raises VaultUnavailable / VaultRefused (the lease stays open for the sweeper).
        """
        record = self.leases.get(task_id)
        if record is None:
            return None
        self._revoke(record, reason, request_id, actor)
        return self.leases.get(task_id)

    def sweep(self) -> int:
        """Revoke the leases of expired tasks; returns how many this call revoked."""
        done = 0
        for record in self.leases.due(self.clock.now()):
            try:
                done += self._revoke(record, "expired", f"sweep-{uuid.uuid4().hex}")
            except (VaultUnavailable, VaultRefused) as exc:
                log.warning("sweep could not revoke task=%s: %s", record.task_id, exc.description)
                break
        return done

    def start_sweeper(self, interval: float) -> None:
        """Sweep every ``interval`` seconds in a daemon thread until :meth:`close`."""
        if self._sweeper is not None:
            return

        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    self.sweep()
                except Exception as exc:
                    log.error("lease sweep failed: %s", type(exc).__name__)

        self._sweeper = threading.Thread(target=run, name="vault-lease-sweeper", daemon=True)
        self._sweeper.start()

    def close(self) -> None:
        """Stop the sweeper and the lanes, and close the lease book and the Vault session."""
        self._stop.set()
        self.lane.close()
        self.book_lane.close()
        if self._sweeper is not None:
            self._sweeper.join(timeout=5)
        self.leases.close()
        self.minter.identity.close()
