"""Policy lines (``policy.csv``): parsed with Python's ``csv`` module and validated line by line.

Casbin's own CSV loader splits on every comma, even inside double quotes, so a condition such as
``"currency in ['EUR', 'USD']"`` would break it. We parse each line here (double quotes honoured,
spaces after commas skipped) and hand Casbin the validated rows.

    p, <subject>, <audience>, <action>, <resource>, <condition>, <allow|deny|review>, <rule id>, <ttl>, <kind>
       [, <binding>]
    g, <role>, <parent role>

The effect ``review`` is an allow that waits for human approval: ``approvals.toml`` names who
approves, how many approvals are needed and how long the request may wait.

The optional eleventh column is the sender constraint of an allow (RFC 9449 DPoP): ``optional`` (the
default, also written ``-``), ``dpop`` (the request must carry a DPoP proof) or ``dpop-identity-key``
(the proof must be made with the key the workload identity is bound to). Casbin never sees it.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from broker.vault.kinds import parse_vault_kind

from ._conditions import Condition, ConditionError, compile_condition
from ._patterns import (
    ActionPattern,
    PatternError,
    ResourcePattern,
    audience_matches,
    check_audience_pattern,
    compile_action_pattern,
    compile_resource_pattern,
)
from .registry import NAME_RE

__all__ = [
    "ANY_WORKLOAD",
    "BINDINGS",
    "CREDENTIAL_KINDS",
    "EFFECTS",
    "MAX_TTL",
    "RULE_ID_RE",
    "ParsedPolicy",
    "Rule",
    "parse_policy_lines",
]

# Credential kinds a rule may name as is; ``vault-*`` kinds carry a target (see broker.vault.kinds).
CREDENTIAL_KINDS = frozenset({"jwt"})
MAX_TTL = 86400
RULE_ID_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
# The subject ``*`` is every registered workload: the loader links each workload to it.
ANY_WORKLOAD = "*"
#: Sender constraints a rule may demand, from the weakest to the strictest.
BINDINGS: tuple[str, ...] = ("optional", "dpop", "dpop-identity-key")
_TTL_RE = re.compile(r"[1-9][0-9]{0,5}")
_P_COLUMNS = 10
_G_COLUMNS = 3


@dataclass(frozen=True, slots=True)
class Rule:
    """One validated ``p`` line. ``ttl`` and ``kind`` are ``None`` on deny rules written with ``-``."""

    rule_id: str
    subject: str
    audience: str
    action: str
    resource: str
    condition_text: str
    effect: str  # "allow" | "deny" | "review" (an allow that waits for human approval)
    ttl: int | None
    kind: str | None
    source: str  # "policy.csv:14"
    action_pattern: ActionPattern = field(repr=False, compare=False)
    resource_pattern: ResourcePattern = field(repr=False, compare=False)
    condition: Condition = field(repr=False, compare=False)
    binding: str = "optional"  # one of BINDINGS

    def casbin_row(self) -> list[str]:
        """The row as Casbin sees it: ``p = sub, aud, act, obj, cond, eft, id, ttl, kind``.

        A ``review`` rule is an allow to Casbin (deny still wins over it); the engine then holds the
        request for approval instead of issuing.
        """
        return [
            self.subject,
            self.audience,
            self.action,
            self.resource,
            self.condition_text,
            "allow" if self.effect == "review" else self.effect,
            self.rule_id,
            "-" if self.ttl is None else str(self.ttl),
            "-" if self.kind is None else self.kind,
        ]

    def matches(
        self, subjects: frozenset[str], audience: str, action: str, resource: str, ctx: Mapping[str, Any]
    ) -> bool:
        """The matcher evaluated directly (same functions Casbin calls); ``subjects`` are the
        workload's name, its roles (transitively) and ``*``."""
        return (
            self.subject in subjects
            and audience_matches(audience, self.audience)
            and self.action_pattern.matches(action)
            and self.resource_pattern.matches(resource, ctx)
            and self.condition.matches(ctx)
        )


@dataclass
class ParsedPolicy:
    """The rules and role links of one ``policy.csv``, in file order."""

    rules: list[Rule] = field(default_factory=list)
    links: list[tuple[str, str, str]] = field(default_factory=list)  # (role, parent, source)


def _lines(text: str) -> list[tuple[int, str]]:
    out = []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            out.append((number, line))
    return out


EFFECTS = ("allow", "deny", "review")


def _effect_problem(value: str) -> str | None:
    if value in EFFECTS:
        return None
    if value.strip().lower() in EFFECTS:
        return (
            f"effect {value!r} must be spelt exactly 'allow', 'deny' or 'review': Casbin treats any other "
            "spelling as neither, so a misspelt deny would not deny"
        )
    return f"effect {value!r} must be 'allow', 'deny' or 'review'"


def _parse_p(
    fields: list[str], where: str, conditions: dict[str, Condition], problems: list[str]
) -> Rule | None:
    before = len(problems)
    _, subject, audience, action, resource, cond_text, effect, rule_id, ttl_text, kind = fields[:_P_COLUMNS]
    binding = fields[_P_COLUMNS] if len(fields) > _P_COLUMNS else "optional"
    binding = "optional" if binding == "-" else binding
    if binding != "optional" and effect == "deny":
        problems.append(f"{where}: a deny rule issues nothing and cannot demand a binding")
    if RULE_ID_RE.fullmatch(rule_id) is None:
        problems.append(f"{where}: rule id {rule_id!r} must match [a-z0-9][a-z0-9_.-]* (at most 64)")
    if subject != ANY_WORKLOAD and NAME_RE.fullmatch(subject) is None:
        problems.append(f"{where}: subject {subject!r} must be a role, a workload name or '*'")
    try:
        check_audience_pattern(audience)
    except PatternError as exc:
        problems.append(f"{where}: {exc}")
    action_pattern = resource_pattern = condition = None
    try:
        action_pattern = compile_action_pattern(action)
    except PatternError as exc:
        problems.append(f"{where}: {exc}")
    try:
        resource_pattern = compile_resource_pattern(resource)
    except PatternError as exc:
        problems.append(f"{where}: {exc}")
    condition = conditions.get(cond_text)
    if condition is None:
        try:
            condition = conditions[cond_text] = compile_condition(cond_text)
        except ConditionError as exc:
            problems.append(f"{where}: condition {cond_text!r}: {exc}")
    if (effect_problem := _effect_problem(effect)) is not None:
        problems.append(f"{where}: {effect_problem}")
    ttl: int | None = None
    kind_value: str | None = None
    if effect == "deny" and ttl_text == "-" and kind == "-":
        pass  # a deny issues nothing: ttl and kind may be written as '-'
    else:
        if _TTL_RE.fullmatch(ttl_text) is None or int(ttl_text) > MAX_TTL:
            problems.append(
                f"{where}: ttl {ttl_text!r} must be a whole number of seconds from 1 to {MAX_TTL}"
            )
        else:
            ttl = int(ttl_text)
        if kind in CREDENTIAL_KINDS:
            kind_value = kind
        elif kind.startswith("vault-"):
            try:
                vault_kind = parse_vault_kind(kind)
                kind_value = kind
            except ValueError as exc:
                problems.append(f"{where}: {exc}")
            else:
                # The scope value is a resource segment the pattern already checked (no quotes, no
                # separators), never free context text: the rule must bind it as {key}.
                if vault_kind.rows is not None and (
                    resource_pattern is None or vault_kind.rows not in resource_pattern.context_keys
                ):
                    problems.append(
                        f"{where}: kind {kind!r} scopes rows by context {vault_kind.rows!r}, so the resource "
                        f"pattern must bind {{{vault_kind.rows}}} (e.g. customers/{{{vault_kind.rows}}}/orders)"
                    )
        else:
            problems.append(
                f"{where}: credential kind {kind!r} is not one of {sorted(CREDENTIAL_KINDS)} or a vault-* kind"
            )
    if len(problems) > before:
        return None
    assert action_pattern is not None and resource_pattern is not None and condition is not None
    return Rule(
        rule_id=rule_id,
        subject=subject,
        audience=audience,
        action=action,
        resource=resource,
        condition_text=cond_text,
        effect=effect,
        ttl=ttl,
        kind=kind_value,
        source=where,
        binding=binding,
        action_pattern=action_pattern,
        resource_pattern=resource_pattern,
        condition=condition,
    )


def parse_policy_lines(text: str, filename: str = "policy.csv") -> tuple[ParsedPolicy, list[str]]:
    """Parse and validate every line; returns what parsed and every problem (``file:line: why``)."""
    parsed = ParsedPolicy()
    problems: list[str] = []
    conditions: dict[str, Condition] = {}
    seen_ids: dict[str, str] = {}
    for number, line in _lines(text):
        where = f"{filename}:{number}"
        try:
            fields = next(csv.reader([line], skipinitialspace=True, strict=True))
        except csv.Error as exc:
            problems.append(f"{where}: not a valid CSV line ({exc})")
            continue
        kind = fields[0]
        if kind == "p":
            binding_ok = len(fields) == _P_COLUMNS or (
                len(fields) == _P_COLUMNS + 1 and fields[_P_COLUMNS] in (*BINDINGS, "-")
            )
            if not binding_ok:
                problems.append(
                    f"{where}: a 'p' line has {_P_COLUMNS - 1} fields after 'p' "
                    "(subject, audience, action, resource, condition, effect, id, ttl, kind), then optionally "
                    f"a binding ({', '.join(BINDINGS)}); "
                    f"found {len(fields) - 1} (quote a condition that contains a comma)"
                )
                continue
            rule = _parse_p(fields, where, conditions, problems)
            rule_id = fields[7]
            if rule_id in seen_ids:
                problems.append(f"{where}: rule id {rule_id!r} is already used at {seen_ids[rule_id]}")
                continue
            seen_ids[rule_id] = where
            if rule is not None:
                parsed.rules.append(rule)
        elif kind == "g":
            if len(fields) != _G_COLUMNS:
                problems.append(
                    f"{where}: a 'g' line is 'g, <role>, <parent role>'; found {len(fields) - 1} fields"
                )
                continue
            role, parent = fields[1], fields[2]
            bad = [n for n in (role, parent) if NAME_RE.fullmatch(n) is None]
            if bad:
                problems.append(f"{where}: role name {bad[0]!r} must be a lower-case name ([a-z][a-z0-9_-]*)")
            elif role == parent:
                problems.append(f"{where}: role {role!r} cannot inherit from itself")
            else:
                parsed.links.append((role, parent, where))
        else:
            problems.append(f"{where}: unknown line type {kind!r} (expected 'p' or 'g')")
    return parsed, problems
