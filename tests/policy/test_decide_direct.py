"""`PolicySet.decide_direct` (bulk replay) decides exactly as `decide` (Casbin, cross-checked) does."""

from __future__ import annotations

import itertools

from broker.errors import UnregisteredWorkload
from broker.models import Intent, WorkloadIdentity
from broker.policy import load_policies
from broker.policy.testing import load_cases
from tests.helpers import POLICIES

AMOUNTS = [-1, 0, 1, 10, 50, 51, 120, 499, 500, 10_000, "20", True]
CURRENCIES = ["EUR", "USD", "eur", ""]


def test_direct_decisions_agree_with_casbin_on_every_policy_test_case_and_a_grid() -> None:
    policies = load_policies(POLICIES)
    requests = []
    for case in load_cases(POLICIES / "tests.toml"):
        identity = WorkloadIdentity(spiffe_id=case.workload, issuer="https://issuer.example", method=case.method,
                                    subject=case.workload, evidence_digest="sha256:" + "0" * 64, expires_at=0)
        try:
            workload = policies.resolve_workload(identity)
        except UnregisteredWorkload:
            continue
        requests.append((workload, case.audience, Intent(case.action, case.resource, dict(case.context))))
    support = requests[0][0]
    for amount, currency, customer in itertools.product(AMOUNTS, CURRENCIES, ["c-42", "c-99"]):
        requests.append((support, "payments-api", Intent("payments.refund", "customers/c-42/orders/o-1",
                                                         {"customer": customer, "amount": amount,
                                                          "currency": currency})))
    assert len(requests) > 100
    for workload, audience, intent in requests:
        full = policies.decide(workload, audience, intent)
        direct = policies.decide_direct(workload, audience, intent)
        assert (direct.effect, direct.rule_id, direct.max_ttl, direct.binding) == \
            (full.effect, full.rule_id, full.max_ttl, full.binding), (workload.name, audience, intent)
