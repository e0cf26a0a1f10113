"""Failure modes against the real OpenBao: fail closed, say why, leave no live credential behind."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac.exceptions
import pytest

from broker.config import Settings
from broker.errors import LedgerUnavailable
from broker.vault.devserver import DevVault
from broker.vault.settings import VaultSettings
from tests.helpers import POLICIES, SUPPORT, free_port, intent
from tests.vault.conftest import DB_CREDS, VAULT_TOKEN, WRAPPED, VaultBroker, open_broker, policies_with

ORDERS = intent("orders.query", "customers/c-1001/orders", customer="c-1001")


def leases(broker: VaultBroker) -> list[tuple[str, str, str]]:
    path = broker.runtime.settings.data_dir / "vault-leases.sqlite3"
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT ref, state, reason FROM vault_leases").fetchall()


def assert_denied_without_credential(broker: VaultBroker, r: Any, status: int, error: str, says: str) -> None:
    assert (r.status_code, r.json()["error"]) == (status, error), r.text
    assert says in r.json()["error_description"]
    assert "access_token" not in r.json()
    last = broker.entries()[-1]
    assert last["kind"] == "denial"
    assert (last["decision"]["error"], last["decision"]["rule"]) == (error, "orders-db-read")
    assert leases(broker) == []


def broker_for(tmp_path: Path, vault: VaultSettings | None, policies: Path = POLICIES) -> Iterator[VaultBroker]:
    return open_broker(Settings(data_dir=tmp_path / "data", policies_dir=policies, vault=vault))


def test_vault_unreachable_is_503_and_a_denial(tmp_path: Path, dev_vault: DevVault) -> None:
    nowhere = dev_vault.settings(addr=f"http://127.0.0.1:{free_port()}", timeout=1.0)
    for broker in broker_for(tmp_path, nowhere):
        r = broker.exchange(SUPPORT, "orders-db", ORDERS, requested_token_type=DB_CREDS)
        assert_denied_without_credential(broker, r, 503, "temporarily_unavailable", "unreachable")
        assert r.headers["retry-after"] == "1"


def test_vault_sealed_is_503_and_a_denial(tmp_path: Path) -> None:
    with DevVault.start(tmp_path / "sealed") as sealed:
        settings = sealed.settings()
        sealed.client().sys.seal()
        for broker in broker_for(tmp_path, settings):
            r = broker.exchange(SUPPORT, "orders-db", ORDERS, requested_token_type=DB_CREDS)
            assert_denied_without_credential(broker, r, 503, "temporarily_unavailable", "sealed")


def test_broker_identity_refused_is_503(tmp_path: Path, dev_vault: DevVault) -> None:
    wrong = tmp_path / "wrong-secret-id"
    wrong.write_text("00000000-0000-0000-0000-000000000000\n")
    for broker in broker_for(tmp_path, dev_vault.settings(approle_secret_id_file=wrong)):
        r = broker.exchange(SUPPORT, "orders-db", ORDERS, requested_token_type=DB_CREDS)
        assert_denied_without_credential(broker, r, 503, "temporarily_unavailable", "broker's own Vault identity")


def test_no_vault_configured_is_503_and_a_denial(tmp_path: Path) -> None:
    for broker in broker_for(tmp_path, None):
        r = broker.exchange(SUPPORT, "orders-db", ORDERS, requested_token_type=DB_CREDS)
        assert (r.status_code, r.json()["error"]) == (503, "temporarily_unavailable")
        assert "no Vault configured" in r.json()["error_description"]
        assert broker.entries()[-1]["kind"] == "denial"
        r = broker.release("anything")
        assert (r.status_code, r.json()["error"]) == (503, "temporarily_unavailable")


@pytest.mark.parametrize(
    ("kind", "urn", "description"),
    [
        ("vault-db:no-such-role", DB_CREDS, "Vault refused database role 'no-such-role' (invalid request)"),
        # Not in the task token role's allowed_policies: the broker cannot hand it out.
        ("vault-token:nhi-broker", VAULT_TOKEN, "Vault refused token policies 'nhi-broker' (invalid request)"),
        # Outside the broker's own Vault policy (kv/data/support/* only).
        ("vault-wrapped:kv/kb/config", WRAPPED, "Vault refused secret 'kv/kb/config' (permission denied)"),
        ("vault-wrapped:kv/support/absent", WRAPPED, "Vault did not wrap secret 'kv/support/absent' (no such secret?)"),
    ],
)
def test_vault_refusal_names_the_vault_object(
    tmp_path: Path, dev_vault: DevVault, kind: str, urn: str, description: str
) -> None:
    policies = policies_with(tmp_path, "p, support-agent, orders-db, orders.audit, customers/{customer}/orders, , "
                                       f"allow, orders-db-audit, 60, {kind}")
    for broker in broker_for(tmp_path, dev_vault.settings(sweep_interval=3600), policies):
        r = broker.exchange(SUPPORT, "orders-db", intent("orders.audit", "customers/c-1001/orders", customer="c-1001"),
                            requested_token_type=urn)
        assert (r.status_code, r.json()["error"]) == (403, "access_denied"), r.text
        assert r.json()["error_description"] == description
        last = broker.entries()[-1]
        assert (last["kind"], last["decision"]["rule"], last["decision"]["error"]) == (
            "denial", "orders-db-audit", "access_denied")
        assert leases(broker) == []


class RefusingLedger:
    """The real ledger, except that issuance entries fail to append (a full disk, a dead writer)."""

    def __init__(self, real: Any, error: BaseException) -> None:
        self.real = real
        self.error = error

    def append(self, entry: dict[str, Any]) -> Any:
        return self.real.append(entry)

    async def append_async(self, entry: dict[str, Any]) -> Any:
        if entry["kind"] == "issuance":
            raise self.error
        return await self.real.append_async(entry)


@pytest.mark.parametrize("error", [LedgerUnavailable("ledger unavailable: disk full"), OSError("disk full")])
def test_ledger_failure_revokes_the_minted_lease(tmp_path: Path, dev_vault: DevVault, error: Exception) -> None:
    for broker in broker_for(tmp_path, dev_vault.settings(sweep_interval=3600)):
        assert broker.runtime.vault is not None
        broker.runtime.vault.ledger = RefusingLedger(broker.runtime.ledger, error)
        r = broker.exchange(SUPPORT, "orders-db", ORDERS, requested_token_type=DB_CREDS)
        assert (r.status_code, r.json()["error"]) == (503, "temporarily_unavailable"), r.text
        assert "access_token" not in r.json()
        [(lease_id, state, reason)] = leases(broker)
        assert (state, reason) == ("revoked", "ledger_append_failed")
        # Vault itself no longer knows the lease: the database user is gone.
        with pytest.raises(hvac.exceptions.InvalidRequest, match="invalid lease"):
            dev_vault.client().sys.read_lease(lease_id)
        last = broker.entries()[-1]
        revoked = last["revocation"]
        assert (last["kind"], revoked["reason"], revoked["issuance"]) == ("revocation", "ledger_append_failed", None)
        assert last["actor"] == {"kind": "broker"}
        assert revoked["credential"]["lease_id"] == lease_id


def open_db_leases(vault: DevVault) -> set[str]:
    """Every open database lease, under every role (the sample rule mints from scoped roles)."""
    client = vault.client()
    try:
        roles = client.sys.list_leases("database/creds")["data"]["keys"]
    except hvac.exceptions.InvalidPath:
        return set()
    leases: set[str] = set()
    for role in roles:
        try:
            leases.update(role + key for key in client.sys.list_leases(f"database/creds/{role}")["data"]["keys"])
        except hvac.exceptions.InvalidPath:
            continue  # its last lease ended between the two listings
    return leases


def test_lease_book_down_still_revokes(tmp_path: Path, dev_vault: DevVault) -> None:
    for broker in broker_for(tmp_path, dev_vault.settings(sweep_interval=3600)):
        assert broker.runtime.vault is not None
        before = open_db_leases(dev_vault)
        broker.runtime.vault.leases.close()  # the lease book's file is gone from under the broker
        r = broker.exchange(SUPPORT, "orders-db", ORDERS, requested_token_type=DB_CREDS)
        assert (r.status_code, r.json()["error"]) == (503, "temporarily_unavailable"), r.text
        assert "lease book unavailable" in r.json()["error_description"]
        assert open_db_leases(dev_vault) == before  # minted, then revoked straight away
        assert all(e["kind"] != "issuance" for e in broker.entries())


def test_failure_after_the_issuance_entry_revokes_and_points_at_it(tmp_path: Path, dev_vault: DevVault) -> None:
    from broker.errors import StoreUnavailable
    from broker.ledger.merkle import leaf_hash
    from broker.vault.leases import LeaseBook

    class LeaseBookFailingAfterAppend(LeaseBook):
        def mark_live(self, task_id: str, leaf_hash: str) -> None:
            raise StoreUnavailable("lease book unavailable: disk I/O error")

    for broker in broker_for(tmp_path, dev_vault.settings(sweep_interval=3600)):
        vault = broker.runtime.vault
        assert vault is not None
        vault.leases.close()
        vault.leases = LeaseBookFailingAfterAppend(tmp_path / "data" / "vault-leases.sqlite3")
        r = broker.exchange(SUPPORT, "orders-db", ORDERS, requested_token_type=DB_CREDS)
        assert (r.status_code, r.json()["error"]) == (503, "temporarily_unavailable"), r.text
        issuance, revocation = broker.entries()[-2:]
        assert issuance["kind"] == "issuance"
        leaf = broker.runtime.ledger.entries(broker.runtime.ledger.size() - 2, broker.runtime.ledger.size() - 1)[0]
        assert (revocation["kind"], revocation["revocation"]["reason"]) == ("revocation", "issuance_failed")
        assert revocation["revocation"]["issuance"] == leaf_hash(leaf).hex()
        with pytest.raises(hvac.exceptions.InvalidRequest, match="invalid lease"):
            dev_vault.client().sys.read_lease(issuance["credential"]["lease_id"])
