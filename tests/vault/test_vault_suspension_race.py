"""The kill switch against a request in flight, with a real OpenBao: a workload suspended after its
request was admitted, but before its lease was in the lease book, gets no credential.

The race is made deterministic, not timed: the broker's real :class:`VaultMinter` is replaced by a
subclass that, once OpenBao has really minted the secret, holds the request until the test has
suspended the workload through the admin API. At that moment the suspension's sweep finds no lease
to revoke (the lease is not in the book yet); the issuer must see the suspension when it re-reads the
kill switch after the lease is live, revoke the lease in OpenBao and answer 403 ``workload_suspended``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from broker.config import Settings
from broker.operators import hash_secret
from broker.vault.devserver import DevVault
from broker.vault.identity import VaultIdentity
from broker.vault.minter import MintedSecret, VaultMinter
from tests.helpers import POLICIES, SUPPORT
from tests.vault.conftest import DB_CREDS, VaultBroker, open_broker
from tests.vault.test_vault_exchange import ORDERS, lease_ttl

ADMIN_SECRET = "race-admin-secret-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_SECRET}"}


class HeldMinter(VaultMinter):
    """The real minter, holding each request right after OpenBao minted its secret until released."""

    def __init__(self, identity: VaultIdentity) -> None:
        super().__init__(identity)
        self.minted = threading.Event()
        self.proceed = threading.Event()
        self.lease_ids: list[str] = []

    def mint(self, *args: Any, **kwargs: Any) -> MintedSecret:
        secret = super().mint(*args, **kwargs)
        self.lease_ids.append(secret.ref)
        self.minted.set()
        if not self.proceed.wait(timeout=60):
            raise AssertionError("the test never released the held request")
        return secret


def held(broker: VaultBroker) -> HeldMinter:
    """Put a :class:`HeldMinter` in the broker's Vault issuer (constructor-injected, swapped here)."""
    vault = broker.runtime.vault
    assert vault is not None
    minter = HeldMinter(vault.minter.identity)
    vault.minter = minter
    return minter


@pytest.fixture
def race_broker(tmp_path: Path, dev_vault: DevVault) -> Iterator[VaultBroker]:
    settings = Settings(data_dir=tmp_path / "data", policies_dir=POLICIES,
                        vault=dev_vault.settings(sweep_interval=3600),
                        operators=[{"name": "ops", "role": "admin", "token_sha256": hash_secret(ADMIN_SECRET)}])
    yield from open_broker(settings)


def suspend_while_in_flight(requester: VaultBroker, suspender: VaultBroker, minter: HeldMinter,
                            headers: dict[str, str]) -> tuple[Any, Any]:
    """One Vault exchange on ``requester``, suspended on ``suspender`` while OpenBao's secret is held."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(requester.exchange, SUPPORT, "orders-db", ORDERS, requested_token_type=DB_CREDS)
        assert minter.minted.wait(timeout=60), "the request never reached OpenBao"
        try:
            suspended = suspender.client.post("/v1/admin/workloads/support-assistant/suspend",
                                              json={"reason": "incident drill"}, headers=headers)
        finally:
            minter.proceed.set()
        return suspended, pending.result(timeout=60)


def test_a_workload_suspended_while_its_request_is_in_flight_gets_no_credential(
    race_broker: VaultBroker, dev_vault: DevVault
) -> None:
    minter = held(race_broker)
    suspended, answer = suspend_while_in_flight(race_broker, race_broker, minter, ADMIN)
    assert suspended.status_code == 200, suspended.text
    assert suspended.json()["vault_leases_revoked"] == 0  # the lease was not in the book yet: the race
    # The request was admitted before the suspension, yet no credential leaves the broker.
    assert answer.status_code == 403, answer.text
    assert answer.json()["error"] == "workload_suspended"
    assert "access_token" not in answer.json()
    (lease_id,) = minter.lease_ids
    assert lease_ttl(dev_vault, lease_id) is None  # revoked in OpenBao itself
    entries = race_broker.entries()
    issuance = next(e for e in entries if e["kind"] == "issuance")
    revocation = next(e for e in entries if e["kind"] == "revocation")
    assert issuance["credential"]["lease_id"] == lease_id
    assert revocation["revocation"]["reason"] == "suspended" and revocation["actor"] == {"kind": "broker"}
    assert revocation["revocation"]["jti"] == issuance["credential"]["jti"]
    assert revocation["revocation"]["credential"]["lease_id"] == lease_id
    book = race_broker.runtime.vault.leases.get(issuance["credential"]["jti"])  # type: ignore[union-attr]
    assert book is not None and book.state == "revoked"
    # And the kill switch holds for the next request, before anything is minted.
    again = race_broker.exchange(SUPPORT, "orders-db", ORDERS, requested_token_type=DB_CREDS)
    assert again.status_code == 403 and again.json()["error"] == "workload_suspended"
    assert len(minter.lease_ids) == 1


def test_a_request_that_is_not_raced_keeps_its_credential(race_broker: VaultBroker, dev_vault: DevVault) -> None:
    # The same hold with no suspension: the re-check must not refuse an ordinary issuance.
    minter = held(race_broker)
    minter.proceed.set()
    answer = race_broker.exchange(SUPPORT, "orders-db", ORDERS, requested_token_type=DB_CREDS)
    assert answer.status_code == 200, answer.text
    (lease_id,) = minter.lease_ids
    assert lease_ttl(dev_vault, lease_id)
