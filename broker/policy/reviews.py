"""Approval terms of ``review`` rules (``approvals.toml``): who approves, how many, how long to wait.

The Casbin rule line only says ``review``; a ``[[review]]`` table names that rule by its id and adds::

    approvers          the operator group whose members decide (operators get groups in configuration)
    approvals          distinct approvals needed (1 to 10); one denial ends the request
    max_wait           seconds a request may wait for its decision (30 to 86400)
    owner_may_approve  optional, default false: may the workload's own owner be the only approver?

Every review rule needs exactly one table and every table a review rule; any problem refuses the
whole policy set, as every other policy file does.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping

from broker.models import ReviewTerms

from ._rules import Rule

__all__ = ["MAX_APPROVALS", "MAX_WAIT", "MIN_WAIT", "parse_reviews"]

MAX_APPROVALS = 10
MIN_WAIT = 30
MAX_WAIT = 86400
_GROUP = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_KEYS = {"rule", "approvers", "approvals", "max_wait", "owner_may_approve"}


def _int_in(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def parse_reviews(
    text: str | None, rules: Mapping[str, Rule], filename: str = "approvals.toml"
) -> tuple[dict[str, ReviewTerms], list[str]]:
    """Validate ``approvals.toml`` (``None`` when absent) against the rules. Returns terms by rule id
    and every problem."""
    try:
        data = tomllib.loads(text or "")
    except tomllib.TOMLDecodeError as exc:
        return {}, [f"{filename}: not valid TOML ({exc})"]
    problems = [
        f"{filename}: unknown top-level key {k!r} (expected [[review]] tables)" for k in sorted(set(data) - {"review"})
    ]
    raw_terms = data.get("review", [])
    if not isinstance(raw_terms, list) or not all(isinstance(e, dict) for e in raw_terms):
        return {}, [*problems, f"{filename}: 'review' must be an array of tables ([[review]])"]
    terms: dict[str, ReviewTerms] = {}
    for index, raw in enumerate(raw_terms):
        where = f"{filename} (review #{index + 1})"
        before = len(problems)
        for key in sorted(set(raw) - _KEYS):
            problems.append(f"{where}: unknown key {key!r} in [[review]]")
        for key in ("rule", "approvers", "approvals", "max_wait"):
            if key not in raw:
                problems.append(f"{where}: [[review]] is missing {key!r}")
        rule_id = raw.get("rule")
        rule = rules.get(rule_id) if isinstance(rule_id, str) else None
        if rule is None:
            problems.append(f"{where}: rule {rule_id!r} is not a rule id of policy.csv")
        elif rule.effect != "review":
            problems.append(f"{where}: rule {rule_id!r} is a {rule.effect} rule; approval terms need a review rule")
        elif rule_id in terms:
            problems.append(f"{where}: rule {rule_id!r} already has a [[review]]")
        approvers = raw.get("approvers")
        if "approvers" in raw and (not isinstance(approvers, str) or _GROUP.fullmatch(approvers) is None):
            problems.append(f"{where}: approvers must name an operator group ([a-z][a-z0-9_-]*)")
        if "approvals" in raw and not _int_in(raw["approvals"], 1, MAX_APPROVALS):
            problems.append(f"{where}: approvals must be an integer from 1 to {MAX_APPROVALS}")
        if "max_wait" in raw and not _int_in(raw["max_wait"], MIN_WAIT, MAX_WAIT):
            problems.append(f"{where}: max_wait must be a whole number of seconds from {MIN_WAIT} to {MAX_WAIT}")
        owner_may_approve = raw.get("owner_may_approve", False)
        if not isinstance(owner_may_approve, bool):
            problems.append(f"{where}: owner_may_approve must be true or false")
        if len(problems) == before:
            assert isinstance(rule_id, str) and isinstance(approvers, str)
            terms[rule_id] = ReviewTerms(
                rule_id=rule_id, approvers=approvers, approvals=raw["approvals"], max_wait=raw["max_wait"],
                owner_may_approve=owner_may_approve,
            )
    for rule in rules.values():
        if rule.effect == "review" and rule.rule_id not in terms and not any(rule.rule_id in p for p in problems):
            problems.append(f"{rule.source}: review rule {rule.rule_id!r} has no [[review]] table in {filename}")
    return terms, problems
