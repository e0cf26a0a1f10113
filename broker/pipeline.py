"""The broker's one request path, without HTTP: attest -> authorize -> mint -> ledger.

:meth:`Broker.exchange` returns an :class:`~broker.models.Issued` credential or raises a
:class:`~broker.errors.BrokerError`. The order is what the auditors' contract needs:

1. attest the subject token (an unauthenticated caller never writes to the ledger), then consume
   the DPoP proof's ``jti`` (checked, statelessly, when the request was read): an unauthenticated
   caller writes nothing to the state store either;
2. resolve the workload in the registry and ask the intent policy (a refusal of an attested
   workload is a ``denial`` entry);
3. fix the task token's claims, append the ``issuance`` entry and wait until it is durable (where one
   storage process holds the state file and the ledger, in the same round trip as step 2's checks:
   the entry is built first and appended only if every check passes);
4. only then sign the token, binding the entry's leaf hash as ``txn``.

If step 3 fails nothing was signed: the caller gets 503 and no credential exists.

An intent a ``review`` rule decides is not issued: :meth:`Broker.exchange` returns :class:`Held`
(the pending request lives in :mod:`broker.approvals`). Its workload polls with a fresh identity
token; :meth:`Broker.redeem` attests it, claims the approved request and runs steps 2-4 for the
held intent with the approval bound into the token and the issuance entry.

Steps 1 and 2 are CPU work on cached keys (signature, policy), so they run on the event loop: a hop
to a worker thread costs more than it saves and, under load, makes every thread queue for the GIL.
Nothing in them blocks: an issuer's JWKS that must be fetched is awaited, and the shared state is
asked through the async :class:`~broker.state.store.StateStore` (``redis.asyncio``, or the SQLite
store's own thread), once per request: the workload identity token's single use, the kill switch,
the rate and the budget are one :meth:`~broker.state.store.StateStore.run_checks` round trip after
the policy decided. A refused request still consumes that ``jti`` first, so a replayed token is
refused as a replay whatever the policy says, as if the ``jti`` had been consumed during attestation.
(A delegated exchange's user token or parent task token is checked by its own verifier, awaited.)
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from broker.approvals.desk import Approval, ApprovalDesk
from broker.attest.evidence import Evidence
from broker.attest.jwt_checks import check_shape, peek_unverified
from broker.attest.methods.base import AttestationMethod
from broker.attest.users import UserTokenVerifier
from broker.clock import Clock, SystemClock
from broker.delegation import ParentTokens, check_within
from broker.dpop import CheckedDPoPProof, DPoPBindingRequired, DPoPProof, InvalidDPoPProof, enforce_binding
from broker.entries import denial_entry, issuance_entry
from broker.errors import (
    AccessDenied,
    AttestationError,
    BrokerError,
    InvalidTarget,
    PolicyDenied,
    TemporarilyUnavailable,
)
from broker.logs import log_fast
from broker.mint.jwt import ACCESS_TOKEN_TYPE, PreparedToken, TaskTokenMinter
from broker.models import (
    Delegation,
    EndUser,
    Grant,
    Held,
    Intent,
    Issued,
    Receipt,
    RegisteredWorkload,
    WorkloadIdentity,
)
from broker.state.store import ConsumeOnce
from broker.telemetry import NO_SPANS, Spans
from broker.vault.errors import VaultUnavailable
from broker.vault.kinds import check_requested_type

__all__ = ["Broker", "ExchangeRequest", "PollRequest"]

log = logging.getLogger("nhi_broker.pipeline")


class IdentityVerifier(Protocol):
    async def verify(
        self, subject_token: str, subject_token_type: str, *, label: str = "subject_token"
    ) -> WorkloadIdentity: ...

    async def verify_signed(
        self, subject_token: str, subject_token_type: str, *, label: str = "subject_token"
    ) -> tuple[WorkloadIdentity, ConsumeOnce | None]: ...

    def request_method(self, token_type: str | None) -> AttestationMethod | None: ...


class IntentPolicy(Protocol):
    version: str
    limits: Mapping[str, Any]

    def resolve_workload(self, identity: WorkloadIdentity) -> RegisteredWorkload: ...

    def authorize(
        self,
        identity: WorkloadIdentity,
        workload: RegisteredWorkload,
        audience: str,
        intent: Intent,
        user: EndUser | None = None,
    ) -> Grant: ...


class LimitGuard(Protocol):
    @property
    def appends_on_admission(self) -> bool: ...

    def token_claims(self, limits: Any) -> dict[str, Any]: ...

    async def admit(
        self, grant: Grant, limits: Any, *, count_rate: bool = True, replay: Sequence[ConsumeOnce] = ()
    ) -> dict[str, Any]: ...

    async def admit_and_append(
        self, grant: Grant, limits: Any, entry: dict[str, Any], *, count_rate: bool = True,
        replay: Sequence[ConsumeOnce] = (),
    ) -> Receipt: ...

    async def admit_hold(self, grant: Grant, limits: Any, *, replay: Sequence[ConsumeOnce] = ()) -> None: ...

    async def consume(self, replay: Sequence[ConsumeOnce]) -> None: ...


class DPoPConsumer(Protocol):
    async def consume(self, checked: CheckedDPoPProof) -> DPoPProof: ...


class AppendOnlyLog(Protocol):
    async def append_async(self, entry: dict) -> Receipt: ...  # type: ignore[type-arg]


class SecretIssuer(Protocol):
    """Issues Vault-backed credentials for a grant (``broker.vault.issuer.VaultIssuer``)."""

    async def issue(
        self, grant: Grant, request_id: str, approval: dict[str, Any] | None = None, *, trace_id: str | None = None
    ) -> Issued: ...


@dataclass(frozen=True)
class ExchangeRequest:
    """A parsed RFC 8693 token-exchange request (the wire form is parsed in ``broker.api``)."""

    subject_token: str
    subject_token_type: str
    audience: str
    intent: Intent
    request_id: str
    dpop: DPoPProof | None = None  # verified by broker.dpop; binds the token to its key
    requested_token_type: str | None = None
    #: A proof checked by broker.dpop whose jti the pipeline consumes once the caller is attested.
    dpop_checked: CheckedDPoPProof | None = None
    approval: Approval | None = None  # set by Broker.redeem: the approval that releases a held intent
    # RFC 8693 §2.1: with an actor_token (the workload's identity), subject_token is an end user's
    # token (from a configured user issuer) or a parent task token this broker signed (a sub-agent).
    actor_token: str | None = None
    actor_token_type: str | None = None
    user: EndUser | None = None  # set by Broker.redeem: the verified user a held intent was for
    # What the transport says besides the form (peer certificate, address, headers): request methods.
    evidence: Evidence | None = None
    #: The W3C trace the request belongs to (broker.tracing): recorded in its ledger entry.
    trace_id: str | None = None


@dataclass(frozen=True)
class PollRequest:
    """A CIBA poll for a held intent: its ``auth_req_id`` and a fresh identity token of the same workload."""

    auth_req_id: str
    subject_token: str
    subject_token_type: str
    request_id: str
    dpop: DPoPProof | None = None
    dpop_checked: CheckedDPoPProof | None = None
    evidence: Evidence | None = None
    trace_id: str | None = None


#: An admitted request: its grant, its task token's claims (``None`` for a Vault kind), and the
#: receipt of its issuance entry when admission appended it in the same round trip.
_Admitted = tuple[Grant, PreparedToken | None, Receipt | None]


@dataclass(frozen=True)
class _Hold:
    grant: Grant


@dataclass(frozen=True)
class _Refusal:
    identity: WorkloadIdentity
    workload: RegisteredWorkload | None
    error: BrokerError
    user: EndUser | None = None
    delegation: Delegation | None = None
    #: The policy version that decided (a reload may swap the set while the refusal is recorded).
    policy_version: str | None = None


@dataclass(frozen=True)
class _Principals:
    """Who a request is from and for: the attested workload, and the verified user or parent token."""

    identity: WorkloadIdentity
    user: EndUser | None = None
    delegation: Delegation | None = None
    #: The identity token's single use, still to be applied (folded into the guard's round trip).
    single_use: tuple[ConsumeOnce, ...] = ()


class Broker:
    """Exchanges attested workload identities for task tokens, recording every decision."""

    def __init__(
        self,
        attestor: IdentityVerifier,
        policies: IntentPolicy,
        minter: TaskTokenMinter,
        ledger: AppendOnlyLog,
        guard: LimitGuard,
        clock: Clock | None = None,
        *,
        vault: SecretIssuer | None = None,
        approvals: ApprovalDesk | None = None,
        users: UserTokenVerifier | None = None,
        parents: ParentTokens | None = None,
        dpop: DPoPConsumer | None = None,
        spans: Spans = NO_SPANS,
    ) -> None:
        self.attestor = attestor
        self.policies = policies
        self.minter = minter
        self.ledger = ledger
        self.guard = guard
        self.clock = clock or SystemClock()
        self.vault = vault
        self.approvals = approvals
        self.users = users
        self.parents = parents
        self.dpop = dpop
        self.spans = spans

    async def _consume_dpop(self, checked: CheckedDPoPProof | None) -> DPoPProof | None:
        """(1b) The checked proof's ``jti``, consumed only now that the caller is attested."""
        if checked is None:
            return None
        if self.dpop is None:
            raise InvalidDPoPProof("DPoP is not enabled on this broker")
        return await self.dpop.consume(checked)

    async def _workload(
        self, token: str, token_type: str, evidence: Evidence | None, label: str = "subject_token"
    ) -> WorkloadIdentity:
        """The workload identity of a token request: a request method (X.509-SVID, WIMSE) verifies the
        request's evidence when the token type selects one (consuming its own single-use values);
        otherwise the token is an identity JWT, its ``jti`` consumed at once."""
        method = self.attestor.request_method(token_type)
        if method is not None:
            base = evidence if evidence is not None else Evidence(token=None, token_type=None)
            return await method.verify(replace(base, token=token, token_type=token_type, label=label))
        return await self.attestor.verify(token, token_type, label=label)

    async def _attest(self, request: ExchangeRequest) -> _Principals:
        """(1) Who asks, and for whom. Errors propagate: nothing proven, no ledger entry."""
        if request.actor_token is None:
            method = self.attestor.request_method(request.subject_token_type)
            if method is not None:
                return _Principals(await self._workload(request.subject_token, request.subject_token_type,
                                                        request.evidence))
            identity, single_use = await self.attestor.verify_signed(request.subject_token, request.subject_token_type)
            return _Principals(identity, single_use=() if single_use is None else (single_use,))
        # Delegation (RFC 8693 §2.1): the actor token is the workload's identity, attested as a subject
        # token is on a plain exchange; a user token there is refused (its issuer is no workload issuer).
        # Its jti is consumed at once, before the subject token is looked at.
        identity = await self._workload(
            request.actor_token, request.actor_token_type or "", request.evidence, label="actor_token"
        )
        # The subject token's issuer decides how it is verified: this broker (a parent task token of a
        # sub-agent) or a configured user issuer. The peek only routes; each verifier checks everything.
        check_shape(request.subject_token, 16384, "subject_token")
        _unverified_claims = peek_unverified(request.subject_token)[1]
        if self.parents is not None and _unverified_claims.get("iss") == self.parents.issuer:
            delegation, user = await self.parents.verify(request.subject_token, request.subject_token_type)
            return _Principals(identity, user=user, delegation=delegation)
        if self.users is None:
            raise AttestationError("unknown user issuer (this broker has no user issuers configured)")
        user = await self.users.verify(request.subject_token, request.subject_token_type)
        return _Principals(identity, user=user)

    async def _authorize(
        self, principals: _Principals, request: ExchangeRequest
    ) -> _Admitted | _Refusal | _Hold:
        identity, user, delegation = principals.identity, principals.user, principals.delegation
        single_use = principals.single_use
        workload: RegisteredWorkload | None = None
        # One set decides the whole request, even if a live reload swaps self.policies meanwhile.
        policies = self.policies
        try:
            try:
                # (2) registry, then intent policy.
                workload = policies.resolve_workload(identity)
                if delegation is not None:
                    # (2a) a sub-agent narrows only the task tokens of workloads it takes sub-tasks from,
                    # and only within their grant; then its own rules decide.
                    if delegation.parent_client_id not in workload.delegators:
                        raise AccessDenied(
                            f"workload {workload.name} does not take sub-tasks from {delegation.parent_client_id} "
                            "(delegators in workloads.toml)"
                        )
                    check_within(delegation, request.audience, request.intent)
                grant = policies.authorize(identity, workload, request.audience, request.intent, user)
                if delegation is not None:
                    grant = replace(grant, delegation=delegation)
                    if grant.review is not None:
                        raise AccessDenied("a sub-agent's intent cannot be held for review: the parent asks for it")
                enforce_binding(grant, request.dpop)
                if request.approval is None:  # a held intent's type was checked when it was held
                    check_requested_type(grant.credential_kind, request.requested_token_type)
            except Exception:
                # A refused token is burnt as if attestation had consumed it; a replay is refused as one.
                await self.guard.consume(single_use)
                raise
            limits = policies.limits.get(grant.rule_id)
            if grant.review is not None and request.approval is None:
                # Suspension and rate apply to holds too; the budget is charged at issuance.
                await self.guard.admit_hold(grant, limits, replay=single_use)
                return _Hold(grant)
            if request.approval is not None:
                _check_approval(grant, request.approval, request.dpop)
            # (2b) single use, kill switch, rates and budgets (broker.state.guard) in one store round
            # trip; shared-state outages raise 503.
            counted = request.approval is not None  # its rate was counted when it was held
            if delegation is None and grant.credential_kind == "jwt" and self.guard.appends_on_admission:
                # (2b) and (3) in one round trip to the storage process holding the state file and the
                # ledger: the entry is built first and appended only if every check passes.
                prepared = self._prepare(request, grant, self.guard.token_claims(limits))
                entry = self._issuance_entry(request, grant, prepared)
                receipt = await self._admit_and_append(grant, limits, entry, counted, single_use)
                return grant, prepared, receipt
            extra = await self.guard.admit(grant, limits, count_rate=not counted, replay=single_use)
            if delegation is not None and self.parents is not None:
                # Only now, with the child admitted: a wider or refused child leaves the parent's uses.
                await self.parents.consume_use(delegation)
        except (AccessDenied, InvalidTarget, DPoPBindingRequired) as exc:
            return _Refusal(identity, workload, exc, user=user, delegation=delegation,
                            policy_version=policies.version)
        if grant.credential_kind != "jwt":
            return grant, None, None  # a Vault kind: broker.vault mints it
        return grant, self._prepare(request, grant, extra), None

    def _prepare(self, request: ExchangeRequest, grant: Grant, extra: dict[str, Any]) -> PreparedToken:
        """The task token's claims: the limits' ``extra`` claims, the approval, a delegated use."""
        if request.approval is not None:
            extra = {**extra, "approval": request.approval.token_claim()}
        if grant.delegation is not None and grant.delegation.num_uses is not None:
            # The child carries on the one use of its parent it consumed (ParentTokens.consume_use).
            extra = {**extra, "num_uses": 1}
        cnf_jkt = request.dpop.jkt if request.dpop else None
        return self.minter.prepare(grant, cnf_jkt=cnf_jkt, extra_claims=extra)

    async def _admit_and_append(
        self, grant: Grant, limits: Any, entry: dict[str, Any], counted: bool, single_use: Sequence[ConsumeOnce]
    ) -> Receipt:
        """(2b) and (3) in one round trip, in the ``ledger.append`` span."""
        appending = self.guard.admit_and_append(grant, limits, entry, count_rate=not counted, replay=single_use)
        return await _append_traced(self.spans, entry["kind"], appending)

    async def exchange(self, request: ExchangeRequest) -> Issued | Held:
        """Attest, authorize, record and mint; see the module docstring for the order.

        Returns :class:`Held` when a review rule decides the intent: nothing is issued until approved.
        """
        with self.spans.span("attest") as span:
            principals = await self._attest(request)
            if request.dpop_checked is not None:
                request = replace(request, dpop=await self._consume_dpop(request.dpop_checked), dpop_checked=None)
            span.set("nhi.attestation", principals.identity.method)
        outcome = await self._decide(principals, request)
        if isinstance(outcome, _Refusal):
            await self._record_refusal(request, outcome)
            raise outcome.error
        if isinstance(outcome, _Hold):
            if self.approvals is None:
                raise TemporarilyUnavailable("this broker cannot hold intents for review")
            jkt = request.dpop.jkt if request.dpop else None
            with self.spans.span("approval.hold"):
                return await self.approvals.hold(outcome.grant, request.request_id, jkt, trace_id=request.trace_id)
        return await self._issue(request, *outcome)

    async def _decide(
        self, principals: _Principals, request: ExchangeRequest
    ) -> _Admitted | _Refusal | _Hold:
        """(2) in its span: the decision's rule and effect as attributes (identifiers, no token)."""
        with self.spans.span("policy") as span:
            outcome = await self._authorize(principals, request)
            if not self.spans.enabled:  # the no-op span: skip building its attributes (the hot path)
                return outcome
            span.set("nhi.action", request.intent.action)
            span.set("nhi.audience", request.audience)
            if isinstance(outcome, _Refusal):
                span.set("nhi.decision", "deny")
                span.set("nhi.error", outcome.error.code)
            else:
                grant = outcome.grant if isinstance(outcome, _Hold) else outcome[0]
                span.set("nhi.decision", "review" if isinstance(outcome, _Hold) else "allow")
                span.set("nhi.rule", grant.rule_id)
                span.set("nhi.workload", grant.workload.name)
                span.set("nhi.credential.kind", grant.credential_kind)
            return outcome

    async def redeem(self, poll: PollRequest) -> Issued:
        """A CIBA poll: attest the poller, claim its approved request, issue the held intent with the
        approval bound in. Raises the CIBA error (``authorization_pending``, ...) while it cannot."""
        if self.approvals is None:
            raise TemporarilyUnavailable("this broker cannot hold intents for review")
        with self.spans.span("attest") as span:
            identity = await self._workload(poll.subject_token, poll.subject_token_type, poll.evidence)
            if poll.dpop_checked is not None:
                poll = replace(poll, dpop=await self._consume_dpop(poll.dpop_checked), dpop_checked=None)
            span.set("nhi.attestation", identity.method)
        with self.spans.span("approval.claim"):
            approval = await self.approvals.claim(poll.auth_req_id, identity, poll.dpop.jkt if poll.dpop else None)
        held = approval.record.intent
        # The user was verified when the intent was held; the poller is the same workload (claim()).
        user = approval.record.end_user()
        request = ExchangeRequest(
            subject_token=poll.subject_token, subject_token_type=poll.subject_token_type,
            audience=approval.record.audience,
            intent=Intent(action=held["action"], resource=held["resource"], context=dict(held["context"])),
            request_id=poll.request_id, dpop=poll.dpop, approval=approval, user=user, evidence=poll.evidence,
            trace_id=poll.trace_id,
        )
        principals = _Principals(identity, user=user)
        try:
            outcome = await self._decide(principals, request)
            if isinstance(outcome, _Refusal):
                await self._record_refusal(request, outcome)
                await self.approvals.settle(approval, jti=None)
                raise outcome.error
            assert not isinstance(outcome, _Hold)
            issued = await self._issue(request, *outcome)
        except TemporarilyUnavailable:
            await self.approvals.settle(approval, jti=None, retry=True)
            raise
        await self.approvals.settle(approval, jti=issued.jti)
        return issued

    async def _issue(
        self, request: ExchangeRequest, grant: Grant, prepared: PreparedToken | None, receipt: Receipt | None
    ) -> Issued:
        if prepared is None:
            # A Vault kind: broker.vault.issuer mints, records and revokes on failure.
            if self.vault is None:
                refusal = _Refusal(grant.identity, grant.workload, VaultUnavailable(
                    f"rule {grant.rule_id} issues a Vault secret and this broker has no Vault configured"),
                    user=grant.user, delegation=grant.delegation, policy_version=grant.policy_version)
                await self._record_refusal(request, refusal)
                raise refusal.error
            approval = request.approval.ledger_ref() if request.approval is not None else None
            with self.spans.span("vault.issue") as span:
                issued = await self.vault.issue(grant, request.request_id, approval, trace_id=request.trace_id)
                span.set("nhi.credential.jti", issued.jti)
                return issued
        # (3) durable before the credential exists (already, when admission appended it).
        if receipt is None:
            receipt = await self._append(self._issuance_entry(request, grant, prepared))
        # (4) sign, binding the leaf hash.
        with self.spans.span("mint") as span:
            token = await self.minter.sign_batched(prepared, txn=receipt.leaf_hash)
            span.set("nhi.credential.kind", "jwt")
            span.set("nhi.credential.jti", prepared.jti)
        log_fast(  # every exchange: without logging's stack walk for the caller (broker.logs)
            log, logging.INFO, "issued jti=%s workload=%s action=%s rule=%s index=%d",
            prepared.jti, grant.workload.name, grant.intent.action, grant.rule_id, receipt.index,
        )
        return Issued(
            access_token=token,
            issued_token_type=ACCESS_TOKEN_TYPE,
            token_type="DPoP" if request.dpop else "Bearer",  # RFC 9449 / RFC 6750 token type names
            expires_in=prepared.expires_in,
            jti=prepared.jti,
            receipt=receipt,
            grant=grant,
        )

    def _issuance_entry(self, request: ExchangeRequest, grant: Grant, prepared: PreparedToken) -> dict[str, Any]:
        """The ``issuance`` entry of the task token ``prepared`` (its claims' hash, not the token)."""
        credential = {
            "kind": "jwt",
            "jti": prepared.jti,
            "kid": prepared.kid,
            "iat": prepared.claims["iat"],
            "exp": prepared.claims["exp"],
            "claims_sha256": prepared.claims_sha256(),
        }
        if request.dpop is not None:
            credential["cnf_jkt"] = request.dpop.jkt
        if grant.identity.cnf_x5t_s256 is not None:
            credential["cnf_x5t_s256"] = grant.identity.cnf_x5t_s256
        return issuance_entry(
            grant=grant, now=self.clock.now(), request_id=request.request_id, credential=credential,
            approval=request.approval.ledger_ref() if request.approval is not None else None,
            trace_id=request.trace_id,
        )

    async def _append(self, entry: dict[str, Any]) -> Receipt:
        """(3) Append ``entry`` and wait until it is durable (in its span: kind, index, leaf hash)."""
        return await _append_traced(self.spans, entry["kind"], self.ledger.append_async(entry))

    async def _record_refusal(self, request: ExchangeRequest, refusal: _Refusal) -> None:
        """A ``denial`` entry for an attested workload that was refused."""
        error = refusal.error
        rule_id = error.rule_id if isinstance(error, PolicyDenied | DPoPBindingRequired) else None
        entry = denial_entry(
            identity=refusal.identity,
            workload=refusal.workload,
            audience=request.audience,
            intent=request.intent,
            now=self.clock.now(),
            request_id=request.request_id,
            error=error.code,
            reason=error.description,
            rule_id=rule_id,
            policy_version=refusal.policy_version or self.policies.version,
            user=refusal.user,
            parent=refusal.delegation,
            trace_id=request.trace_id,
        )
        receipt = await self._append(entry)
        log.info(
            "denied workload=%s action=%s rule=%s index=%d",
            refusal.identity.spiffe_id, request.intent.action, rule_id, receipt.index,
        )


async def _append_traced(spans: Spans, kind: str, appending: Awaitable[Receipt]) -> Receipt:
    """Await ``appending`` (an append of a ``kind`` entry) in the ``ledger.append`` span: kind, index, leaf hash."""
    if not spans.enabled:
        return await appending
    with spans.span("ledger.append") as span:
        span.set("nhi.ledger.kind", kind)
        receipt = await appending
        span.set("nhi.ledger.index", receipt.index)
        span.set("nhi.ledger.leaf_hash", receipt.leaf_hash)
        return receipt


def _check_approval(grant: Grant, approval: Approval, proof: DPoPProof | None) -> None:
    """The approval must still fit: the same review rule decides, and the same DPoP key holds it."""
    if grant.review is not None and grant.rule_id != approval.record.rule:
        raise PolicyDenied(
            f"the policy changed since approval: rule {grant.rule_id} now decides this intent; ask again",
            rule_id=grant.rule_id, policy_version=grant.policy_version,
        )
    held_jkt = approval.record.dpop_jkt
    if held_jkt is not None and (proof is None or proof.jkt != held_jkt):
        raise DPoPBindingRequired(
            "this request was held with a DPoP key: poll with a proof made with the same key", rule_id=grant.rule_id
        )
