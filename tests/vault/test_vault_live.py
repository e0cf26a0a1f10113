"""Over real HTTP against ``nhi-broker serve`` configured by environment, as docs/vault.md shows:
a chatbot gets a database user for one intent, uses it, releases it; a short task is swept at expiry."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from broker.vault.devserver import DevVault
from tests.helpers import SUPPORT, LiveBroker, exchange_form, intent
from tests.vault.conftest import DB_CREDS, db_connect, policies_with

NHI = str(Path(sys.executable).with_name("nhi-broker"))


def dev_identity(broker: LiveBroker) -> str:
    out = subprocess.run([NHI, "dev", "identity", SUPPORT, "--data-dir", str(broker.data_dir)],
                         capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.strip()


def ledger(broker: LiveBroker) -> list[dict[str, Any]]:
    size = int(httpx.get(broker.url + "/v1/ledger/checkpoint").text.splitlines()[1])
    return [e["entry"] for e in httpx.get(broker.url + "/v1/ledger/entries",
                                          params={"start": 0, "end": size}).json()["entries"]]


def test_live_broker_db_user_release_and_sweep(tmp_path: Path, dev_vault: DevVault) -> None:
    policies = policies_with(tmp_path, "p, support-agent, orders-db, orders.peek, customers/{customer}/orders, , "
                                       "allow, peek, 2, vault-db:orders-reader")
    env = {**dev_vault.env(), "NHI_BROKER_VAULT__SWEEP_INTERVAL": "0.5"}
    broker = LiveBroker(tmp_path / "data", policies, env=env)
    try:
        details = intent("orders.query", "customers/c-1001/orders", customer="c-1001")
        r = httpx.post(broker.url + "/v1/token", data=exchange_form(dev_identity(broker), "orders-db", details,
                                                                     requested_token_type=DB_CREDS))
        assert r.status_code == 200, r.text
        body = r.json()
        with db_connect(body["vault"]["username"], body["access_token"]) as conn:
            assert conn.execute("SELECT count(*) FROM orders").fetchone() is not None
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT pan FROM payment_cards")
        released = httpx.post(broker.url + "/v1/credentials/release", data={"release_token": body["release_token"]})
        assert released.json()["state"] == "revoked", released.text
        with pytest.raises(psycopg.OperationalError):
            db_connect(body["vault"]["username"], body["access_token"])

        # A 2 s task nobody releases: the background sweeper records its end.
        peek = intent("orders.peek", "customers/c-1001/orders", customer="c-1001")
        r = httpx.post(broker.url + "/v1/token", data=exchange_form(dev_identity(broker), "orders-db", peek,
                                                                     requested_token_type=DB_CREDS))
        assert r.status_code == 200, r.text
        task = r.json()["task_id"]
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            reasons = {e["revocation"]["jti"]: e["revocation"]["reason"]
                       for e in ledger(broker) if e["kind"] == "revocation"}
            if task in reasons:
                break
            time.sleep(0.3)
        assert reasons == {body["task_id"]: "released", task: "expired"}
    finally:
        out = broker.stop()
    assert body["access_token"] not in out and body["release_token"] not in out  # never logged
