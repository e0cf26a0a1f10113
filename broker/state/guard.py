"""Checks between an allow decision and minting: kill switch, request rates, value budgets.

:meth:`IssuanceGuard.admit` runs after the intent policy allowed a request and before anything is
minted. It raises an :class:`~broker.errors.AccessDenied` (recorded as a ``denial`` entry by the
pipeline) or :class:`~broker.errors.StoreUnavailable` (503: fail closed), and otherwise returns
the extra claims the rule's limits put in the token (``num_uses``).

Each counter is advanced by one atomic store call that refuses to pass its limit, so concurrent
requests on any number of replicas never exceed a rate or a budget, not even by one cent. A budget
is charged when the request is admitted; if the ledger then fails, the charge stays (the safe side).
Windows are fixed UTC periods (``floor(now / period)``).
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

from broker.clock import Clock
from broker.errors import BudgetExceeded, PolicyDenied, RateLimited, WorkloadSuspended
from broker.models import Grant
from broker.money import CURRENCY_EXPONENTS, to_minor_units
from broker.policy.limits import Budget, RuleLimits
from broker.state.tokens import TokenState
from broker.store.base import StateStore

__all__ = ["IssuanceGuard"]

_NS_RATE = "rate"
_NS_BUDGET = "budget"


def _amount(minor: int, currency: str) -> str:
    return str(Decimal(minor).scaleb(-CURRENCY_EXPONENTS[currency]))


class IssuanceGuard:
    """Enforces suspensions and the rate and budget limits of ``limits.toml`` at issuance."""

    def __init__(self, store: StateStore, tokens: TokenState, clock: Clock) -> None:
        self._store = store
        self._tokens = tokens
        self._clock = clock

    def admit(self, grant: Grant, limits: RuleLimits | None, *, count_rate: bool = True) -> dict[str, Any]:
        """Admit ``grant`` or raise; returns extra task-token claims.

        ``count_rate=False`` when the request was already counted: an approved intent, whose rate was
        counted when it was held (:meth:`admit_hold`).
        """
        # (1) the kill switch beats every allow.
        self._check_not_suspended(grant)
        if limits is None:
            return {}
        now = self._clock.now()
        # (2) request rate per (workload, action).
        if count_rate:
            self._count_rate(grant, limits, now)
        # (3) cumulative value budget.
        if limits.budget is not None:
            self._charge(grant, limits.budget, now)
        return {"num_uses": limits.uses} if limits.uses is not None else {}

    def admit_hold(self, grant: Grant, limits: RuleLimits | None) -> None:
        """Admit an intent to be held for review, or raise: a suspended workload cannot queue requests
        for approvers, and holds count toward the rule's request rate. Budgets are charged only when
        the approved intent is issued."""
        self._check_not_suspended(grant)
        if limits is not None:
            self._count_rate(grant, limits, self._clock.now())

    def _check_not_suspended(self, grant: Grant) -> None:
        if self._tokens.suspended_since(grant.workload.name) is not None:
            raise WorkloadSuspended(f"workload {grant.workload.name!r} is suspended by an operator")

    def _count_rate(self, grant: Grant, limits: RuleLimits, now: float) -> None:
        if limits.rate is not None:
            count, seconds = limits.rate
            window = int(now // seconds)
            key = f"{grant.workload.name}\x00{grant.intent.action}\x00{seconds}\x00{window}"
            frees_at = (window + 1) * seconds
            if self._store.count_up(_NS_RATE, key, 1, count, frees_at) is None:
                raise RateLimited(
                    f"rule {grant.rule_id!r} allows {count} requests per {seconds} s for this workload and action",
                    rule_id=grant.rule_id, policy_version=grant.policy_version,
                    retry_after=max(1, math.ceil(frees_at - now)),
                )

    def _charge(self, grant: Grant, budget: Budget, now: float) -> None:
        context = grant.intent.context
        deny = {"rule_id": grant.rule_id, "policy_version": grant.policy_version}
        if context.get("currency") != budget.currency:
            raise PolicyDenied(f"rule {grant.rule_id!r} budgets {budget.currency} only", **deny)
        value = context.get(budget.key)
        # A JSON number only: the intent parser has made it exact (broker.money).
        minor = to_minor_units(value, budget.currency) if isinstance(value, int | float) else None
        if minor is None:
            raise PolicyDenied(
                f"rule {grant.rule_id!r} has a budget: context.{budget.key} must be a positive amount "
                f"with at most {CURRENCY_EXPONENTS[budget.currency]} decimals for {budget.currency}", **deny,
            )
        # A request that does not name its scope shares one bucket with every other such request of
        # the workload: leaving the key out can only make the budget tighter, never bypass it.
        scope = context.get(budget.context_key)
        if budget.per == "end_user" and grant.user is not None:
            scope = grant.user.subject  # the verified end user, not the bot's assertion (docs/delegation.md)
        scope_value = scope if isinstance(scope, str) else ""
        window = int(now // budget.period_seconds)
        key = "\x00".join(
            (grant.workload.name, budget.per, scope_value, grant.intent.action, budget.period, str(window))
        )
        expires = (window + 1) * budget.period_seconds
        if self._store.count_up(_NS_BUDGET, key, minor, budget.max_minor, expires) is None:
            unit = budget.currency
            raise BudgetExceeded(
                f"rule {grant.rule_id!r} allows at most {_amount(budget.max_minor, unit)} {unit} per {budget.per} "
                f"per {budget.period}; this request of {_amount(minor, unit)} {unit} would exceed it", **deny,
            )
