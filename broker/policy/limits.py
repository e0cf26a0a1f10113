"""Limits on what an allow rule grants (``limits.toml``), enforced in the shared state store.

The Casbin rule line stays as it is; a ``[[limit]]`` table names an allow rule by its id and adds:

- ``uses``: the task token may be presented (introspected) at most this many times (1 = single use);
- ``rate``: at most ``N/second|minute|hour|day`` requests per (workload, action);
- ``[limit.budget]``: a cumulative value budget per (workload, end user or conversation, action,
  period) in one ISO 4217 currency, counted in its integer minor units (cents for EUR, yen for JPY;
  see :mod:`broker.money`) so it can never be exceeded by a rounding error.

``per = "conversation"`` reads the intent context's ``conversation``; ``per = "end_user"`` its
``customer`` (the end user the assistant serves, see policies/README.md). Any problem refuses the
whole policy set, as every other policy file does.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from broker.money import CURRENCY_EXPONENTS, to_minor_units

from ._rules import Rule

__all__ = ["BUDGET_SCOPES", "PERIODS", "Budget", "RuleLimits", "parse_limits", "to_minor_units"]

PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
#: Budget scope -> the intent-context key that names it.
BUDGET_SCOPES = {"conversation": "conversation", "end_user": "customer"}
MAX_USES = 1000
_RATE = re.compile(r"([1-9][0-9]{0,6})/(second|minute|hour|day)")
_KEY = re.compile(r"[a-z_][a-z0-9_]{0,63}")
_LIMIT_KEYS = {"rule", "uses", "rate", "budget"}
_BUDGET_KEYS = {"key", "currency", "max", "per", "period"}


@dataclass(frozen=True, slots=True)
class Budget:
    """A cumulative value budget: at most ``max_minor`` minor units of ``currency`` in ``key`` per
    scope and period."""

    key: str
    currency: str
    max_minor: int
    per: str  # "conversation" | "end_user"
    period: str
    period_seconds: int

    @property
    def context_key(self) -> str:
        """The intent-context key that names the budget's scope."""
        return BUDGET_SCOPES[self.per]


@dataclass(frozen=True, slots=True)
class RuleLimits:
    """The limits of one allow rule."""

    rule_id: str
    uses: int | None = None
    rate: tuple[int, int] | None = None  # (requests, window seconds)
    budget: Budget | None = None


def _parse_budget(raw: Any, where: str, problems: list[str]) -> Budget | None:
    if not isinstance(raw, dict):
        problems.append(f"{where}: budget must be a table ([limit.budget])")
        return None
    before = len(problems)
    for key in sorted(set(raw) - _BUDGET_KEYS):
        problems.append(f"{where}: unknown key {key!r} in [limit.budget]")
    for key in ("key", "currency", "max", "per", "period"):
        if key not in raw:
            problems.append(f"{where}: [limit.budget] is missing {key!r}")
    if len(problems) > before:
        return None
    key, currency, per, period = raw["key"], raw["currency"], raw["per"], raw["period"]
    if not isinstance(key, str) or _KEY.fullmatch(key) is None:
        problems.append(f"{where}: budget key must name an intent-context key ([a-z_][a-z0-9_]*)")
    if not isinstance(currency, str) or currency not in CURRENCY_EXPONENTS:
        problems.append(f"{where}: budget currency must be an ISO 4217 code with a minor unit, such as 'EUR'")
        currency = None
    if per not in BUDGET_SCOPES:
        problems.append(f"{where}: budget per must be one of {sorted(BUDGET_SCOPES)}")
    if period not in PERIODS or period == "second":
        problems.append(f"{where}: budget period must be minute, hour or day")
    max_minor = None
    if currency is not None:
        max_minor = to_minor_units(raw["max"], currency) if isinstance(raw["max"], str | int) else None
        if max_minor is None:
            problems.append(f"{where}: budget max must be a positive amount with at most "
                            f"{CURRENCY_EXPONENTS[currency]} decimals for {currency}, "
                            "written as an integer or a string ('200.00')")
    if len(problems) > before:
        return None
    assert max_minor is not None and currency is not None
    return Budget(key=key, currency=currency, max_minor=max_minor, per=per, period=period,
                  period_seconds=PERIODS[period])


def parse_limits(
    text: str, rules: Mapping[str, Rule], filename: str = "limits.toml"
) -> tuple[dict[str, RuleLimits], list[str]]:
    """Validate ``limits.toml`` against the loaded rules. Returns the limits by rule id and every problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return {}, [f"{filename}: not valid TOML ({exc})"]
    problems = [
        f"{filename}: unknown top-level key {k!r} (expected [[limit]] tables)" for k in sorted(set(data) - {"limit"})
    ]
    raw_limits = data.get("limit", [])
    if not isinstance(raw_limits, list) or not all(isinstance(e, dict) for e in raw_limits):
        return {}, [*problems, f"{filename}: 'limit' must be an array of tables ([[limit]])"]
    limits: dict[str, RuleLimits] = {}
    for index, raw in enumerate(raw_limits):
        where = f"{filename} (limit #{index + 1})"
        before = len(problems)
        for key in sorted(set(raw) - _LIMIT_KEYS):
            problems.append(f"{where}: unknown key {key!r} in [[limit]]")
        rule_id = raw.get("rule")
        rule = rules.get(rule_id) if isinstance(rule_id, str) else None
        if rule is None:
            problems.append(f"{where}: rule {rule_id!r} is not a rule id of policy.csv")
        elif rule.effect == "deny":
            problems.append(f"{where}: rule {rule_id!r} is a deny rule; limits apply to allow and review rules")
        elif rule_id in limits:
            problems.append(f"{where}: rule {rule_id!r} already has a [[limit]]")
        if set(raw) <= {"rule"}:
            problems.append(f"{where}: a [[limit]] needs uses, rate or budget")
        uses = raw.get("uses")
        if uses is not None and (isinstance(uses, bool) or not isinstance(uses, int) or not 1 <= uses <= MAX_USES):
            problems.append(f"{where}: uses must be an integer from 1 to {MAX_USES}")
        rate = None
        if "rate" in raw:
            match = _RATE.fullmatch(raw["rate"]) if isinstance(raw["rate"], str) else None
            if match is None:
                problems.append(f"{where}: rate must look like '30/minute' (per second, minute, hour or day)")
            else:
                rate = (int(match.group(1)), PERIODS[match.group(2)])
        budget = _parse_budget(raw["budget"], where, problems) if "budget" in raw else None
        if len(problems) == before:
            assert isinstance(rule_id, str)
            limits[rule_id] = RuleLimits(rule_id=rule_id, uses=uses, rate=rate, budget=budget)
    return (limits, []) if not problems else ({}, problems)
