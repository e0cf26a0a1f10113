"""The request path's decisions (the bucket's matcher evaluated directly, no pycasbin) agree with plain
Casbin (one enforcer, every row, file order), with each action bucket's Casbin enforcer and with a
direct reference evaluation, on random rule sets and random requests."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import pytest
from conftest import identity, intent, write_policy_dir

from broker.models import EndUser
from broker.policy import PolicySet, Rule, load_policies
from broker.policy.engine import plain_enforcer, policy_context

ROLES = [f"r{i}" for i in range(6)]
WORKLOAD_NAMES = [f"w{i}" for i in range(6)]
AUDIENCES = ["aud0", "aud1", "aud2"]
ACTIONS = [f"svc{s}.op{o}" for s in range(3) for o in range(3)] + ["svc0.op0.sub", "svc1.op1.sub"]
UNSEEN_ACTIONS = ["svc9.op0", "svc0.op9", "svc0.op0.other", "zzz", "svc3"]
SEGMENTS = ["a", "b", "k1"]
CONDITIONS = [
    "",
    "amount <= 50",
    "amount > 10 && amount <= 100",
    "tier in ['gold', 'silver']",
    "tier == 'gold'",
    "flag == true",
    "flag != false && amount >= 0",
    "amount <= $limit",
    "tier != 'bronze'",
    "key == $other",
]


def _random_resource_pattern(rng: random.Random) -> str:
    n = rng.randint(1, 3)
    parts = [rng.choice(["a", "b", "*", "{key}", "k1"]) for _ in range(n)]
    if rng.random() < 0.25:
        parts.append("**")
    return "/".join(parts)


def _random_action_pattern(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.75:
        return rng.choice(ACTIONS)
    if roll < 0.93:
        return rng.choice([f"svc{s}.*" for s in range(3)] + ["svc0.op0.*"])
    return "*"


def random_policy_dir(directory: Path, seed: int, n_rules: int = 150) -> Path:
    rng = random.Random(seed)
    workloads = []
    for i, name in enumerate(WORKLOAD_NAMES):
        roles = sorted({ROLES[i], *rng.sample(ROLES, rng.randint(0, 2))}) if i % 3 else []
        workloads.append(
            f'[[workload]]\nname = "{name}"\nspiffe_id = "spiffe://r.example/w/{name}"\n'
            f'owner = "Owner {i} <o{i}@example.com>"\nroles = {roles!r}\n'.replace("'", '"')
            + f"audiences = {AUDIENCES!r}\n".replace("'", '"')
            + 'attestation = ["spiffe-jwt"]\n'
        )
    lines = ["g, r1, r2", "g, r2, r3", "g, r4, r3", "g, r5, r0"]
    for i in range(n_rules):
        subject = rng.choice([*ROLES, *WORKLOAD_NAMES, "*"])
        audience = rng.choice([*AUDIENCES[:2], "*"])
        effect = "deny" if rng.random() < 0.25 else "allow"
        ttl_kind = "-, -" if effect == "deny" and rng.random() < 0.5 else f"{rng.randint(1, 1000)}, jwt"
        cond = rng.choice(CONDITIONS) if rng.random() < 0.6 else ""
        lines.append(
            f"p, {subject}, {audience}, {_random_action_pattern(rng)}, {_random_resource_pattern(rng)}, "
            f'"{cond}", {effect}, rule-{i:04d}, {ttl_kind}'
        )
    return write_policy_dir(directory, policy="\n".join(lines) + "\n", workloads="\n".join(workloads))


# (workload, audience, action, resource, context, verified end user of a delegated request or None)
Request = tuple[str, str, str, str, dict[str, Any], EndUser | None]


def random_request(rng: random.Random) -> Request:
    ctx: dict[str, Any] = {}
    for key, values in (
        ("amount", [0, 5, 10, 10.5, 50, 51, 100, 101, -1, "20", True]),
        ("tier", ["gold", "silver", "bronze", 1, False]),
        ("flag", [True, False, "true", 1]),
        ("limit", [5, 50, 50.0, "50"]),
        ("key", ["a", "b", "k1", 7]),
        ("other", ["a", "k1", 7, 7.0]),
    ):
        if rng.random() < 0.7:
            ctx[key] = rng.choice(values)
    resource = "/".join(rng.choice(SEGMENTS) for _ in range(rng.randint(1, 3)))
    action = rng.choice(ACTIONS) if rng.random() < 0.85 else rng.choice(UNSEEN_ACTIONS)
    return rng.choice(WORKLOAD_NAMES), rng.choice(AUDIENCES), action, resource, ctx, None


def reference(
    policy_set: PolicySet, name: str, audience: str, action: str, resource: str, ctx: dict[str, Any]
) -> tuple[str, str | None, int | None]:
    """Deny wins (first matching deny in file order); else the matching allow with the smallest ttl."""
    subjects = policy_set._subjects[name]
    matching: list[Rule] = [
        r for r in policy_set.rules if r.matches(subjects, audience, action, resource, ctx)
    ]
    denies = [r for r in matching if r.effect == "deny"]
    if denies:
        return "deny", denies[0].rule_id, None
    allows = [r for r in matching if r.effect == "allow"]
    if allows:
        best = min(allows, key=lambda r: (r.ttl, r.rule_id))
        return "allow", best.rule_id, best.ttl
    return "deny", None, None


def _check_agreement(
    policy_set: PolicySet, requests: list[Request], caplog: pytest.LogCaptureFixture
) -> dict[str, int]:
    plain = plain_enforcer(policy_set)
    workloads = {
        entry.name: policy_set.resolve_workload(
            identity(entry.spiffe_id.replace("/*", "/x"), sorted(entry.attestation)[0])
        )
        for entry in policy_set.registry
    }
    seen = {"allow": 0, "deny-rule": 0, "deny-default": 0}
    caplog.set_level(logging.DEBUG, logger="broker.policy")
    for name, audience, action, resource, ctx, user in requests:
        request = intent(action, resource, **ctx)
        decision = policy_set.decide(workloads[name], audience, request, user)
        # Plain Casbin and the reference see what rules see: the context plus the user terms.
        ctx = policy_context(request, user)
        allowed, explain = plain.enforce_ex(name, audience, action, resource, ctx)
        # (1) the same effect as plain Casbin
        assert decision.effect == ("allow" if allowed else "deny"), (name, audience, action, resource, ctx)
        # (2) a deny rule is the one plain Casbin stops at (the first matching deny in file order)
        if not allowed and explain:
            assert explain[5] == "deny" and decision.rule_id == explain[6]
        # (3) the request path's direct evaluation is what the action bucket's own Casbin enforcer
        # decides, rule for rule (the same check `policy test` and `policy explain` make)
        assert policy_set.casbin_decision(workloads[name], audience, request, user) == (
            decision.effect, decision.rule_id), (name, audience, action, resource, ctx)
        assert policy_set.agrees_with_casbin(workloads[name], audience, request, decision, user)
        # (4) the exact outcome the reference evaluation gives
        assert (decision.effect, decision.rule_id, decision.max_ttl) == reference(
            policy_set, name, audience, action, resource, ctx
        )
        key = "allow" if decision.effect == "allow" else ("deny-rule" if decision.rule_id else "deny-default")
        seen[key] += 1
    # (5) nothing was logged: no evaluation failed
    assert not [r for r in caplog.records if r.name == "broker.policy"], caplog.text
    return seen


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_sets_agree_with_plain_casbin(
    tmp_path: Path, seed: int, caplog: pytest.LogCaptureFixture
) -> None:
    policy_set = load_policies(random_policy_dir(tmp_path, seed))
    rng = random.Random(seed * 7919)
    seen = _check_agreement(policy_set, [random_request(rng) for _ in range(1000)], caplog)
    # the random requests exercise all three kinds of outcome
    assert all(count > 20 for count in seen.values()), seen


def test_samples_agree_with_plain_casbin(samples: PolicySet, caplog: pytest.LogCaptureFixture) -> None:
    rng = random.Random(42)
    actions = [*sorted({r.action for r in samples.rules if "*" not in r.action}), "payments.void", "x.y"]
    names = [e.name for e in samples.registry]
    audiences = sorted({a for e in samples.registry for a in e.audiences})
    requests = []
    for _ in range(1500):
        customer = rng.choice(["c-1", "c-2"])
        ctx = {
            "customer": rng.choice(["c-1", "c-2"]),
            "amount": rng.choice([5, 50, 50.01, 200, "5"]),
            "currency": rng.choice(["EUR", "USD"]),
            "priority": rng.choice(["low", "urgent"]),
        }
        resource = rng.choice(
            [
                f"customers/{customer}",
                f"customers/{customer}/orders",
                f"customers/{customer}/orders/o-1",
                "queues/q",
                "tickets/t-1",
                "kb/articles/a",
                "metrics/orders/daily",
                "customers/all",
            ]
        )
        # Plain requests and delegated ones (the sample refund rules need the verified user).
        user = rng.choice([None, *(EndUser("https://login.example.org", c) for c in ("c-1", "c-2"))])
        requests.append((rng.choice(names), rng.choice(audiences), rng.choice(actions), resource, ctx, user))
    seen = _check_agreement(samples, requests, caplog)
    assert all(count > 0 for count in seen.values()), seen


def test_role_closure_agrees_with_casbin_role_manager(tmp_path: Path) -> None:
    policy_set = load_policies(random_policy_dir(tmp_path, 5))
    rm = plain_enforcer(policy_set).get_role_manager()
    for entry in policy_set.registry:
        for subject in [*ROLES, *WORKLOAD_NAMES, "*"]:
            assert rm.has_link(entry.name, subject) == (subject in policy_set._subjects[entry.name])


def test_concurrent_decisions_match_sequential_ones(samples: PolicySet) -> None:
    from concurrent.futures import ThreadPoolExecutor

    rng = random.Random(3)
    support = samples.resolve_workload(identity("spiffe://example.org/ns/support/sa/support-assistant"))
    batch = [
        intent(
            rng.choice(["orders.read", "payments.refund", "customers.export", "x.y"]),
            f"customers/c-{rng.randrange(3)}/orders/o-1",
            customer=f"c-{rng.randrange(3)}",
            amount=rng.choice([5, 75]),
            currency="EUR",
        )
        for _ in range(1500)
    ]
    audiences = ["orders-api", "payments-api"]
    expected = [samples.decide(support, audiences[i % 2], it) for i, it in enumerate(batch)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(
            pool.map(lambda pair: samples.decide(support, audiences[pair[0] % 2], pair[1]), enumerate(batch))
        )
    assert got == expected
