"""``nhi-broker admin leases`` and ``config check`` against a live broker wired to a real OpenBao."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from broker.operators import hash_secret
from broker.vault.devserver import DevVault
from tests.helpers import REPO, SUPPORT, LiveBroker, exchange_form, intent
from tests.vault.conftest import DB_CREDS, db_connect

NHI = str(Path(sys.executable).with_name("nhi-broker"))
ADMIN, AUDITOR = "admin-secret-9f8e7d6c5b4a", "auditor-secret-9f8e7d6c5b4a"
OPERATORS = json.dumps([{"name": "alice", "role": "admin", "token_sha256": hash_secret(ADMIN)},
                        {"name": "audrey", "role": "auditor", "token_sha256": hash_secret(AUDITOR)}])


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NHI_BROKER_")}
    return subprocess.run([NHI, *args], capture_output=True, text=True, env={**clean, **env}, timeout=60)


def test_list_and_revoke_a_lease(tmp_path: Path, dev_vault: DevVault) -> None:
    broker = LiveBroker(tmp_path / "data", env={**dev_vault.env(), "NHI_BROKER_OPERATORS": OPERATORS})
    try:
        identity = run("dev", "identity", SUPPORT, "--data-dir", str(broker.data_dir), env={}).stdout.strip()
        details = intent("orders.query", "customers/c-1001/orders", customer="c-1001")
        r = httpx.post(broker.url + "/v1/token", data=exchange_form(identity, "orders-db", details,
                                                                     requested_token_type=DB_CREDS))
        assert r.status_code == 200, r.text
        body = r.json()
        task = body["task_id"]
        # docs/vault.md's response example has exactly the members the broker serves.
        documented = json.loads(re.findall(r"```json\n(\{\n  \"access_token\".*?)```",
                                           (REPO / "docs" / "vault.md").read_text(), re.S)[0])
        assert set(documented) == set(body) and set(documented["vault"]) == set(body["vault"])
        cli = {"NHI_BROKER_URL": broker.url, "NHI_BROKER_TOKEN": ADMIN}

        listing = run("admin", "leases", "list", "--format", "json", env=cli)
        assert listing.returncode == 0, listing.stderr
        answer: dict[str, Any] = json.loads(listing.stdout)
        assert answer["vault_configured"] is True
        lease = next(x for x in answer["leases"] if x["task_id"] == task)
        assert lease["state"] == "live" and lease["workload"] == "support-assistant" and lease["ref_type"] == "lease"
        assert body["access_token"] not in listing.stdout  # never a secret
        table = run("admin", "leases", "list", "--workload", "support-assistant", env=cli)
        assert task in table.stdout and "(in " in table.stdout

        refused = run("admin", "leases", "revoke", task, "--reason", "x", env={**cli, "NHI_BROKER_TOKEN": AUDITOR})
        assert refused.returncode == 4 and "may not revoke" in refused.stderr

        revoked = run("admin", "leases", "revoke", task, "--reason", "leaked in a log", "--format", "json", env=cli)
        assert revoked.returncode == 0, revoked.stderr
        assert json.loads(revoked.stdout)["state"] == "revoked"
        with pytest.raises(psycopg.OperationalError):
            db_connect(body["vault"]["username"], body["access_token"])
        size = int(httpx.get(broker.url + "/v1/ledger/checkpoint").text.splitlines()[1])
        page = httpx.get(broker.url + "/v1/ledger/entries", params={"start": 0, "end": size}).json()
        last = [e["entry"] for e in page["entries"] if e["entry"]["kind"] == "revocation"][-1]
        assert last["actor"]["name"] == "alice"
        assert last["revocation"]["scope"] == "lease" and last["revocation"]["jti"] == task
        assert last["revocation"]["reason"] == "leaked in a log"

        again = run("admin", "leases", "revoke", task, "--reason", "again", "--format", "json", env=cli)
        assert again.returncode == 0 and json.loads(again.stdout)["state"] == "revoked"  # idempotent
        open_now = json.loads(run("admin", "leases", "list", "--format", "json", env=cli).stdout)
        assert task not in [x["task_id"] for x in open_now["leases"]]
        every = json.loads(run("admin", "leases", "list", "--all", "--format", "json", env=cli).stdout)
        assert task in [x["task_id"] for x in every["leases"]]
        missing = run("admin", "leases", "revoke", "no-such-task", "--reason", "x", env=cli)
        assert missing.returncode == 3 and "no Vault task 'no-such-task'" in missing.stderr
    finally:
        broker.stop()


def test_config_check_logs_in_to_vault(tmp_path: Path, dev_vault: DevVault) -> None:
    args = ("config", "check", "--data-dir", str(tmp_path / "data"), "--format", "json")
    good = run(*args, env=dev_vault.env())
    assert good.returncode == 0, good.stdout
    vault = next(c for c in json.loads(good.stdout)["checks"] if c["name"] == "vault")
    assert vault["status"] == "ok" and "login works" in vault["detail"]
    wrong = tmp_path / "secret-id"
    wrong.write_text("00000000-0000-0000-0000-000000000000\n")
    bad = run(*args, env={**dev_vault.env(), "NHI_BROKER_VAULT__APPROLE_SECRET_ID_FILE": str(wrong)})
    assert bad.returncode == 3
    vault = next(c for c in json.loads(bad.stdout)["checks"] if c["name"] == "vault")
    assert vault["status"] == "fail" and vault["detail"].startswith(dev_vault.addr)
