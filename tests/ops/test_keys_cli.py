"""``nhi-broker keys init`` (provisioning keys for replicas, recorded in the ledger) and ``keys list``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from broker.ledger import SqliteLedgerStorage
from tests.helpers import POLICIES

NHI = str(Path(sys.executable).with_name("nhi-broker"))


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NHI_BROKER_")}
    return subprocess.run([NHI, *args], capture_output=True, text=True, env=env, timeout=60)


def test_keys_init_creates_and_records_once_then_keys_list(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = run("keys", "init", "--data-dir", str(data), "--policies", str(POLICIES))
    assert first.returncode == 0, first.stderr
    assert "(created and recorded: ledger, task-token)" in first.stdout
    second = run("keys", "init", "--data-dir", str(data), "--policies", str(POLICIES))
    assert second.returncode == 0 and "(all existed)" in second.stdout
    assert first.stdout.splitlines()[1:3] == second.stdout.splitlines()[1:3]  # same verifier key and kid

    storage = SqliteLedgerStorage(data / "ledger.sqlite3")
    try:
        entries = [json.loads(e) for e in storage.entries(0, storage.size())]
    finally:
        storage.close()
    assert [(e["kind"], e["key"]["purpose"]) for e in entries] == [
        ("key_rotation", "ledger"), ("key_rotation", "task-token")]  # no policy_load: nothing started

    listed = run("keys", "list", "--data-dir", str(data), "--format", "json")
    assert listed.returncode == 0, listed.stderr
    (key,) = json.loads(listed.stdout)["keys"]
    kid = first.stdout.splitlines()[2].split()[2]
    assert key["kid"] == kid and key["state"] == "active" and key["alg"] == "ES256"
    assert isinstance(key["created_at"], int)
    table = run("keys", "list", "--data-dir", str(data))
    assert table.stdout.startswith(f"{kid}  ES256  created 20") and " ago)  active" in table.stdout
