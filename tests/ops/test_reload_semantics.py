"""The reload protocol of broker.reload, in one process with real components (SQLite ledger and state):
two runtimes on one data directory stand for two workers."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.config import Settings
from broker.errors import LedgerUnavailable, PolicyLoadError
from broker.runtime import Runtime
from tests.helpers import POLICIES

FREEZE = "p, support-agent, orders-api, orders.read, customers/c-42/orders/*, , deny, reload-freeze-c42, -, -\n"

pytestmark = pytest.mark.anyio


def policy_dir(root: Path, name: str = "policies") -> Path:
    target = root / name
    shutil.copytree(POLICIES, target, ignore=shutil.ignore_patterns("vault"))
    return target


def open_runtime(data: Path, policies: Path) -> Runtime:
    return Runtime.open(Settings(data_dir=data, policies_dir=policies))


def policy_loads(runtime: Runtime) -> list[dict]:  # type: ignore[type-arg]
    entries = [json.loads(e) for e in runtime.ledger.entries(0, runtime.ledger.size())]
    return [e for e in entries if e["kind"] == "policy_load"]


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[tuple[Runtime, Runtime, Path]]:
    policies = policy_dir(tmp_path)
    a = open_runtime(tmp_path / "data", policies)
    b = open_runtime(tmp_path / "data", policies)
    try:
        yield a, b, policies
    finally:
        a.close()
        b.close()


async def test_one_entry_per_change_and_the_other_worker_follows(workers: tuple[Runtime, Runtime, Path]) -> None:
    a, b, policies = workers
    first = await a.reload_policies("api")
    assert first.recorded  # no record yet (nothing announced a start): this reload records the set
    with (policies / "policy.csv").open("a") as f:
        f.write(FREEZE)
    old = a.policies
    outcome = await a.reload_policies("api", actor={"kind": "operator", "name": "alice", "role": "admin",
                                                    "auth": "bearer"})
    assert outcome.changed and outcome.recorded and a.policies is not old
    assert a.broker.policies is a.policies  # the request path sees the new set too
    assert b.policies.version == old.version
    assert await b.reloads.follow() is True  # type: ignore[union-attr]
    assert b.policies.version == outcome.version and b.broker.policies is b.policies
    assert await b.reloads.follow() is False  # type: ignore[union-attr]
    # The other worker reloading the same set records nothing more; it names the entry that did.
    again = await b.reload_policies("sighup")
    assert (again.changed, again.recorded, again.record) == (False, False, outcome.record)
    loads = policy_loads(a)
    assert [e["policy"]["version"] for e in loads] == [first.version, outcome.version]
    assert loads[1]["actor"]["name"] == "alice" and "actor" not in loads[0]


async def test_a_refused_set_changes_nothing(workers: tuple[Runtime, Runtime, Path]) -> None:
    a, b, policies = workers
    await a.reload_policies("api")
    before, entries = a.policies, a.ledger.size()
    (policies / "workloads.toml").write_text((policies / "workloads.toml").read_text() + "\n[[workload]]\nname = 1\n")
    with pytest.raises(PolicyLoadError) as refused:
        await a.reload_policies("api")
    assert any(p.startswith("workloads.toml") for p in refused.value.problems), refused.value.problems
    assert a.policies is before and a.ledger.size() == entries
    assert await b.reloads.follow() is False  # type: ignore[union-attr]


async def test_tests_toml_is_linted_as_policy_lint_does(workers: tuple[Runtime, Runtime, Path]) -> None:
    a, _, policies = workers
    (policies / "tests.toml").write_text("[[case]]\nname = 'x'\n")
    with pytest.raises(PolicyLoadError) as refused:
        await a.reload_policies("api")
    assert all(p.startswith("tests.toml") for p in refused.value.problems), refused.value.problems


async def test_the_old_set_comes_back_when_the_entry_cannot_be_written(
    workers: tuple[Runtime, Runtime, Path],
) -> None:
    a, b, policies = workers
    await a.reload_policies("api")
    record = await a.reloads.record()  # type: ignore[union-attr]
    with (policies / "policy.csv").open("a") as f:
        f.write(FREEZE)
    before = a.policies
    a.ledger.close()
    with pytest.raises(LedgerUnavailable):
        await a.reload_policies("api")
    assert a.policies is before and a.broker.policies is before
    assert await a.reloads.record() == record  # type: ignore[union-attr]
    assert await b.reloads.follow() is False  # type: ignore[union-attr]


async def test_a_replica_with_other_files_keeps_its_set_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    leader_files = policy_dir(tmp_path, "leader")
    replica_files = policy_dir(tmp_path, "replica")
    a = open_runtime(tmp_path / "data", leader_files)
    b = open_runtime(tmp_path / "data", replica_files)
    try:
        with (leader_files / "policy.csv").open("a") as f:
            f.write(FREEZE)
        outcome = await a.reload_policies("api")
        serving = b.policies
        with caplog.at_level(logging.WARNING, logger="nhi_broker.reload"):
            assert await b.reloads.follow() is False  # type: ignore[union-attr]
            assert await b.reloads.follow() is False  # type: ignore[union-attr]
        assert b.policies is serving
        warnings = [r.getMessage() for r in caplog.records if "cannot follow it yet" in r.getMessage()]
        assert len(warnings) == 1 and outcome.version in warnings[0] and serving.version in warnings[0]
        # Its files catch up (a ConfigMap update): it follows, without another entry.
        shutil.copy(leader_files / "policy.csv", replica_files / "policy.csv")
        assert await b.reloads.follow() is True  # type: ignore[union-attr]
        assert b.policies.version == outcome.version
        assert len(policy_loads(a)) == 1
    finally:
        await a.aclose()
        await b.aclose()


async def test_limits_approval_terms_and_registry_change_with_a_reload(workers: tuple[Runtime, Runtime, Path]) -> None:
    a, b, policies = workers
    assert a.policies.limits["tickets-create"].rate == (120, 60)
    assert a.policies.reviews["refund-review-eur"].approvals == 1
    (policies / "limits.toml").write_text((policies / "limits.toml").read_text().replace('"120/minute"', '"5/minute"'))
    (policies / "approvals.toml").write_text(
        (policies / "approvals.toml").read_text().replace("approvals = 1", "approvals = 2", 1))
    (policies / "workloads.toml").write_text((policies / "workloads.toml").read_text().replace(
        'owner = "Dana Reyes <dana.reyes@example.com>"', 'owner = "Lee Park <lee.park@example.com>"'))
    await a.reload_policies("api")
    await b.reloads.follow()  # type: ignore[union-attr]
    for runtime in (a, b):
        assert runtime.policies.limits["tickets-create"].rate == (5, 60)
        assert runtime.policies.reviews["refund-review-eur"].approvals == 2
        assert runtime.policies.registry.get("support-assistant").owner == "Lee Park <lee.park@example.com>"  # type: ignore[union-attr]


async def test_a_worker_started_after_an_edit_records_what_it_serves(tmp_path: Path) -> None:
    """A worker respawned after the files were edited (no reload asked) serves a set nobody recorded:
    it records it, and the other workers follow, rather than serve two sets."""
    policies = policy_dir(tmp_path)
    a = open_runtime(tmp_path / "data", policies)
    try:
        started = await a.reload_policies("api")
        with (policies / "policy.csv").open("a") as f:
            f.write(FREEZE)
        respawned = open_runtime(tmp_path / "data", policies)
        try:
            assert respawned.policies.version != started.version
            outcome = await respawned.reloads.check_started()  # type: ignore[union-attr]
            assert outcome is not None and outcome.recorded and not outcome.changed
            assert await respawned.reloads.check_started() is None  # type: ignore[union-attr]
        finally:
            await respawned.aclose()
        assert await a.reloads.follow() is True  # type: ignore[union-attr]
        assert a.policies.version == outcome.version
        assert [e["request_id"].split("-")[1] for e in policy_loads(a)] == ["api", "worker"]
    finally:
        await a.aclose()
