"""Policy test cases (``tests.toml``), run by ``nhi-broker policy test`` the way ``opa test`` runs Rego tests.

Each case is a request and the outcome the security engineer expects::

    [[case]]
    name = "support refunds 20 EUR"
    workload = "spiffe://example.org/ns/support/sa/support-assistant"
    method = "spiffe-jwt"            # optional, default "spiffe-jwt"
    audience = "payments-api"
    action = "payments.refund"
    resource = "customers/c-1001/orders/o-77"
    context = { customer = "c-1001", amount = 20, currency = "EUR" }
    expect = "allow"                 # allow | review | deny | unregistered | invalid_target
    rule = "refund-small-eur"        # optional; "" expects no deciding rule (default deny)
    ttl = 120                        # optional; the expected max TTL of an allow
    binding = "optional"             # optional; the expected sender constraint of an allow
    kind = "jwt"                     # optional; the expected credential kind of an allow
    user = { sub = "c-1001", iss = "https://login.example.org", tenant = "acme" }
                                     # optional: a delegated request for this verified end user
                                     # (sub and iss required; other keys are mapped claims, user.<key>)

A case runs the broker's own path: :meth:`PolicySet.resolve_workload` (``unregistered``), then
:meth:`PolicySet.authorize` (``invalid_target`` when the audience is not registered for the
workload, ``deny`` on a policy deny, ``allow`` with the granted rule and TTL).
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.errors import InvalidTarget, PolicyDenied, PolicyLoadError, UnregisteredWorkload
from broker.intent import CONTEXT_KEY_RE
from broker.models import EndUser, Intent, WorkloadIdentity

from ._rules import BINDINGS
from .engine import PolicySet
from .loader import load_policies
from .registry import ATTESTATION_METHODS

__all__ = [
    "OUTCOMES", "PolicyTestCase", "PolicyTestResult", "lint_policies", "load_cases", "run_case", "run_policy_tests",
]

OUTCOMES = ("allow", "review", "deny", "unregistered", "invalid_target")
_KEYS = frozenset(
    {"name", "workload", "method", "audience", "action", "resource", "context", "expect", "rule", "ttl", "binding",
     "kind", "user"}
)
_REQUIRED = ("name", "workload", "audience", "action", "resource", "expect")
_HEADER_RE = re.compile(r"\s*\[\[\s*case\s*\]\]\s*(?:#.*)?")
_TEST_ISSUER = "nhi-broker policy test"
_NO_EVIDENCE = "sha256:" + "0" * 64


@dataclass(frozen=True)
class PolicyTestCase:
    """One validated ``[[case]]``. ``rule`` is ``None`` when the case does not check the rule."""

    name: str
    workload: str
    audience: str
    action: str
    resource: str
    expect: str
    source: str
    method: str = "spiffe-jwt"
    context: dict[str, Any] = field(default_factory=dict)
    rule: str | None = None
    ttl: int | None = None
    binding: str | None = None
    kind: str | None = None
    user: EndUser | None = None


@dataclass(frozen=True)
class PolicyTestResult:
    """The outcome of one case: what happened, and whether it is what the case expected."""

    case: PolicyTestCase
    passed: bool
    outcome: str
    rule_id: str | None
    max_ttl: int | None
    message: str

    @property
    def name(self) -> str:
        return self.case.name


def _check_context(value: Any, where: str, problems: list[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        problems.append(f"{where}: context must be a table")
        return {}
    for key, item in value.items():
        if CONTEXT_KEY_RE.fullmatch(key) is None:
            problems.append(f"{where}: context key {key!r} is not a lower-case identifier")
        elif isinstance(item, list):
            if not all(isinstance(v, str) for v in item):
                problems.append(f"{where}: context.{key} lists must hold strings only")
        elif isinstance(item, float) and not math.isfinite(item):
            problems.append(f"{where}: context.{key} must be a finite number")
        elif not isinstance(item, str | int | float | bool):
            problems.append(f"{where}: context.{key} must be a string, number, boolean or list of strings")
    return value


def _parse_case(raw: dict[str, Any], where: str, problems: list[str]) -> PolicyTestCase | None:
    before = len(problems)
    for key in sorted(set(raw) - _KEYS):
        problems.append(f"{where}: unknown key {key!r} in [[case]]")
    for key in _REQUIRED:
        if key not in raw:
            problems.append(f"{where}: [[case]] is missing {key!r}")
        elif not isinstance(raw[key], str) or not raw[key]:
            problems.append(f"{where}: {key} must be a non-empty string")
    if len(problems) > before:
        return None
    if raw["expect"] not in OUTCOMES:
        problems.append(f"{where}: expect {raw['expect']!r} must be one of {', '.join(OUTCOMES)}")
    method = raw.get("method", "spiffe-jwt")
    if method not in ATTESTATION_METHODS:
        problems.append(f"{where}: method {method!r} is not one of {sorted(ATTESTATION_METHODS)}")
    rule = raw.get("rule")
    if rule is not None and not isinstance(rule, str):
        problems.append(f'{where}: rule must be a rule id, or "" for no deciding rule')
    ttl = raw.get("ttl")
    if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool) or ttl <= 0):
        problems.append(f"{where}: ttl must be a positive whole number of seconds")
    binding = raw.get("binding")
    if binding is not None and binding not in BINDINGS:
        problems.append(f"{where}: binding must be one of {', '.join(BINDINGS)}")
    kind = raw.get("kind")
    if kind is not None and (not isinstance(kind, str) or not kind):
        problems.append(f"{where}: kind must be a credential kind such as 'jwt' or 'vault-db:<role>'")
    context = _check_context(raw.get("context", {}), where, problems)
    user = _parse_user(raw.get("user"), where, problems)
    if len(problems) > before:
        return None
    return PolicyTestCase(
        name=raw["name"],
        workload=raw["workload"],
        audience=raw["audience"],
        action=raw["action"],
        resource=raw["resource"],
        expect=raw["expect"],
        source=where,
        method=method,
        context=dict(context),
        rule=rule,
        ttl=ttl,
        binding=binding,
        kind=kind,
        user=user,
    )


def _parse_user(raw: Any, where: str, problems: list[str]) -> EndUser | None:
    """A case's verified end user: ``{ sub, iss, <mapped claims> }``."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        problems.append(f"{where}: user must be a table {{ sub = ..., iss = ..., <claim> = ... }}")
        return None
    sub, iss = raw.get("sub"), raw.get("iss")
    if not isinstance(sub, str) or not sub or not isinstance(iss, str) or not iss:
        problems.append(f"{where}: user needs sub and iss (non-empty strings)")
        return None
    claims = {k: v for k, v in raw.items() if k not in ("sub", "iss")}
    for key, value in claims.items():
        if CONTEXT_KEY_RE.fullmatch(key) is None or key == "delegated":
            problems.append(f"{where}: user.{key} is not a mapped claim name (a lower-case identifier)")
        elif not isinstance(value, str | int | float | bool):
            problems.append(f"{where}: user.{key} must be a string, number or boolean")
    return EndUser(issuer=iss, subject=sub, claims=claims)


def load_cases(path: Path) -> list[PolicyTestCase]:
    """Parse and validate ``tests.toml``; raise :class:`PolicyLoadError` listing every problem."""
    filename = Path(path).name
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyLoadError([f"{filename}: missing"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyLoadError([f"{filename}: cannot be read ({type(exc).__name__})"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyLoadError([f"{filename}: not valid TOML ({exc})"]) from None
    problems = [
        f"{filename}: unknown top-level key {k!r} (expected [[case]] tables)"
        for k in sorted(set(data) - {"case"})
    ]
    raw_cases = data.get("case", [])
    if not isinstance(raw_cases, list) or not all(isinstance(c, dict) for c in raw_cases):
        raise PolicyLoadError([*problems, f"{filename}: 'case' must be an array of tables ([[case]])"])
    lines = [n for n, line in enumerate(text.splitlines(), start=1) if _HEADER_RE.fullmatch(line)]
    cases: list[PolicyTestCase] = []
    names: dict[str, str] = {}
    for index, raw in enumerate(raw_cases):
        where = f"{filename}:{lines[index]}" if index < len(lines) else f"{filename} (case #{index + 1})"
        case = _parse_case(raw, where, problems)
        if case is None:
            continue
        if case.name in names:
            problems.append(f"{where}: case name {case.name!r} is already used at {names[case.name]}")
            continue
        names[case.name] = where
        cases.append(case)
    if problems:
        raise PolicyLoadError(problems)
    return cases


def run_case(policy_set: PolicySet, case: PolicyTestCase) -> PolicyTestResult:
    """Run one case through ``resolve_workload`` and ``authorize``, as the broker would."""
    identity = WorkloadIdentity(
        spiffe_id=case.workload,
        issuer=_TEST_ISSUER,
        method=case.method,
        subject=case.workload,
        evidence_digest=_NO_EVIDENCE,
        expires_at=0,
    )
    intent = Intent(action=case.action, resource=case.resource, context=dict(case.context))
    rule_id: str | None = None
    max_ttl: int | None = None
    binding: str | None = None
    kind: str | None = None
    agrees = True
    try:
        workload = policy_set.resolve_workload(identity)
        if case.audience in workload.audiences:
            # Casbin is the reference: the request path's decision must be its decision.
            agrees = policy_set.agrees_with_casbin(
                workload, case.audience, intent, policy_set.decide(workload, case.audience, intent, case.user),
                case.user)
        grant = policy_set.authorize(identity, workload, case.audience, intent, case.user)
    except UnregisteredWorkload as exc:
        outcome, detail = "unregistered", exc.description
    except InvalidTarget as exc:
        outcome, detail = "invalid_target", exc.description
    except PolicyDenied as exc:
        outcome, detail, rule_id = "deny", exc.description, exc.rule_id
    else:
        outcome = "review" if grant.review is not None else "allow"
        rule_id, max_ttl = grant.rule_id, grant.max_ttl
        binding, kind = grant.binding, grant.credential_kind
        detail = f"allowed by rule {grant.rule_id} (ttl {grant.max_ttl}s)"
        if grant.review is not None:
            detail = (f"held for review by rule {grant.rule_id} ({grant.review.approvals} approval(s) "
                      f"by {grant.review.approvers}, ttl {grant.max_ttl}s)")

    mismatches = []
    if not agrees:
        mismatches.append("the request path and Casbin disagree (a bug: please report it)")
    if outcome != case.expect:
        mismatches.append(f"expected {case.expect}, got {outcome}")
    if case.rule is not None and (rule_id or "") != case.rule:
        want = case.rule or "no rule"
        mismatches.append(f"expected rule {want}, got {rule_id or 'no rule'}")
    if case.ttl is not None and max_ttl != case.ttl:
        mismatches.append(f"expected ttl {case.ttl}, got {max_ttl}")
    if case.binding is not None and binding != case.binding:
        mismatches.append(f"expected binding {case.binding}, got {binding or 'none'}")
    if case.kind is not None and kind != case.kind:
        mismatches.append(f"expected kind {case.kind}, got {kind}")
    message = "; ".join(mismatches) + f" ({detail})" if mismatches else detail
    return PolicyTestResult(
        case=case, passed=not mismatches, outcome=outcome, rule_id=rule_id, max_ttl=max_ttl, message=message
    )


def run_policy_tests(policy_set: PolicySet, path: Path) -> list[PolicyTestResult]:
    """Run every case of ``path`` (a ``tests.toml``) against ``policy_set``, in file order.

    Raises :class:`PolicyLoadError` when the file itself is invalid.
    """
    return [run_case(policy_set, case) for case in load_cases(path)]


def lint_policies(directory: Path) -> tuple[PolicySet, int]:
    """The checks of ``nhi-broker policy lint``: the policy set loads and ``tests.toml`` (if present)
    parses. Returns the set and the number of test cases; raises :class:`PolicyLoadError` listing every
    problem (file, line, what is wrong). A live reload runs exactly these checks before anything changes.
    """
    policy_set = load_policies(directory)
    tests = Path(directory) / "tests.toml"
    cases = len(load_cases(tests)) if tests.is_file() else 0
    return policy_set, cases
