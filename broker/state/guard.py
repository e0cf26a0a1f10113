"""Checks between an allow decision and minting: kill switch, request rates, value budgets.

:meth:`IssuanceGuard.admit` runs after the intent policy allowed a request and before anything is
minted. It raises an :class:`~broker.errors.AccessDenied` (recorded as a ``denial`` entry by the
pipeline) or :class:`~broker.errors.StoreUnavailable` (503: fail closed), and otherwise returns
the extra claims the rule's limits put in the token (``num_uses``).

All of a request's checks (the identity token's single use, the kill switch, the rate, the budget)
are one atomic store call (:meth:`~broker.state.store.StateStore.run_checks`: one Lua script on
Redis, one transaction on SQLite) that refuses to pass any limit, so concurrent requests on any
number of replicas never exceed a rate or a budget, not even by one cent. A budget
is charged when the request is admitted; if the ledger then fails, the charge stays (the safe side).
Where one storage process holds both the SQLite state file and the ledger (``serve`` with several
workers on embedded SQLite), :meth:`IssuanceGuard.admit_and_append` makes that call and appends the
issuance entry in one round trip.
Windows are fixed UTC periods (``floor(now / period)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any, NoReturn

from broker.clock import Clock
from broker.errors import BrokerError, BudgetExceeded, PolicyDenied, RateLimited, ReplayDetected, WorkloadSuspended
from broker.models import Grant
from broker.money import CURRENCY_EXPONENTS, to_minor_units
from broker.policy.limits import Budget, RuleLimits
from broker.state.store import Check, ConsumeOnce, CountUp, NoMark, StateStore, valid_prefix
from broker.state.tokens import TokenState
from broker.storaged.handlers import checks_to_wire

if TYPE_CHECKING:
    from broker.ledger.log import Ledger
    from broker.models import Receipt

__all__ = ["IssuanceGuard"]

_NS_RATE = "rate"
_NS_BUDGET = "budget"


def _amount(minor: int, currency: str) -> str:
    return str(Decimal(minor).scaleb(-CURRENCY_EXPONENTS[currency]))


class IssuanceGuard:
    """Enforces replay, suspensions and the rate and budget limits of ``limits.toml`` at issuance."""

    def __init__(self, store: StateStore, tokens: TokenState, clock: Clock, *, ledger: Ledger | None = None) -> None:
        self._store = store
        self._tokens = tokens
        self._clock = clock
        # Only a ledger whose storage process also holds this store's file (Ledger.append_if_admitted).
        self._ledger = ledger if ledger is not None and ledger.appends_with_state_checks else None

    @property
    def appends_on_admission(self) -> bool:
        """Whether :meth:`admit_and_append` is available (admission and entry in one round trip)."""
        return self._ledger is not None

    @staticmethod
    def token_claims(limits: RuleLimits | None) -> dict[str, Any]:
        """The extra task-token claims the rule's limits put in the token (``num_uses``)."""
        return {"num_uses": limits.uses} if limits is not None and limits.uses is not None else {}

    async def admit(
        self, grant: Grant, limits: RuleLimits | None, *, count_rate: bool = True, replay: Sequence[ConsumeOnce] = (),
    ) -> dict[str, Any]:
        """Admit ``grant`` or raise; returns extra task-token claims.

        ``replay`` are the request's single-use values (the identity token's ``jti``), consumed first
        in the same store round trip (:class:`~broker.errors.ReplayDetected` if one was seen before).
        ``count_rate=False`` when the request was already counted: an approved intent, whose rate was
        counted when it was held (:meth:`admit_hold`).
        """
        checks, refusal = self._admission(grant, limits, count_rate, replay, self._clock.now())
        await self._run(grant, checks, limits)
        if refusal is not None:
            raise refusal
        return self.token_claims(limits)

    async def admit_and_append(
        self, grant: Grant, limits: RuleLimits | None, entry: dict[str, Any], *, count_rate: bool = True,
        replay: Sequence[ConsumeOnce] = (),
    ) -> Receipt:
        """:meth:`admit`, and append ``entry`` (the issuance, its token built with :meth:`token_claims`)
        only if admitted, in one storage round trip (:attr:`appends_on_admission`); its receipt.

        Raises as :meth:`admit` does, with nothing appended; :class:`~broker.errors.LedgerUnavailable`
        when the entry could not be made durable after the checks passed (their effects stay).
        """
        if self._ledger is None:
            raise RuntimeError("admit_and_append needs a ledger sharing the state store's storage process")
        now = self._clock.now()
        checks, refusal = self._admission(grant, limits, count_rate, replay, now)
        if refusal is not None:  # refused once the checks before it pass: nothing to append
            await self._run(grant, checks, limits)
            raise refusal
        todo, failed = valid_prefix(checks)
        if not todo:  # the first check can never pass (a count above its limit): no round trip
            self._refuse(grant, checks[0], limits)
        outcome = await self._ledger.append_if_admitted(entry, checks_to_wire(todo), failed, now)
        if isinstance(outcome, int):
            self._refuse(grant, checks[outcome], limits)
        return outcome

    def _admission(
        self, grant: Grant, limits: RuleLimits | None, count_rate: bool, replay: Sequence[ConsumeOnce], now: float
    ) -> tuple[list[Check], BrokerError | None]:
        """The checks of an admission, and the refusal due once they pass (a malformed amount)."""
        # (0) single use, (1) the kill switch beats every allow, (2) request rate per (workload,
        # action), (3) cumulative value budget: one atomic store call, in this order.
        checks: list[Check] = [*replay, self._tokens.not_suspended(grant.workload.name)]
        if limits is not None and count_rate:
            checks += self._rate_checks(grant, limits, now)
        if limits is not None and limits.budget is not None:
            budget = self._budget_check(grant, limits.budget, now)
            if isinstance(budget, BrokerError):
                return checks, budget  # a malformed amount is refused once the checks before it passed
            checks.append(budget)
        return checks, None

    async def admit_hold(
        self, grant: Grant, limits: RuleLimits | None, *, replay: Sequence[ConsumeOnce] = ()
    ) -> None:
        """Admit an intent to be held for review, or raise: a suspended workload cannot queue requests
        for approvers, and holds count toward the rule's request rate. Budgets are charged only when
        the approved intent is issued."""
        checks: list[Check] = [*replay, self._tokens.not_suspended(grant.workload.name)]
        if limits is not None:
            checks += self._rate_checks(grant, limits, self._clock.now())
        await self._run(grant, checks, limits)

    async def consume(self, replay: Sequence[ConsumeOnce]) -> None:
        """Consume single-use values alone (a request refused before admission); raises on a replay."""
        if replay and await self._store.run_checks(replay) is not None:
            raise ReplayDetected("subject_token has already been used")

    async def _run(self, grant: Grant, checks: list[Check], limits: RuleLimits | None) -> None:
        failed = await self._store.run_checks(checks)
        if failed is not None:
            self._refuse(grant, checks[failed], limits)

    def _refuse(self, grant: Grant, check: Check, limits: RuleLimits | None) -> NoReturn:
        """The refusal of the admission ``check`` failed."""
        deny = {"rule_id": grant.rule_id, "policy_version": grant.policy_version}
        if isinstance(check, ConsumeOnce):
            raise ReplayDetected("subject_token has already been used")
        if isinstance(check, NoMark):
            raise WorkloadSuspended(f"workload {grant.workload.name!r} is suspended by an operator")
        assert limits is not None
        if check.namespace == _NS_RATE and limits.rate is not None:
            count, seconds = limits.rate
            raise RateLimited(
                f"rule {grant.rule_id!r} allows {count} requests per {seconds} s for this workload and action",
                **deny, retry_after=max(1, math.ceil(check.expires_at - self._clock.now())),
            )
        budget = limits.budget
        assert budget is not None
        unit = budget.currency
        raise BudgetExceeded(
            f"rule {grant.rule_id!r} allows at most {_amount(budget.max_minor, unit)} {unit} per {budget.per} "
            f"per {budget.period}; this request of {_amount(check.amount, unit)} {unit} would exceed it", **deny,
        )

    @staticmethod
    def _rate_checks(grant: Grant, limits: RuleLimits, now: float) -> list[Check]:
        if limits.rate is None:
            return []
        count, seconds = limits.rate
        window = int(now // seconds)
        key = f"{grant.workload.name}\x00{grant.intent.action}\x00{seconds}\x00{window}"
        return [CountUp(_NS_RATE, key, 1, count, (window + 1) * seconds)]

    @staticmethod
    def _budget_check(grant: Grant, budget: Budget, now: float) -> CountUp | BrokerError:
        context = grant.intent.context
        deny = {"rule_id": grant.rule_id, "policy_version": grant.policy_version}
        if context.get("currency") != budget.currency:
            return PolicyDenied(f"rule {grant.rule_id!r} budgets {budget.currency} only", **deny)
        value = context.get(budget.key)
        # A JSON number only: the intent parser has made it exact (broker.money).
        minor = to_minor_units(value, budget.currency) if isinstance(value, int | float) else None
        if minor is None:
            return PolicyDenied(
                f"rule {grant.rule_id!r} has a budget: context.{budget.key} must be a positive amount "
                f"with at most {CURRENCY_EXPONENTS[budget.currency]} decimals for {budget.currency}", **deny,
            )
        # A request that does not name its scope shares one bucket with every other such request of
        # the workload: leaving the key out can only make the budget tighter, never bypass it.
        scope = context.get(budget.context_key)
        if budget.per == "end_user" and grant.user is not None:
            scope = grant.user.subject  # the verified end user, not the bot's assertion (docs/delegation.md)
        scope_value = scope if isinstance(scope, str) else ""
        key, expires_at = _budget_key(grant.workload.name, grant.intent.action, budget, scope_value, now)
        return CountUp(_NS_BUDGET, key, minor, budget.max_minor, expires_at)

    async def budget_used(self, workload: str, action: str, budget: Budget, scope: str) -> tuple[int, float]:
        """Minor units of ``budget`` that ``workload`` used for ``action`` in ``scope`` this period, and
        when the period ends (for the console). Adding zero is a read: no budget changes."""
        key, expires_at = _budget_key(workload, action, budget, scope, self._clock.now())
        used = await self._store.count_up(_NS_BUDGET, key, 0, 2**53, expires_at)
        return (used or 0), expires_at


def _budget_key(workload: str, action: str, budget: Budget, scope: str, now: float) -> tuple[str, float]:
    """The budget counter's key for this period, and the period's end (fixed UTC windows)."""
    window = int(now // budget.period_seconds)
    key = "\x00".join((workload, budget.per, scope, action, budget.period, str(window)))
    return key, (window + 1) * budget.period_seconds
