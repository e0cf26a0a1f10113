"""The policy side of DPoP: the binding column, the strictest-binding rule, policy test expectations, and
the identity token's key binding (cnf)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from broker.attest.cnf import identity_key_thumbprint
from broker.models import Intent, WorkloadIdentity
from broker.policy import load_policies
from broker.policy.testing import PolicyTestCase, run_case
from tests.dpop.dpop_helpers import jwk_of, new_key
from tests.helpers import POLICIES, SUPPORT

READ = Intent("orders.read", "customers/c-1/orders/o-1", {"customer": "c-1"})


def _identity() -> WorkloadIdentity:
    return WorkloadIdentity(SUPPORT, "iss", "spiffe-jwt", SUPPORT, "sha256:00", 0)


def _policies_with(tmp_path: Path, extra: str) -> Path:
    directory = tmp_path / "policies"
    shutil.copytree(POLICIES, directory)
    with (directory / "policy.csv").open("a") as f:
        f.write(extra)
    return directory


def test_the_strictest_binding_of_the_matching_allow_rules_applies(tmp_path: Path) -> None:
    # A second rule for the same reads, with a longer TTL (so it does not decide) but demanding DPoP.
    policies = load_policies(_policies_with(
        tmp_path, "p, support-agent, orders-api, orders.read, customers/{customer}/orders/*, , allow, "
                  "orders-read-bound, 600, jwt, dpop\n"))
    workload = policies.resolve_workload(_identity())
    grant = policies.authorize(_identity(), workload, "orders-api", READ)
    assert grant.rule_id == "orders-read-own-customer" and grant.max_ttl == 300
    assert grant.binding == "dpop"


def test_the_sample_rules_bindings() -> None:
    policies = load_policies(POLICIES)
    workload = policies.resolve_workload(_identity())
    assert policies.authorize(_identity(), workload, "orders-api", READ).binding == "optional"
    cancel = Intent("orders.cancel", READ.resource, READ.context)
    assert policies.authorize(_identity(), workload, "orders-api", cancel).binding == "dpop"
    update = Intent("customers.update", "customers/c-1", {"customer": "c-1"})
    assert policies.authorize(_identity(), workload, "orders-api", update).binding == "dpop-identity-key"


def test_a_policy_test_case_checks_the_binding() -> None:
    policies = load_policies(POLICIES)
    case = PolicyTestCase(name="reads need dpop?", workload=SUPPORT, audience="orders-api", action=READ.action,
                          resource=READ.resource, expect="allow", source="t:1", context=dict(READ.context),
                          binding="dpop")
    result = run_case(policies, case)
    assert not result.passed
    assert "expected binding dpop, got optional" in result.message


def test_bad_binding_expectation_in_tests_toml_is_refused(tmp_path: Path) -> None:
    from broker.errors import PolicyLoadError
    from broker.policy.testing import load_cases

    path = tmp_path / "tests.toml"
    path.write_text('[[case]]\nname = "x"\nworkload = "spiffe://a/b"\naudience = "a"\naction = "a.b"\n'
                    'resource = "r"\nexpect = "allow"\nbinding = "mtls"\n')
    with pytest.raises(PolicyLoadError, match="binding must be one of optional, dpop, dpop-identity-key"):
        load_cases(path)


def test_identity_key_thumbprint() -> None:
    key = new_key()
    jwk = jwk_of(key)
    from jwcrypto import jwk as jwcrypto_jwk

    assert identity_key_thumbprint({"jwk": jwk}) == jwcrypto_jwk.JWK(**jwk).thumbprint()
    assert identity_key_thumbprint({"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}).startswith("0ZcO")
    for cnf, why in [
        ("jkt", "must be an object"),
        ({}, "exactly one of jkt or jwk"),
        ({"jkt": "short"}, "SHA-256 thumbprint"),
        ({"jwk": jwk, "jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}, "exactly one of jkt or jwk"),
        ({"jwk": {**jwk, "d": "AAAA"}}, "private or symmetric"),
        ({"jwk": {"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA"}}, "not a usable public signature key"),
        ({"x5t#S256": "abc"}, "exactly one of jkt or jwk"),
    ]:
        with pytest.raises(ValueError, match=why):
            identity_key_thumbprint(cnf)
