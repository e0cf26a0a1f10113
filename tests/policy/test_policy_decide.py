"""Decisions: a table of requests with the effect, rule id and TTL each must get, plus the registry,
authorize(), explain(), fail-closed evaluation and log hygiene."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import ALPHA, BETA, DELTA, WORKLOADS, identity, intent, write_policy_dir

from broker.errors import InvalidTarget, PolicyDenied, UnregisteredWorkload
from broker.models import Grant, Intent, RegisteredWorkload
from broker.policy import Decision, PolicySet, load_policies


@dataclass(frozen=True)
class Case:
    name: str
    workload: str
    audience: str
    action: str
    resource: str
    context: dict[str, Any] = field(default_factory=dict)
    effect: str = "deny"
    rule: str | None = None
    ttl: int | None = None


CASES = [
    Case(
        "reader reads own customer's order",
        "alpha",
        "orders-api",
        "orders.read",
        "customers/c1/orders/o1",
        {"customer": "c1"},
        "allow",
        "read-own",
        300,
    ),
    Case(
        "two allows match: the smallest ttl decides",
        "alpha",
        "orders-api",
        "orders.read",
        "customers/c1/orders/o1",
        {"customer": "c1", "vip": True},
        "allow",
        "read-own-vip",
        60,
    ),
    Case(
        "vip must be the boolean true, not a string",
        "alpha",
        "orders-api",
        "orders.read",
        "customers/c1/orders/o1",
        {"customer": "c1", "vip": "true"},
        "allow",
        "read-own",
        300,
    ),
    Case(
        "another customer's order",
        "beta",
        "orders-api",
        "orders.read",
        "customers/c2/orders/o1",
        {"customer": "c1"},
    ),
    Case("{customer} missing from context", "beta", "orders-api", "orders.read", "customers/c1/orders/o1"),
    Case(
        "an integer customer matches its text form",
        "beta",
        "orders-api",
        "orders.read",
        "customers/42/orders/o1",
        {"customer": 42},
        "allow",
        "read-own",
        300,
    ),
    Case(
        "* is one segment",
        "alpha",
        "orders-api",
        "orders.read",
        "customers/c1/orders/o1/x",
        {"customer": "c1"},
    ),
    Case(
        "wrong audience", "alpha", "payments-api", "orders.read", "customers/c1/orders/o1", {"customer": "c1"}
    ),
    Case(
        "refund 20 EUR",
        "alpha",
        "payments-api",
        "payments.refund",
        "orders/o1",
        {"amount": 20, "currency": "EUR"},
        "allow",
        "refund-small",
        120,
    ),
    Case(
        "refund 5 EUR: both refund rules match, tiny has the smaller ttl",
        "alpha",
        "payments-api",
        "payments.refund",
        "orders/o1",
        {"amount": 5, "currency": "EUR"},
        "allow",
        "refund-tiny",
        30,
    ),
    Case(
        "refund 5 USD (list membership)",
        "alpha",
        "payments-api",
        "payments.refund",
        "orders/o1",
        {"amount": 5, "currency": "USD"},
        "allow",
        "refund-tiny",
        30,
    ),
    Case(
        "refund 20 USD",
        "alpha",
        "payments-api",
        "payments.refund",
        "orders/o1",
        {"amount": 20, "currency": "USD"},
    ),
    Case(
        "refund 50.5 EUR",
        "alpha",
        "payments-api",
        "payments.refund",
        "orders/o1",
        {"amount": 50.5, "currency": "EUR"},
    ),
    Case(
        "amount as a boolean is not a number",
        "alpha",
        "payments-api",
        "payments.refund",
        "orders/o1",
        {"amount": True, "currency": "EUR"},
    ),
    Case(
        "deny wins over two matching allows",
        "alpha",
        "payments-api",
        "payments.refund",
        "orders/frozen",
        {"amount": 5, "currency": "EUR"},
        "deny",
        "frozen-order",
    ),
    Case(
        "role not held (beta is no refunder)",
        "beta",
        "payments-api",
        "payments.refund",
        "orders/o1",
        {"amount": 5, "currency": "EUR"},
    ),
    Case(
        "the deny applies to every workload",
        "beta",
        "payments-api",
        "payments.refund",
        "orders/frozen",
        {"amount": 5, "currency": "EUR"},
        "deny",
        "frozen-order",
    ),
    Case(
        "prefix rule covers an action no rule names",
        "alpha",
        "tickets-api",
        "tickets.update",
        "tickets/t1/notes",
        {},
        "allow",
        "alpha-tickets",
        600,
    ),
    Case(
        "deny wins over the prefix allow",
        "alpha",
        "tickets-api",
        "tickets.close",
        "tickets/t1",
        {},
        "deny",
        "alpha-no-close",
    ),
    Case(
        "the close deny is per audience",
        "alpha",
        "orders-api",
        "tickets.close",
        "tickets/t1",
        {},
        "allow",
        "alpha-tickets",
        600,
    ),
    Case("prefix.* is exactly one more segment", "alpha", "tickets-api", "tickets.update.bulk", "tickets/t1"),
    Case("prefix.* does not match the prefix itself", "alpha", "tickets-api", "tickets", "tickets/t1"),
    Case("** needs at least one segment", "alpha", "tickets-api", "tickets.update", "tickets"),
    Case(
        "star-action deny for everyone",
        "alpha",
        "orders-api",
        "secrets.read",
        "secrets/db/password",
        {},
        "deny",
        "no-secrets",
    ),
    Case(
        "star-action deny beats an exact allow bucket",
        "alpha",
        "orders-api",
        "orders.read",
        "secrets/x",
        {"customer": "c1"},
        "deny",
        "no-secrets",
    ),
    Case(
        "star-action allow",
        "alpha",
        "admin-api",
        "admin.ping",
        "admin/status",
        {},
        "allow",
        "status-any-action",
        45,
    ),
    Case(
        "per-workload star deny beats the role allow",
        "beta",
        "admin-api",
        "admin.ping",
        "admin/status",
        {},
        "deny",
        "beta-no-admin",
    ),
    Case("unknown action, nothing matches", "alpha", "orders-api", "unknown.action", "foo/bar"),
    Case(
        "list: != and $key",
        "alpha",
        "orders-api",
        "orders.list",
        "customers/c1/orders",
        {"customer": "c1", "region": "us", "limit": 10, "max_limit": 20},
        "allow",
        "list-limited",
        300,
    ),
    Case(
        "list: over the $key limit",
        "alpha",
        "orders-api",
        "orders.list",
        "customers/c1/orders",
        {"customer": "c1", "region": "us", "limit": 30, "max_limit": 20},
    ),
    Case(
        "list: missing key makes != false",
        "alpha",
        "orders-api",
        "orders.list",
        "customers/c1/orders",
        {"customer": "c1", "limit": 10, "max_limit": 20},
    ),
    Case(
        "list: missing $key",
        "alpha",
        "orders-api",
        "orders.list",
        "customers/c1/orders",
        {"customer": "c1", "region": "us", "limit": 10},
    ),
    Case(
        "workload-named rule",
        "gamma",
        "orders-api",
        "metrics.read",
        "metrics/daily/orders",
        {},
        "allow",
        "gamma-metrics",
        900,
    ),
    Case(
        "pattern workload has no role-based access",
        "gamma",
        "orders-api",
        "orders.read",
        "customers/c1/orders/o1",
        {"customer": "c1"},
    ),
    Case(
        "traversal-looking resource is never evaluated",
        "alpha",
        "orders-api",
        "orders.read",
        "customers/c1/orders/../../c2/orders/o1",
        {"customer": "c1"},
    ),
    Case(
        "trailing newline in the resource",
        "alpha",
        "orders-api",
        "orders.read",
        "customers/c1/orders/o1\n",
        {"customer": "c1"},
    ),
    Case(
        "malformed action", "alpha", "orders-api", "Orders.Read", "customers/c1/orders/o1", {"customer": "c1"}
    ),
]


def _workload(policy_set: PolicySet, name: str) -> RegisteredWorkload:
    entry = policy_set.registry.get(name)
    assert entry is not None
    spiffe_id = entry.spiffe_id.replace("/*", "/job-1")
    return policy_set.resolve_workload(identity(spiffe_id, sorted(entry.attestation)[0]))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_decision_table(policy_set: PolicySet, case: Case) -> None:
    workload = _workload(policy_set, case.workload)
    decision = policy_set.decide(workload, case.audience, intent(case.action, case.resource, **case.context))
    assert (decision.effect, decision.rule_id, decision.max_ttl) == (case.effect, case.rule, case.ttl)
    assert decision.policy_version == policy_set.version
    assert decision.credential_kind == ("jwt" if case.effect == "allow" else None)
    if case.rule is not None:
        assert case.rule in decision.reason
    # The explanation reaches the same verdict, and its matching rules are consistent with it.
    explanation = policy_set.explain(
        workload, case.audience, intent(case.action, case.resource, **case.context)
    )
    assert explanation.decision == decision
    matched = [t for t in explanation.candidates if t.matched]
    if case.effect == "allow":
        assert case.rule in [t.rule_id for t in matched]
        assert all(t.effect == "allow" for t in matched)
    elif case.rule is not None:
        assert case.rule in [t.rule_id for t in matched if t.effect == "deny"]


def test_decision_is_frozen(policy_set: PolicySet) -> None:
    decision = policy_set.decide(_workload(policy_set, "alpha"), "orders-api", intent("x.y", "z"))
    assert isinstance(decision, Decision)
    with pytest.raises(AttributeError):
        decision.effect = "allow"  # type: ignore[misc]


# -- registry --------------------------------------------------------------------------------------


def test_exact_entry_beats_pattern(policy_set: PolicySet) -> None:
    assert policy_set.resolve_workload(identity(DELTA, "kubernetes")).name == "delta"
    job = policy_set.resolve_workload(identity("spiffe://t.example/ns/jobs/nightly", "kubernetes"))
    assert job.name == "gamma"
    assert job.spiffe_id == "spiffe://t.example/ns/jobs/nightly"  # the attested ID, not the pattern
    assert job.owner == "Gus Gamma <gus@example.com>"


@pytest.mark.parametrize(
    ("spiffe_id", "method", "message"),
    [
        ("spiffe://t.example/ns/a/sa/unknown", "spiffe-jwt", "is not registered"),
        ("spiffe://other.example/ns/a/sa/alpha", "spiffe-jwt", "is not registered"),
        ("spiffe://t.example/ns/jobs", "kubernetes", "is not registered"),
        ("spiffe://t.example/ns/jobs/a/b", "kubernetes", "is not registered"),
        ("spiffe://t.example/ns/jobs/*", "kubernetes", "not a valid SPIFFE ID"),
        ("spiffe://t.example/ns/a/sa/alpha/", "spiffe-jwt", "not a valid SPIFFE ID"),
        ("spiffe://t.example/ns/a/sa/alpha\n", "spiffe-jwt", "not a valid SPIFFE ID"),
        ("SPIFFE://t.example/ns/a/sa/alpha", "spiffe-jwt", "not a valid SPIFFE ID"),
        (ALPHA, "kubernetes", "may not authenticate with attestation method 'kubernetes'"),
        (ALPHA, "oidc", "attestation method"),
    ],
)
def test_unregistered(policy_set: PolicySet, spiffe_id: str, method: str, message: str) -> None:
    with pytest.raises(UnregisteredWorkload, match=message.replace("*", r"\*")) as err:
        policy_set.resolve_workload(identity(spiffe_id, method))
    assert err.value.code == "access_denied"


# -- authorize -------------------------------------------------------------------------------------


def test_authorize_returns_grant(policy_set: PolicySet) -> None:
    ident = identity(ALPHA)
    workload = policy_set.resolve_workload(ident)
    request = intent("payments.refund", "orders/o1", amount=20, currency="EUR")
    grant = policy_set.authorize(ident, workload, "payments-api", request)
    assert isinstance(grant, Grant)
    assert (grant.rule_id, grant.max_ttl, grant.credential_kind) == ("refund-small", 120, "jwt")
    assert grant.policy_version == policy_set.version
    assert (grant.identity, grant.workload, grant.intent, grant.audience) == (
        ident,
        workload,
        request,
        "payments-api",
    )


def test_authorize_denied_names_the_rule(policy_set: PolicySet) -> None:
    ident = identity(ALPHA)
    workload = policy_set.resolve_workload(ident)
    with pytest.raises(PolicyDenied) as err:
        policy_set.authorize(ident, workload, "orders-api", intent("secrets.read", "secrets/db"))
    assert err.value.rule_id == "no-secrets"
    assert err.value.policy_version == policy_set.version
    assert err.value.description == "denied by rule no-secrets"
    assert err.value.to_json()["rule_id"] == "no-secrets"


def test_authorize_default_deny(policy_set: PolicySet) -> None:
    ident = identity(ALPHA)
    workload = policy_set.resolve_workload(ident)
    with pytest.raises(PolicyDenied) as err:
        policy_set.authorize(
            ident, workload, "payments-api", intent("payments.refund", "orders/x", amount=99)
        )
    assert err.value.rule_id is None
    assert err.value.description == "no rule allows payments.refund on orders/x"
    assert "rule_id" not in err.value.to_json()
    assert "amount" not in err.value.description


def test_authorize_audience_not_registered(policy_set: PolicySet) -> None:
    ident = identity(BETA)
    workload = policy_set.resolve_workload(ident)
    with pytest.raises(InvalidTarget, match="not registered for workload beta"):
        policy_set.authorize(ident, workload, "tickets-api", intent("tickets.update", "tickets/t1"))


def test_authorize_refuses_a_workload_from_elsewhere(policy_set: PolicySet) -> None:
    ident = identity(ALPHA)
    beta = policy_set.resolve_workload(identity(BETA))
    with pytest.raises(UnregisteredWorkload):
        policy_set.authorize(
            ident, beta, "orders-api", intent("orders.read", "customers/c1/orders/o1", customer="c1")
        )


def test_decide_for_a_workload_not_in_this_set(policy_set: PolicySet) -> None:
    stranger = RegisteredWorkload("stranger", "spiffe://t.example/x", "x", ("reader",), ("orders-api",))
    decision = policy_set.decide(
        stranger, "orders-api", intent("orders.read", "customers/c/orders/o", customer="c")
    )
    assert decision.effect == "deny" and decision.rule_id is None


# -- fail closed -----------------------------------------------------------------------------------


class _Explodes:
    """A context value whose every use raises."""

    def __str__(self) -> str:
        raise RuntimeError("boom")

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("boom")

    __hash__ = object.__hash__


ERROR_POLICIES = {
    "raising deny row beside a matching allow": """\
p, reader, *, things.do, things/*, , allow, plain-allow, 60, jwt
p, reader, *, things.do, things/{owner}, , deny, owner-deny, -, -
""",
    "raising allow row evaluated after a matching allow": """\
p, reader, *, things.do, things/*, , allow, plain-allow, 600, jwt
p, reader, *, things.do, things/{owner}, , allow, owner-allow, 60, jwt
""",
    "raising allow row evaluated before a matching allow": """\
p, reader, *, things.do, things/*, , allow, plain-allow, 60, jwt
p, reader, *, things.do, things/{owner}, , allow, owner-allow, 600, jwt
""",
}


@pytest.mark.parametrize("policy", ERROR_POLICIES.values(), ids=list(ERROR_POLICIES))
def test_evaluation_error_never_allows(tmp_path: Path, policy: str, caplog: pytest.LogCaptureFixture) -> None:
    policy_set = load_policies(write_policy_dir(tmp_path, policy=policy, workloads=WORKLOADS))
    workload = policy_set.resolve_workload(identity(ALPHA))
    ok = policy_set.decide(workload, "orders-api", intent("things.do", "things/t1", owner="t2"))
    assert ok.effect == "allow" and ok.rule_id == "plain-allow"  # the control: without the error it allows
    caplog.set_level(logging.DEBUG)
    bad = policy_set.decide(workload, "orders-api", intent("things.do", "things/t1", owner=_Explodes()))
    assert (bad.effect, bad.rule_id, bad.max_ttl) == ("deny", None, None)
    assert bad.reason == "policy evaluation failed"
    assert "policy evaluation failed" in caplog.text and "RuntimeError" in caplog.text
    with pytest.raises(PolicyDenied):
        policy_set.authorize(
            identity(ALPHA), workload, "orders-api", intent("things.do", "things/t1", owner=_Explodes())
        )


def test_a_raising_condition_on_a_deny_row_never_allows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = """\
p, reader, *, things.do, things/*, , allow, plain-allow, 60, jwt
p, reader, *, things.do, things/*, "risk > 5", deny, risky, -, -
"""
    policy_set = load_policies(write_policy_dir(tmp_path, policy=policy, workloads=WORKLOADS))
    workload = policy_set.resolve_workload(identity(ALPHA))
    request = intent("things.do", "things/t1", risk=1)
    assert policy_set.decide(workload, "orders-api", request).effect == "allow"

    from broker.policy._conditions import Condition

    original = Condition.matches

    def raising_on_the_deny_row(self: Condition, ctx: Any) -> bool:
        if self.text == "risk > 5":
            raise ValueError("evaluation error")
        return original(self, ctx)

    # The request path evaluates each row's own condition; Casbin calls it through _conditions.
    monkeypatch.setattr(Condition, "matches", raising_on_the_deny_row)
    decision = policy_set.decide(workload, "orders-api", request)
    assert (decision.effect, decision.rule_id) == ("deny", None)


def test_non_dict_context_is_denied(policy_set: PolicySet) -> None:
    workload = _workload(policy_set, "alpha")
    bad = Intent(action="orders.read", resource="customers/c1/orders/o1", context=[("customer", "c1")])  # type: ignore[arg-type]
    assert policy_set.decide(workload, "orders-api", bad).effect == "deny"
    assert policy_set.decide(workload, None, intent("orders.read", "x")).effect == "deny"  # type: ignore[arg-type]


def test_request_data_never_reaches_the_log(policy_set: PolicySet, caplog: pytest.LogCaptureFixture) -> None:
    # uvicorn's dictConfig(disable_existing_loggers=False) re-enables the "casbin" loggers that
    # pycasbin disables; Casbin would then log every denied request with its context.
    casbin_loggers = [
        logging.getLogger(n) for n in ("casbin", "casbin.enforcer", "casbin.policy", "casbin.role")
    ]
    saved = [(lg.disabled, lg.level) for lg in casbin_loggers]
    try:
        for lg in casbin_loggers:
            lg.disabled = False
            lg.setLevel(logging.DEBUG)
        caplog.set_level(logging.DEBUG)
        workload = _workload(policy_set, "alpha")
        for request in (
            intent("orders.read", "customers/c1/orders/o1", customer="c1", note="s3cr3t-note"),
            intent("payments.refund", "orders/o1", amount=20, currency="EUR", note="s3cr3t-note"),
            intent("orders.read", "customers/c1/orders/o1", customer=_Explodes(), note="s3cr3t-note"),
        ):
            policy_set.decide(workload, "orders-api", request)
        assert "s3cr3t-note" not in caplog.text
        assert not [r for r in caplog.records if r.name.startswith("casbin")]
    finally:
        for lg, (disabled, level) in zip(casbin_loggers, saved, strict=True):
            lg.disabled, lg.level = disabled, level


def test_empty_rule_set_denies_everything(tmp_path: Path) -> None:
    policy_set = load_policies(write_policy_dir(tmp_path, policy="# nothing yet\n", workloads=WORKLOADS))
    workload = policy_set.resolve_workload(identity(ALPHA))
    for action, resource in (("orders.read", "customers/c1/orders/o1"), ("a", "b"), ("x.y.z", "p/q/r")):
        decision = policy_set.decide(workload, "orders-api", intent(action, resource, customer="c1"))
        assert (decision.effect, decision.rule_id) == ("deny", None)
    assert policy_set.explain(workload, "orders-api", intent("a", "b")).candidates == ()


# -- explain ---------------------------------------------------------------------------------------


def test_explain_names_each_failing_part(policy_set: PolicySet) -> None:
    workload = _workload(policy_set, "alpha")
    request = intent("payments.refund", "orders/o1", amount=75, currency="EUR")
    explanation = policy_set.explain(workload, "payments-api", request)
    by_id = {t.rule_id: t for t in explanation.candidates}
    # Candidates: the exact rules for the action and every '*' rule, in file order.
    assert list(by_id) == [
        "refund-small",
        "refund-tiny",
        "frozen-order",
        "beta-no-admin",
        "no-secrets",
        "status-any-action",
    ]
    small = by_id["refund-small"]
    assert [(p.part, p.matched) for p in small.parts] == [
        ("subject", True),
        ("audience", True),
        ("action", True),
        ("resource", True),
        ("condition", False),
        ("condition", True),
    ]
    assert "amount <= 50" in small.parts[4].detail and "75" in small.parts[4].detail
    frozen = by_id["frozen-order"]
    assert [p.part for p in frozen.parts if not p.matched] == ["resource"]
    text = explanation.render()
    assert "DENY: no rule allows payments.refund on orders/o1" in text
    assert "refund-small" in text and "FAIL condition" in text and policy_set.version in text


def test_explain_allow_render(policy_set: PolicySet) -> None:
    workload = _workload(policy_set, "alpha")
    text = policy_set.explain(
        workload, "payments-api", intent("payments.refund", "orders/o1", amount=5, currency="EUR")
    ).render()
    assert "ALLOW: allowed by rule refund-tiny" in text
    assert "max ttl 30s, credential jwt" in text
