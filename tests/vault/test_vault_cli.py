"""``nhi-broker dev vault`` as a user runs it, Vault settings from TOML, and policy tests of kinds."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import hvac
import psycopg
import pytest
import requests

from broker.config import load_settings
from broker.policy import load_policies
from broker.policy.testing import run_policy_tests
from broker.vault.settings import VaultSettings
from tests.helpers import POLICIES, free_port

NHI = str(Path(sys.executable).with_name("nhi-broker"))


def test_dev_vault_prints_settings_and_cleans_up(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "out.txt"
    with log.open("wb") as out:
        proc = subprocess.Popen([NHI, "dev", "vault", "--port", str(port), "--dir", str(tmp_path / "dv")],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while "Ctrl-C" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        text = log.read_text()
        env = dict(re.findall(r"export (NHI_BROKER_VAULT__\w+)=(\S+)", text))
        assert env["NHI_BROKER_VAULT__ADDR"] == f"http://127.0.0.1:{port}"
        assert (tmp_path / "dv" / "approle-secret-id").stat().st_mode & 0o077 == 0
        # The printed settings work: the broker's AppRole logs in and gets a database user.
        client = hvac.Client(url=env["NHI_BROKER_VAULT__ADDR"])
        secret_id = Path(env["NHI_BROKER_VAULT__APPROLE_SECRET_ID_FILE"]).read_text().strip()
        client.auth.approle.login(env["NHI_BROKER_VAULT__APPROLE_ROLE_ID"], secret_id)
        user = client.secrets.database.generate_credentials("orders-reader")["data"]["username"]
        assert root_can_see_role(user)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    assert proc.returncode == 0, log.read_text()
    assert not root_can_see_role(user)  # stopping revoked the database user
    with pytest.raises(requests.ConnectionError):  # the dev server is gone
        hvac.Client(url=f"http://127.0.0.1:{port}", timeout=1).sys.is_initialized()


def root_can_see_role(name: str) -> bool:
    with psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname="test") as conn:
        return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone() is not None


def test_vault_settings_from_toml(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    config.write_text('[vault]\naddr = "https://vault.example.com:8200"\napprole_role_id = "r-1"\n'
                      f'approle_secret_id_file = "{tmp_path / "sid"}"\nsweep_interval = 30\n')
    settings = load_settings(config, data_dir=tmp_path)
    assert settings.vault == VaultSettings(addr="https://vault.example.com:8200", approle_role_id="r-1",
                                           approle_secret_id_file=tmp_path / "sid", sweep_interval=30)


def test_policy_test_checks_the_kind(tmp_path: Path) -> None:
    tests = tmp_path / "tests.toml"
    tests.write_text('''
[[case]]
name = "right kind"
workload = "spiffe://example.org/ns/support/sa/support-assistant"
audience = "orders-db"
action = "orders.query"
resource = "customers/c-1001/orders"
context = { customer = "c-1001" }
expect = "allow"
kind = "vault-db:orders-reader;rows=customer"

[[case]]
name = "wrong kind"
workload = "spiffe://example.org/ns/support/sa/support-assistant"
audience = "orders-db"
action = "orders.query"
resource = "customers/c-1001/orders"
context = { customer = "c-1001" }
expect = "allow"
kind = "jwt"
''')
    results = run_policy_tests(load_policies(POLICIES), tests)
    assert [r.passed for r in results] == [True, False]
    assert results[1].message.startswith("expected kind jwt, got vault-db:orders-reader;rows=customer")
