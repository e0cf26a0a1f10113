"""User terms in policy conditions (``user.sub``, ``user.iss``, mapped claims, ``user.delegated``):
the grammar, fail-closed evaluation, decisions of the sample policies, ``policy test`` cases and
``policy explain``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import WORKLOADS, identity, intent, write_policy_dir

from broker.errors import InvalidAuthorizationDetails, PolicyDenied, PolicyLoadError
from broker.intent import parse_authorization_details
from broker.models import EndUser
from broker.policy import PolicySet, load_policies
from broker.policy._conditions import ConditionError, compile_condition
from broker.policy.testing import load_cases

SUPPORT = "spiffe://example.org/ns/support/sa/support-assistant"
USER = EndUser(issuer="https://login.example.org", subject="c-1001", claims={"tenant": "acme"})


@pytest.mark.parametrize(("text", "error"), [
    ("user.Sub == 'x'", "is not a user term"),
    ("user. == 'x'", "unexpected character"),
    ("user.sub.x == 'x'", "unexpected character"),
    ("customer == user.", "unexpected character"),
    ("customer == $user.sub", "unexpected character"),
])
def test_bad_user_terms_are_refused_with_the_column(text: str, error: str) -> None:
    with pytest.raises(ConditionError, match=error):
        compile_condition(text)


@pytest.mark.parametrize(("ctx", "expected"), [
    ({"customer": "c-1", "user.sub": "c-1"}, True),
    ({"customer": "c-2", "user.sub": "c-1"}, False),
    ({"customer": "c-1"}, False),  # no verified user: the clause is false (fail closed)
    ({"customer": 1, "user.sub": 1}, True),
    ({"customer": "1", "user.sub": 1}, False),  # kinds differ
])
def test_user_terms_evaluate_fail_closed(ctx: dict[str, object], expected: bool) -> None:
    assert compile_condition("customer == user.sub").matches(ctx) is expected


def test_sample_policy_ties_a_delegated_refund_to_the_verified_user(samples: PolicySet) -> None:
    who = identity(SUPPORT)
    workload = samples.resolve_workload(who)
    own = intent("payments.refund", "customers/c-1001/orders/o-1", customer="c-1001", amount=20, currency="EUR")
    other = intent("payments.refund", "customers/c-2002/orders/o-1", customer="c-2002", amount=20, currency="EUR")
    grant = samples.authorize(who, workload, "payments-api", own, USER)
    assert (grant.rule_id, grant.user) == ("refund-small-eur", USER)
    with pytest.raises(PolicyDenied) as denied:
        samples.authorize(who, workload, "payments-api", other, USER)
    assert denied.value.rule_id == "refund-other-customer"
    # Without a verified user no refund is issued at all, whatever the context says ...
    plain = samples.decide(workload, "payments-api", intent("payments.refund", "customers/c-2002/orders/o-1",
                                                            customer="c-2002", amount=20, currency="EUR"))
    assert (plain.effect, plain.rule_id) == ("deny", "refund-requires-verified-user")
    # ... the bot cannot smuggle a user term in through the context (context keys have no dots) ...
    with pytest.raises(InvalidAuthorizationDetails):
        parse_authorization_details(json.dumps([{"type": "intent", "action": "payments.refund",
                                                 "resource": "customers/c-2002/orders/o-1",
                                                 "context": {"customer": "c-2002", "user.sub": "c-2002"}}]))
    # ... and a plain request never matches a rule that names a user term.
    executor = identity("spiffe://example.org/ns/payments/sa/refund-executor")
    assert not samples.decide(samples.resolve_workload(executor), "payments-api", own).allowed
    assert samples.decide(samples.resolve_workload(executor), "payments-api", own, USER).rule_id == \
        "refund-executor-small"


def test_a_rule_can_require_delegation_explicitly(tmp_path: Path) -> None:
    rules = (
        'p, refunder, payments-api, payments.refund, **, "user.delegated == false", deny, needs-user, -, -\n'
        'p, refunder, payments-api, payments.refund, **, "user.tenant == \'acme\'", allow, acme-refunds, 60, jwt\n'
    )
    policies = write_policy_dir(tmp_path, rules, WORKLOADS)

    policy_set = load_policies(policies)
    alpha = policy_set.resolve_workload(identity("spiffe://t.example/ns/a/sa/alpha"))
    refund = intent("payments.refund", "orders/o-1")
    assert policy_set.decide(alpha, "payments-api", refund).rule_id == "needs-user"
    assert policy_set.decide(alpha, "payments-api", refund, USER).rule_id == "acme-refunds"
    other_tenant = EndUser(issuer=USER.issuer, subject="c-1", claims={"tenant": "globex"})
    assert not policy_set.decide(alpha, "payments-api", refund, other_tenant).allowed
    text = policy_set.explain(alpha, "payments-api", refund, USER).render()
    assert "user      user.iss = 'https://login.example.org', user.sub = 'c-1001', user.tenant = 'acme'" in text
    assert "user.tenant == 'acme'  (user.tenant = 'acme')" in text
    assert "not a delegated request" in policy_set.explain(alpha, "payments-api", refund).render()


@pytest.mark.parametrize(("user", "problem"), [
    ('"c-1"', "user must be a table"),
    ('{ sub = "c-1" }', "user needs sub and iss"),
    ('{ sub = "c-1", iss = "i", Tenant = "x" }', "is not a mapped claim name"),
    ('{ sub = "c-1", iss = "i", delegated = false }', "is not a mapped claim name"),
    ('{ sub = "c-1", iss = "i", tenant = [1] }', "must be a string, number or boolean"),
])
def test_policy_test_cases_validate_the_user(tmp_path: Path, user: str, problem: str) -> None:
    path = tmp_path / "tests.toml"
    path.write_text(f'[[case]]\nname = "n"\nworkload = "w"\naudience = "a"\naction = "x.y"\nresource = "r"\n'
                    f'expect = "deny"\nuser = {user}\n')
    with pytest.raises(PolicyLoadError) as refused:
        load_cases(path)
    assert problem in str(refused.value)
