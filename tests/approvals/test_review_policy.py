"""The review effect: Casbin semantics kept (deny wins), review over allow, approvals.toml validated."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from broker.approvals import is_owner
from broker.errors import PolicyLoadError
from broker.models import EndUser, Intent, ReviewTerms, WorkloadIdentity
from broker.policy import load_policies
from broker.policy.reviews import parse_reviews
from tests.helpers import POLICIES, SUPPORT

# The verified end user the refunds below are for (the sample refund rules need one, and the customer).
CUSTOMER = EndUser(issuer="https://login.example.org", subject="c-1")


def policy_dir(tmp_path: Path, extra_lines: str = "", approvals: str | None = None) -> Path:
    target = tmp_path / "policies"
    shutil.copytree(POLICIES, target)
    if extra_lines:
        with (target / "policy.csv").open("a") as f:
            f.write(extra_lines)
    if approvals is not None:
        (target / "approvals.toml").write_text(approvals)
    return target


def decide(directory: Path, amount: float) -> tuple[str, str | None]:
    policies = load_policies(directory)
    identity = WorkloadIdentity(SUPPORT, "test", "dev", SUPPORT, "sha256:" + "0" * 64, 0)
    workload = policies.resolve_workload(identity)
    d = policies.decide(workload, "payments-api", Intent("payments.refund", "customers/c-1/orders/o-1",
                                                        {"customer": "c-1", "amount": amount, "currency": "EUR"}),
                        CUSTOMER)
    return d.effect, d.rule_id


def test_sample_review_terms() -> None:
    assert load_policies(POLICIES).reviews["refund-review-eur"] == ReviewTerms(
        rule_id="refund-review-eur", approvers="refund-approvers", approvals=1, max_wait=900,
        owner_may_approve=False)


@pytest.mark.parametrize(("amount", "effect", "rule"), [
    (20, "allow", "refund-small-eur"), (50.01, "review", "refund-review-eur"), (499.99, "review", "refund-review-eur"),
    (500, "deny", None),
])
def test_sample_refund_bands(amount: float, effect: str, rule: str | None) -> None:
    assert decide(POLICIES, amount) == (effect, rule)


def test_deny_wins_over_review_and_review_over_allow(tmp_path: Path) -> None:
    deny = "p, refund-agent, payments-api, payments.refund, **, \"amount == 120\", deny, no-120, -, -\n"
    allow = "p, refund-agent, payments-api, payments.refund, **, \"amount == 130\", allow, any-130, 600, jwt\n"
    directory = policy_dir(tmp_path, deny + allow)
    assert decide(directory, 120) == ("deny", "no-120")
    assert decide(directory, 130) == ("review", "refund-review-eur")


@pytest.mark.parametrize(
    ("approvals", "problem"),
    [
        (None, "review rule 'refund-review-eur' has no [[review]] table in approvals.toml"),
        ("", "has no [[review]] table"),
        ("[[review]]\nrule = 'refund-small-eur'\napprovers = 'a'\napprovals = 1\nmax_wait = 60\n",
         "'refund-small-eur' is a allow rule"),
        ("[[review]]\nrule = 'nope'\napprovers = 'a'\napprovals = 1\nmax_wait = 60\n", "'nope' is not a rule id"),
        ("[[review]]\nrule = 'refund-review-eur'\napprovers = 'Refund Team'\napprovals = 1\nmax_wait = 60\n",
         "approvers must name an operator group"),
        ("[[review]]\nrule = 'refund-review-eur'\napprovers = 'a'\napprovals = 0\nmax_wait = 60\n",
         "approvals must be an integer from 1 to 10"),
        ("[[review]]\nrule = 'refund-review-eur'\napprovers = 'a'\napprovals = true\nmax_wait = 60\n",
         "approvals must be an integer"),
        ("[[review]]\nrule = 'refund-review-eur'\napprovers = 'a'\napprovals = 1\nmax_wait = 5\n",
         "max_wait must be a whole number of seconds from 30"),
        ("[[review]]\nrule = 'refund-review-eur'\napprovers = 'a'\napprovals = 1\nmax_wait = 60\n"
         "owner_may_approve = 1\n",
         "owner_may_approve must be true or false"),
        ("[[review]]\nrule = 'refund-review-eur'\napprovers = 'a'\napprovals = 1\n", "missing 'max_wait'"),
        ("[[review]]\nrule = 'refund-review-eur'\napprovers = 'a'\napprovals = 1\nmax_wait = 60\nttl = 5\n",
         "unknown key 'ttl'"),
        ("[review]\nrule = 'x'\n", "'review' must be an array of tables"),
        ("[[review]\n", "not valid TOML"),
        ("[[reviews]]\nrule = 'x'\n", "unknown top-level key 'reviews'"),
    ],
)
def test_bad_approvals_toml_refuses_the_set(tmp_path: Path, approvals: str | None, problem: str) -> None:
    directory = policy_dir(tmp_path, approvals=approvals)
    if approvals is None:
        (directory / "approvals.toml").unlink()
    with pytest.raises(PolicyLoadError) as info:
        load_policies(directory)
    assert any(problem in p for p in info.value.problems), info.value.problems


def test_review_terms_are_part_of_the_policy_version(tmp_path: Path) -> None:
    one = load_policies(policy_dir(tmp_path / "a"))
    two = load_policies(policy_dir(tmp_path / "b", approvals=(POLICIES / "approvals.toml").read_text()
                                   .replace("approvals = 1", "approvals = 2")))
    assert one.version != two.version and two.reviews["refund-review-eur"].approvals == 2


def test_parse_reviews_of_a_set_without_review_rules() -> None:
    assert parse_reviews(None, {}) == ({}, [])


@pytest.mark.parametrize(("name", "owner", "expected"), [
    ("dana.reyes@example.com", "Dana Reyes <dana.reyes@example.com>", True),
    ("Dana.Reyes@Example.com", "Dana Reyes <dana.reyes@example.com>", True),
    ("dana", "Dana Reyes <dana.reyes@example.com>", False),
    ("ops-team", "ops-team", True),
    ("april", "Dana Reyes <dana.reyes@example.com>", False),
])
def test_is_owner(name: str, owner: str, expected: bool) -> None:
    assert is_owner(name, owner) is expected
