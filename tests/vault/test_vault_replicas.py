"""Two replicas (two in-process brokers with their own data dirs) on one PostgreSQL ledger and lease book
and one Redis: a release, a suspension and an approval each cross from one replica to the other."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.config import Settings
from broker.operators import hash_secret
from broker.vault.devserver import DevVault
from tests.approvals.harness import APRIL, OPERATORS, bearer, refund
from tests.helpers import POLICIES, SUPPORT, intent
from tests.state.conftest import SHARED_REDIS, drop_prefix, unique_prefix
from tests.vault.conftest import DB_CREDS, VaultBroker, open_broker
from tests.vault.test_vault_exchange import ORDERS, lease_ttl

ADMIN_SECRET = "replica-admin-secret-0123456789"
RS_SECRET = "replica-rs-secret-0123456789"
READ = intent("orders.read", "customers/c-42/orders/ord-1001", customer="c-42")
CIBA = "urn:openid:params:grant-type:ciba"


@pytest.fixture
def replicas(tmp_path: Path, dev_vault: DevVault, pg_url: str) -> Iterator[tuple[VaultBroker, VaultBroker]]:
    prefix = unique_prefix()

    def settings(name: str) -> Settings:
        return Settings(
            data_dir=tmp_path / name, policies_dir=POLICIES, public_url="https://broker.example.test",
            unsafe_trial_issuers=True,  # trial identities behind an https name: explicitly
            ledger_url=pg_url, state_backend="redis", redis_url=SHARED_REDIS, redis_prefix=prefix,
            vault=dev_vault.settings(sweep_interval=3600),
            operators=[*OPERATORS, {"name": "ops", "role": "admin", "token_sha256": hash_secret(ADMIN_SECRET)}],
            introspection_clients=[{"client_id": "orders-api", "secret_sha256": hash_secret(RS_SECRET),
                                    "audiences": ["orders-api"]}],
            approvals={"poll_interval": 1},
        )

    first = open_broker(settings("a"))
    a = next(first)
    try:
        # One key set for every replica, as a secret store hands it out.
        (tmp_path / "b").mkdir()
        shutil.copytree(tmp_path / "a" / "keys", tmp_path / "b" / "keys")
        shutil.copy2(tmp_path / "a" / "dev-issuer-key.pem", tmp_path / "b" / "dev-issuer-key.pem")
        second = open_broker(settings("b"))
        b = next(second)
        try:
            yield a, b
        finally:
            second.close()
    finally:
        first.close()
        drop_prefix(SHARED_REDIS, prefix)


def test_a_release_on_one_replica_revokes_a_lease_issued_by_the_other(replicas, dev_vault: DevVault) -> None:
    a, b = replicas
    r = a.exchange(SUPPORT, "orders-db", ORDERS, requested_token_type=DB_CREDS)
    assert r.status_code == 200, r.text
    body = r.json()
    entry = b.entries()[body["receipt"]["index"]]  # one ledger: B reads A's issuance
    lease_id = entry["credential"]["lease_id"]
    assert lease_ttl(dev_vault, lease_id)
    released = b.release(body["release_token"])
    assert released.status_code == 200, released.text
    assert lease_ttl(dev_vault, lease_id) is None
    again = a.release(body["release_token"])  # idempotent on the other replica too
    assert again.status_code == 200, again.text
    revocations = [e for e in a.entries() if e["kind"] == "revocation"]
    assert [e["revocation"]["jti"] for e in revocations] == [body["task_id"]]


def test_a_suspension_on_one_replica_ends_the_other_replicas_tokens_and_leases_within_a_second(
    replicas, dev_vault: DevVault
) -> None:
    a, b = replicas
    r = b.exchange(SUPPORT, "orders-db", ORDERS, requested_token_type=DB_CREDS)
    assert r.status_code == 200, r.text
    lease_id = b.entries()[r.json()["receipt"]["index"]]["credential"]["lease_id"]
    token = b.exchange(SUPPORT, "orders-api", READ).json()["access_token"]

    def active() -> bool:
        answer = b.client.post("/v1/introspect", data={"token": token}, auth=("orders-api", RS_SECRET))
        assert answer.status_code == 200, answer.text
        return bool(answer.json()["active"])

    assert active()
    started = time.monotonic()
    s = a.client.post("/v1/admin/workloads/support-assistant/suspend", json={"reason": "drill"},
                      headers=bearer(ADMIN_SECRET))
    assert s.status_code == 200, s.text
    assert s.json()["vault_leases_revoked"] == 1  # B's lease, revoked by A
    assert not active() and lease_ttl(dev_vault, lease_id) is None
    assert time.monotonic() - started < 1.0
    refused = b.exchange(SUPPORT, "orders-db", ORDERS, requested_token_type=DB_CREDS)
    assert refused.status_code == 403 and refused.json()["error"] == "workload_suspended"


def test_an_approval_decided_on_one_replica_is_collected_by_a_poll_on_the_other(replicas) -> None:
    a, b = replicas
    held = a.exchange(SUPPORT, "payments-api", refund(120), user="c-42")
    assert held.status_code == 200, held.text
    auth_req_id = held.json()["auth_req_id"]
    decided = a.client.post(f"/v1/admin/approvals/{auth_req_id}/approve", json={"reason": "checked"},
                            headers=bearer(APRIL))
    assert decided.status_code == 200, decided.text
    polled = b.client.post("/v1/token", data={"grant_type": CIBA, "auth_req_id": auth_req_id,
                                              "subject_token": b.identity(SUPPORT),
                                              "subject_token_type": "urn:ietf:params:oauth:token-type:jwt"})
    assert polled.status_code == 200, polled.text
    assert polled.json()["access_token"]


def test_a_suspension_on_one_replica_while_the_other_is_minting_leaves_no_credential(
    replicas, dev_vault: DevVault
) -> None:
    # The race of tests/vault/test_vault_suspension_race.py across replicas: A's request is held right
    # after OpenBao minted its secret, B throws the kill switch (shared Redis mark, shared lease book).
    from tests.vault.test_vault_suspension_race import held, suspend_while_in_flight

    a, b = replicas
    minter = held(a)
    suspended, answer = suspend_while_in_flight(a, b, minter, bearer(ADMIN_SECRET))
    assert suspended.status_code == 200, suspended.text
    assert suspended.json()["vault_leases_revoked"] == 0  # A's lease was not in the shared book yet
    assert answer.status_code == 403 and answer.json()["error"] == "workload_suspended", answer.text
    (lease_id,) = minter.lease_ids
    assert lease_ttl(dev_vault, lease_id) is None
    revocations = [e for e in b.entries() if e["kind"] == "revocation"]
    assert [(e["revocation"]["credential"]["lease_id"], e["revocation"]["reason"]) for e in revocations] == [
        (lease_id, "suspended")]
