"""Benchmark the intent-policy engine: decide() latency at 10, 1,000 and 10,000 rules.

    .venv/bin/python scripts/bench_policy.py [--requests 20000] [--seed 7]

For each size it writes a generated policy directory (rules spread over services, actions and roles,
half of them with conditions, a tenth deny rules, a few prefix and '*' rules), loads it with
``load_policies`` and times ``PolicySet.decide`` over random requests. For comparison it times
plain Casbin: one Enforcer holding every row, the way Casbin is normally used (few samples at 10k).
Bounded: about a minute on a 2-core machine.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchinfo import load_average, markdown_caption

from broker.models import Intent, RegisteredWorkload, WorkloadIdentity
from broker.policy import SUPPORTED_MODEL, PolicySet, load_policies
from broker.policy.engine import plain_enforcer

N_ROLES = 20
N_WORKLOADS = 50
OPS = [
    "read",
    "list",
    "create",
    "update",
    "delete",
    "refund",
    "export",
    "approve",
    "cancel",
    "search",
    "get",
    "put",
    "sync",
    "close",
    "open",
    "assign",
    "tag",
    "archive",
    "restore",
    "audit",
]
CONDITIONS = [
    "amount <= {n} && currency == 'EUR'",
    "amount > 0 && amount <= {n}",
    "tier in ['gold', 'silver']",
    "priority != 'urgent'",
    "owner == $customer",
    "count <= {n} && region == 'eu'",
]


def generate(directory: Path, n_rules: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """Write a policy directory with ``n_rules`` rules; return its actions and services."""
    n_actions = max(5, n_rules // 10)
    n_services = max(1, n_actions // len(OPS))
    services = [f"svc{i}" for i in range(n_services)]
    actions = [f"{services[i % n_services]}.{OPS[i // n_services % len(OPS)]}" for i in range(n_actions)]
    actions = sorted(set(actions))
    roles = [f"role{i}" for i in range(N_ROLES)]
    audiences = [f"{s}-api" for s in services]

    workloads = []
    for i in range(N_WORKLOADS):
        mine = rng.sample(roles, rng.randint(1, 3))
        auds = sorted(set(rng.sample(audiences, min(len(audiences), 5))))
        workloads.append(
            "[[workload]]\n"
            f'name = "bot{i}"\n'
            f'spiffe_id = "spiffe://bench.example/ns/bots/sa/bot{i}"\n'
            f'owner = "Owner {i} <owner{i}@example.com>"\n'
            f"roles = {mine!r}\n"
            f"audiences = {auds!r}\n"
            'attestation = ["spiffe-jwt"]\n'
        )
    lines = [f"g, role{i}, role{i + 1}" for i in range(0, N_ROLES - 1, 4)]
    # A few rules for every action: '*' denies that every bucket carries.
    star = [
        "p, *, *, *, secrets/**, , deny, no-secrets, -, -",
        "p, *, *, *, admin/**, , deny, no-admin, -, -",
    ]
    lines += star
    for i in range(n_rules - len(star)):
        roll = rng.random()
        if roll < 0.03:
            action = f"{rng.choice(services)}.*"
        else:
            action = rng.choice(actions)
        service = action.split(".")[0]
        subject = rng.choice(roles) if rng.random() < 0.9 else f"bot{rng.randrange(N_WORKLOADS)}"
        audience = f"{service}-api" if rng.random() < 0.9 else "*"
        resource = rng.choice(
            [
                f"{service}/{{customer}}/items/*",
                f"{service}/*",
                f"{service}/**",
                f"{service}/{{customer}}",
                f"{service}/shared/*",
            ]
        )
        cond = rng.choice(CONDITIONS).format(n=rng.choice([10, 50, 100, 500])) if rng.random() < 0.5 else ""
        if rng.random() < 0.1:
            tail = "deny, -, -" if rng.random() < 0.5 else "deny, 60, jwt"
        else:
            tail = f"allow, {rng.choice([60, 120, 300, 600, 900])}, jwt"
        effect, ttl, kind = tail.split(", ")
        lines.append(
            f'p, {subject}, {audience}, {action}, {resource}, "{cond}", {effect}, rule-{i:05d}, {ttl}, {kind}'
        )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.conf").write_text(SUPPORTED_MODEL)
    (directory / "policy.csv").write_text("\n".join(lines) + "\n")
    (directory / "workloads.toml").write_text("\n".join(workloads).replace("'", '"'))
    return actions, services


def requests(
    policy_set: PolicySet, actions: list[str], services: list[str], n: int, rng: random.Random
) -> list[tuple[RegisteredWorkload, str, Intent]]:
    workloads: list[RegisteredWorkload] = []
    for entry in policy_set.registry:
        identity = WorkloadIdentity(
            entry.spiffe_id, "bench", "spiffe-jwt", entry.spiffe_id, "sha256:" + "0" * 64, 0
        )
        workloads.append(policy_set.resolve_workload(identity))
    out: list[tuple[RegisteredWorkload, str, Intent]] = []
    for _ in range(n):
        workload = rng.choice(workloads)
        action = rng.choice(actions) if rng.random() < 0.95 else f"{rng.choice(services)}.unseen"
        service = action.split(".")[0]
        customer = f"c{rng.randrange(5)}"
        resource = rng.choice(
            [
                f"{service}/{customer}/items/i{rng.randrange(9)}",
                f"{service}/{customer}",
                f"{service}/shared/x",
                f"{service}/c{rng.randrange(5)}/items/i1",
                "secrets/db/password",
            ]
        )
        ctx: dict[str, Any] = {
            "customer": customer,
            "owner": rng.choice([customer, "c9"]),
            "amount": rng.choice([5, 20, 75, 250, 1000]),
            "currency": rng.choice(["EUR", "EUR", "USD"]),
            "tier": rng.choice(["gold", "bronze"]),
            "priority": rng.choice(["low", "urgent"]),
            "count": rng.randrange(200),
            "region": rng.choice(["eu", "us"]),
        }
        audience = f"{service}-api" if rng.random() < 0.9 else rng.choice(workload.audiences)
        out.append((workload, audience, Intent(action, resource, ctx)))
    return out


def percentile(sorted_ns: list[int], q: float) -> float:
    index = min(len(sorted_ns) - 1, round(q * (len(sorted_ns) - 1)))
    return sorted_ns[index] / 1000.0


def bench(n_rules: int, n_requests: int, plain_samples: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed + n_rules)
    with tempfile.TemporaryDirectory() as tmp:
        actions, services = generate(Path(tmp), n_rules, rng)
        t0 = time.perf_counter()
        policy_set = load_policies(Path(tmp))
    load_s = time.perf_counter() - t0
    batch = requests(policy_set, actions, services, n_requests, rng)
    for workload, audience, intent in batch[:200]:  # warm-up
        policy_set.decide(workload, audience, intent)
    timings: list[int] = []
    allowed = 0
    clock = time.perf_counter_ns
    cpu0 = time.thread_time()
    for workload, audience, intent in batch:
        start = clock()
        decision = policy_set.decide(workload, audience, intent)
        timings.append(clock() - start)
        allowed += decision.effect == "allow"
    cpu_us = (time.thread_time() - cpu0) * 1e6 / len(batch)  # CPU time: what a busy machine distorts least
    timings.sort()

    t0 = time.perf_counter()
    plain = plain_enforcer(policy_set)
    plain_build_s = time.perf_counter() - t0
    plain_ns: list[int] = []
    for workload, audience, intent in batch[:plain_samples]:
        start = clock()
        plain.enforce(workload.name, audience, intent.action, intent.resource, intent.context)
        plain_ns.append(clock() - start)
    plain_ns.sort()
    return {
        "rules": len(policy_set.rules),
        "actions": len(actions),
        "load_s": load_s,
        "p50": percentile(timings, 0.50),
        "p99": percentile(timings, 0.99),
        "mean": statistics.fmean(timings) / 1000.0,
        "cpu_us": cpu_us,
        "allow": 100.0 * allowed / len(batch),
        "n": len(batch),
        "plain_p50": percentile(plain_ns, 0.50),
        "plain_n": len(plain_ns),
        "plain_build_s": plain_build_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--requests", type=int, default=20_000, help="decide() calls per size (default 20000)"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--markdown", action="store_true", help="also print the table for the README")
    args = parser.parse_args()
    start_load = load_average()
    sizes = [(10, 2000), (1_000, 300), (10_000, 30)]  # (rules, plain Casbin samples)
    rows = []
    for n_rules, plain_samples in sizes:
        rows.append(bench(n_rules, args.requests, plain_samples, args.seed))
        print(f"  done: {n_rules} rules", flush=True)
    print()
    print("indexed decide() vs plain Casbin enforce(), latency in microseconds")
    header = (
        f"{'rules':>6} {'actions':>7} {'load s':>7} {'requests':>8} {'allow %':>7} "
        f"{'p50':>7} {'p99':>7} {'mean':>7} | {'plain p50':>10} {'(n)':>5} {'speed-up':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['rules']:>6} {r['actions']:>7} {r['load_s']:>7.2f} {r['n']:>8} {r['allow']:>7.1f} "
            f"{r['p50']:>7.0f} {r['p99']:>7.0f} {r['mean']:>7.0f} | {r['plain_p50']:>10.0f} "
            f"{r['plain_n']:>5} {r['plain_p50'] / r['p50']:>7.0f}x"
        )
    if args.markdown:
        print()
        print(markdown_caption(start_load) + " One thread.\n")
        print("| rules | decide() p50 µs | p99 µs | CPU µs per decide() | plain Casbin `enforce()` p50 µs "
              "| plain ÷ decide() |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['rules']:,} | {r['p50']:.0f} | {r['p99']:.0f} | {r['cpu_us']:.0f} | {r['plain_p50']:,.0f} | "
                  f"{r['plain_p50'] / r['p50']:,.0f}x |")


if __name__ == "__main__":
    main()
