"""What an approver sees beside a held request: why it was held, the workload's history, budget use.

- the deciding rule (its line in ``policy.csv``, its parts and condition), each clause evaluated on
  the held intent's context, with a note when the policy changed since the request was held;
- the workload's recent decisions for the same customer or conversation, from the ledger;
- the value budgets (``limits.toml``) of the rules for the same action, and how much of each this
  workload used in the request's scope (conversation or end user) this period.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from broker.approvals.desk import PendingApproval
from broker.models import Intent
from broker.money import CURRENCY_EXPONENTS
from broker.policy.engine import PolicySet, policy_context
from broker.policy.limits import Budget
from broker.state.guard import IssuanceGuard

__all__ = ["budget_use", "deciding_rule"]


def _money(minor: int, currency: str) -> str:
    return f"{Decimal(minor).scaleb(-CURRENCY_EXPONENTS[currency]):f} {currency}"


def deciding_rule(policies: PolicySet, record: PendingApproval) -> dict[str, Any] | None:
    """The rule that held ``record``, as the current policy set has it, its clauses evaluated."""
    rule = next((r for r in policies.rules if r.rule_id == record.rule), None)
    if rule is None:
        return None
    intent = record.intent
    ctx = policy_context(Intent(str(intent.get("action", "")), str(intent.get("resource", "")),
                                dict(intent.get("context") or {})), record.end_user())
    clauses = [{"text": clause.describe(ctx), "holds": clause.evaluate(ctx)} for clause in rule.condition.clauses]
    terms = policies.reviews.get(rule.rule_id)
    return {
        "id": rule.rule_id, "source": rule.source, "effect": rule.effect, "subject": rule.subject,
        "audience": rule.audience, "action": rule.action, "resource": rule.resource,
        "condition": rule.condition_text or "(none: always true)", "clauses": clauses,
        "ttl": rule.ttl, "kind": rule.kind,
        "terms": None if terms is None else {"approvers": terms.approvers, "approvals": terms.approvals,
                                             "max_wait": terms.max_wait},
        "same_policy": policies.version == record.policy_version, "policy_version": policies.version,
    }


def _scope(budget: Budget, record: PendingApproval) -> str:
    context = record.intent.get("context") or {}
    if budget.per == "end_user" and record.user is not None:
        return str(record.user.get("sub", ""))
    value = context.get(budget.context_key)
    return value if isinstance(value, str) else ""


async def budget_use(policies: PolicySet, guard: IssuanceGuard, record: PendingApproval) -> list[dict[str, Any]]:
    """Every value budget of a rule for the held intent's action and audience, with this workload's use."""
    action = str(record.intent.get("action", ""))
    context = record.intent.get("context") or {}
    workload = str(record.workload.get("name", ""))
    rows = []
    for rule in policies.rules:
        limits = policies.limits.get(rule.rule_id)
        if limits is None or limits.budget is None or not rule.action_pattern.matches(action):
            continue
        if rule.audience not in ("*", record.audience):
            continue
        budget = limits.budget
        scope = _scope(budget, record)
        used, ends = await guard.budget_used(workload, action, budget, scope)
        amount = context.get(budget.key)
        rows.append({
            "rule": rule.rule_id, "per": budget.per, "scope": scope or "(none named)", "period": budget.period,
            "used": _money(used, budget.currency), "max": _money(budget.max_minor, budget.currency),
            "left": _money(max(0, budget.max_minor - used), budget.currency),
            "percent": min(100, round(100 * used / budget.max_minor)) if budget.max_minor else 100,
            "ends": ends,
            "request": f"{amount} {context.get('currency', '')}".strip() if isinstance(amount, int | float) else "",
        })
    return rows
