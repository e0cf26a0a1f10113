"""Fixtures for the intent-policy tests: policy directories written from text, identities, intents."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from broker.models import Intent, WorkloadIdentity
from broker.policy import SUPPORTED_MODEL, PolicySet, load_policies

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "policies"

ALPHA = "spiffe://t.example/ns/a/sa/alpha"
BETA = "spiffe://t.example/ns/b/sa/beta"
JOBS = "spiffe://t.example/ns/jobs/*"
DELTA = "spiffe://t.example/ns/jobs/special"

WORKLOADS = f"""
[[workload]]
name = "alpha"
spiffe_id = "{ALPHA}"
owner = "Alex Alpha <alex@example.com>"
roles = ["reader", "refunder"]
audiences = ["orders-api", "payments-api", "tickets-api", "admin-api"]
attestation = ["spiffe-jwt", "dev"]

[[workload]]
name = "beta"
spiffe_id = "{BETA}"
owner = "Bea Beta <bea@example.com>"
roles = ["reader"]
audiences = ["orders-api", "payments-api", "admin-api"]
attestation = ["spiffe-jwt", "kubernetes"]

[[workload]]
name = "gamma"
spiffe_id = "{JOBS}"
owner = "Gus Gamma <gus@example.com>"
roles = []
audiences = ["orders-api"]
attestation = ["kubernetes"]

[[workload]]
name = "delta"
spiffe_id = "{DELTA}"
owner = "Dee Delta <dee@example.com>"
roles = ["reader"]
audiences = ["orders-api"]
attestation = ["kubernetes"]
"""

# A rule set exercising every feature: role inheritance, deny wins, smallest TTL, prefix and star
# buckets, $key references, lists, the '*' subject.
POLICY = """\
# test policy
g, refunder, reader

p, reader, orders-api, orders.read, customers/{customer}/orders/*, , allow, read-own, 300, jwt
p, reader, orders-api, orders.read, customers/{customer}/orders/*, "vip == true", allow, read-own-vip, 60, jwt
p, reader, orders-api, orders.list, customers/{customer}/orders, "region != 'eu' && limit <= $max_limit", \
allow, list-limited, 300, jwt
p, refunder, payments-api, payments.refund, orders/*, "amount <= 50 && currency == 'EUR'", \
allow, refund-small, 120, jwt
p, refunder, payments-api, payments.refund, orders/*, "currency in ['EUR', 'USD'] && amount <= 10", \
allow, refund-tiny, 30, jwt
p, *, *, payments.refund, orders/frozen, , deny, frozen-order, -, -
p, alpha, *, tickets.*, tickets/**, , allow, alpha-tickets, 600, jwt
p, alpha, tickets-api, tickets.close, tickets/*, , deny, alpha-no-close, -, -
p, beta, *, *, admin/**, , deny, beta-no-admin, -, -
p, *, *, *, secrets/**, , deny, no-secrets, -, -
p, reader, admin-api, *, admin/status, , allow, status-any-action, 45, jwt
p, gamma, orders-api, metrics.read, metrics/**, , allow, gamma-metrics, 900, jwt
""".replace("\\\n", "")


def write_policy_dir(
    directory: Path,
    policy: str = POLICY,
    workloads: str = WORKLOADS,
    model: str = SUPPORTED_MODEL,
    tests: str | None = None,
) -> Path:
    """Write a policy directory and return it."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.conf").write_text(model)
    (directory / "policy.csv").write_text(policy)
    (directory / "workloads.toml").write_text(workloads)
    if tests is not None:
        (directory / "tests.toml").write_text(tests)
    return directory


def identity(spiffe_id: str, method: str = "spiffe-jwt") -> WorkloadIdentity:
    """An attested identity as an attestor would produce it."""
    return WorkloadIdentity(
        spiffe_id=spiffe_id,
        issuer="https://issuer.test",
        method=method,
        subject=spiffe_id,
        evidence_digest="sha256:" + "0" * 64,
        expires_at=2_000_000_000,
    )


def intent(action: str, resource: str, **context: Any) -> Intent:
    return Intent(action=action, resource=resource, context=context)


@pytest.fixture(scope="session")
def policy_set(tmp_path_factory: pytest.TempPathFactory) -> PolicySet:
    return load_policies(write_policy_dir(tmp_path_factory.mktemp("policy")))


@pytest.fixture(scope="session")
def samples() -> PolicySet:
    return load_policies(SAMPLES)
