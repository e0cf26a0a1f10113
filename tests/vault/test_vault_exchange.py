"""Vault-backed intents end to end against a real OpenBao and the real PostgreSQL.

A chatbot gets a database user for one intent, uses it within the role's grants and is refused
outside them; the lease ends on release or at its TTL and the login fails afterwards; wrapped
secrets unwrap once; child tokens carry exactly the rule's policies and uses. Every issuance and
revocation is on the ledger, with the lease id or accessor and never the secret.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import hvac
import hvac.exceptions
import psycopg
import pytest

from broker.audit.schema import validate_entry
from broker.config import Settings
from broker.vault.devserver import DevVault
from tests.helpers import SUPPORT, TRIAGE, intent
from tests.vault.conftest import DB_CREDS, VAULT_TOKEN, WRAPPED, VaultBroker, db_connect, open_broker, policies_with

ORDERS = intent("orders.query", "customers/c-1001/orders", customer="c-1001")
SMTP = intent("mail.send", "mailboxes/support")
KB = intent("kb.config.read", "kb/config")


def lease_ttl(vault: DevVault, lease_id: str) -> int | None:
    """The remaining TTL Vault reports for a lease, ``None`` when Vault no longer knows it."""
    try:
        return int(vault.client().sys.read_lease(lease_id)["data"]["ttl"])
    except hvac.exceptions.InvalidRequest:
        return None


def test_db_user_for_one_intent(
    vault_broker: VaultBroker, dev_vault: DevVault, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    r = vault_broker.exchange(SUPPORT, "orders-db", ORDERS, requested_token_type=DB_CREDS)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["issued_token_type"] == DB_CREDS
    assert body["token_type"] == "N_A"
    assert 0 < body["expires_in"] <= 120  # the rule's cap, below the Vault role's 5 minute default
    username, password = body["vault"]["username"], body["access_token"]

    # The ledger names the lease, never the password, and the receipt is that entry.
    entry = vault_broker.entries()[body["receipt"]["index"]]
    assert entry["kind"] == "issuance"
    credential = entry["credential"]
    assert credential["kind"] == "vault-db" and credential["vault"] == "orders-reader"
    assert credential["jti"] == body["task_id"]
    assert password not in json.dumps(entry) and body["release_token"] not in json.dumps(entry)
    assert 0 < lease_ttl(dev_vault, credential["lease_id"]) <= 120  # type: ignore[operator]

    with db_connect(username, password) as conn:
        assert conn.execute("SELECT total FROM orders WHERE id = 'o-77'").fetchone() is not None
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT pan FROM payment_cards")

    # Release ends the task: the lease is gone from Vault, the login fails, a revocation entry is written.
    released = vault_broker.release(body["release_token"])
    assert released.status_code == 200, released.text
    assert released.json() == {"task_id": body["task_id"], "kind": "vault-db", "state": "revoked",
                               "reason": "released"}
    assert lease_ttl(dev_vault, credential["lease_id"]) is None
    with pytest.raises(psycopg.OperationalError, match="does not exist"):
        db_connect(username, password)
    last = vault_broker.entries()[-1]
    assert last["kind"] == "revocation"
    assert last["revocation"] == {
        "scope": "lease", "jti": body["task_id"], "workload": "support-assistant", "spiffe_id": SUPPORT,
        "credential": {"kind": "vault-db", "lease_id": credential["lease_id"]},
        "issuance": body["receipt"]["leaf_hash"], "reason": "released",
    }
    assert last["actor"] == {"kind": "workload", "spiffe_id": SUPPORT, "auth": "release_token"}

    # Nothing secret reached a log line, at any level (hvac, urllib3 and the broker's own).
    for secret in (password, body["release_token"]):
        assert secret not in caplog.text

    # Releasing again changes nothing and writes nothing.
    size = vault_broker.runtime.ledger.size()
    again = vault_broker.release(body["release_token"])
    assert again.status_code == 200 and again.json()["state"] == "revoked"
    assert vault_broker.runtime.ledger.size() == size


def test_lease_ends_at_ttl_and_the_sweeper_records_it(tmp_path: Path, dev_vault: DevVault) -> None:
    policies = policies_with(
        tmp_path, "p, support-agent, orders-db, orders.peek, customers/{customer}/orders, , allow, peek, 2, "
                  "vault-db:orders-reader")
    settings = Settings(data_dir=tmp_path / "data", policies_dir=policies,
                        vault=dev_vault.settings(sweep_interval=3600))
    for broker in open_broker(settings):
        r = broker.exchange(SUPPORT, "orders-db", intent("orders.peek", "customers/c-1001/orders", customer="c-1001"),
                            requested_token_type=DB_CREDS)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["expires_in"] <= 2
        with db_connect(body["vault"]["username"], body["access_token"]) as conn:
            conn.execute("SELECT 1 FROM orders LIMIT 1")
        assert broker.runtime.vault is not None
        assert broker.runtime.vault.sweep() == 0  # not expired yet
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                db_connect(body["vault"]["username"], body["access_token"]).close()
            except psycopg.OperationalError:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the database user outlived its 2 s lease")
        assert broker.runtime.vault.sweep() == 1
        last = broker.entries()[-1]
        assert (last["kind"], last["revocation"]["reason"], last["revocation"]["jti"]) == (
            "revocation", "expired", body["task_id"])
        assert broker.runtime.vault.sweep() == 0
        assert broker.release(body["release_token"]).json()["reason"] == "expired"


def test_wrapped_secret_unwraps_once(vault_broker: VaultBroker, dev_vault: DevVault) -> None:
    r = vault_broker.exchange(SUPPORT, "mail-api", SMTP, requested_token_type=WRAPPED)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["issued_token_type"] == WRAPPED
    assert 0 < body["expires_in"] <= 60 and body["vault"]["wrap_ttl"] <= 60
    assert body["vault"]["creation_path"] == "kv/data/support/smtp"
    entry = vault_broker.entries()[body["receipt"]["index"]]
    assert entry["credential"]["kind"] == "vault-wrapped" and "accessor" in entry["credential"]

    # The assistant unwraps with the wrapping token itself (no other Vault identity needed).
    assistant = hvac.Client(url=dev_vault.addr, token=body["access_token"])
    secret = assistant.sys.unwrap()["data"]["data"]
    assert secret["username"] == "support-bot"
    assert secret["password"] not in json.dumps(vault_broker.entries())
    with pytest.raises((hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden)):
        assistant.sys.unwrap()  # a second unwrap (an interceptor's, or a replay) fails


def test_broker_cannot_read_a_kv_secret_unwrapped(dev_vault: DevVault) -> None:
    # The broker's own Vault policy only allows wrapped reads: it never sees the secret itself.
    from broker.vault.identity import VaultIdentity

    client = VaultIdentity(dev_vault.settings()).client()
    with pytest.raises(hvac.exceptions.Forbidden):
        client.secrets.kv.v2.read_secret_version("support/smtp", mount_point="kv", raise_on_deleted_version=True)


def test_child_token_carries_the_rule_policies_and_uses(vault_broker: VaultBroker, dev_vault: DevVault) -> None:
    r = vault_broker.exchange(TRIAGE, "vault", KB, requested_token_type=VAULT_TOKEN)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["vault"] == {"policies": ["kb-config-read"], "num_uses": 3}
    info = dev_vault.client().auth.token.lookup(body["access_token"])["data"]
    assert info["policies"] == ["kb-config-read"]
    assert 0 < info["ttl"] <= 300 and info["explicit_max_ttl"] <= 300 and not info["renewable"]
    assert info["num_uses"] == 3
    token = hvac.Client(url=dev_vault.addr, token=body["access_token"])
    assert token.secrets.kv.v2.read_secret_version("kb/config", mount_point="kv",
                                                   raise_on_deleted_version=True)["data"]["data"] == {"index": "kb-v3"}
    with pytest.raises(hvac.exceptions.Forbidden):
        token.secrets.kv.v2.read_secret_version("support/smtp", mount_point="kv", raise_on_deleted_version=True)
    # The release revokes the token by its accessor.
    assert vault_broker.release(body["release_token"]).status_code == 200
    with pytest.raises(hvac.exceptions.Forbidden):
        dev_vault.client().auth.token.lookup(body["access_token"])


def test_requested_type_must_match_the_rule(vault_broker: VaultBroker) -> None:
    r = vault_broker.exchange(SUPPORT, "orders-db", ORDERS)
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_target" and DB_CREDS in r.json()["error_description"]
    r = vault_broker.exchange(SUPPORT, "orders-api", intent("orders.read", "customers/c-1001/orders/o-77",
                                                            customer="c-1001"), requested_token_type=DB_CREDS)
    assert r.status_code == 400 and r.json()["error"] == "invalid_target"
    assert [e["kind"] for e in vault_broker.entries()[-2:]] == ["denial", "denial"]


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({"release_token": "not-issued"}, 400, "invalid_grant"),
        ({}, 400, "invalid_request"),
        ({"release_token": "x", "task_id": "y"}, 400, "invalid_request"),
    ],
)
def test_release_bad_input(vault_broker: VaultBroker, body: dict[str, str], status: int, error: str) -> None:
    from tests.helpers import form_body

    r = vault_broker.client.post("/v1/credentials/release", content=form_body(body) or b"release_token=",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert (r.status_code, r.json()["error"]) == (status, error), r.text


def test_suspension_revokes_every_open_lease_of_the_workload(vault_broker: VaultBroker, dev_vault: DevVault) -> None:
    bodies = []
    for _ in range(2):
        r = vault_broker.exchange(SUPPORT, "orders-db", ORDERS, requested_token_type=DB_CREDS)
        assert r.status_code == 200, r.text
        bodies.append(r.json())
    r = vault_broker.exchange(TRIAGE, "vault", KB, requested_token_type=VAULT_TOKEN)
    assert r.status_code == 200, r.text
    vault = vault_broker.runtime.vault
    assert vault is not None
    admin = {"kind": "operator", "name": "ops@example.com", "role": "admin", "auth": "bearer"}
    assert vault.revoke_workload("support-assistant", "admin-suspend-1", admin) == 2
    entries = vault_broker.entries()[-2:]
    assert {e["revocation"]["jti"] for e in entries} == {b["task_id"] for b in bodies}
    assert {(e["kind"], e["revocation"]["reason"], e["request_id"], e["actor"]["name"]) for e in entries} == {
        ("revocation", "suspended", "admin-suspend-1", "ops@example.com")}
    for e in entries:
        assert lease_ttl(dev_vault, e["revocation"]["credential"]["lease_id"]) is None
    # The other workload's token is untouched.
    assert dev_vault.client().auth.token.lookup(r.json()["access_token"])["data"]["ttl"] > 0
    assert vault.revoke_workload("support-assistant", "admin-suspend-2", admin) == 0


def test_a_held_vault_intent_is_issued_with_its_approval_on_the_ledger(tmp_path: Path, dev_vault: DevVault) -> None:
    """A review rule with a Vault kind: the secret is minted only after approval, and its issuance
    entry points at the approval entry, as for task tokens."""
    policies = policies_with(
        tmp_path, "p, support-agent, orders-db, orders.export, customers/{customer}/orders, , review, "
                  "orders-export-review, 120, vault-db:orders-reader")
    with (policies / "approvals.toml").open("a") as f:
        f.write('\n[[review]]\nrule = "orders-export-review"\napprovers = "data-approvers"\napprovals = 1\n'
                "max_wait = 300\n")
    secret = "april-data-approver-secret-0123456789"
    settings = Settings.model_validate({
        "data_dir": tmp_path / "data", "policies_dir": policies, "vault": dev_vault.settings(sweep_interval=3600),
        "operators": [{"name": "april", "role": "approver", "groups": ["data-approvers"],
                       "token_sha256": hashlib.sha256(secret.encode()).hexdigest()}],
    })
    export = intent("orders.export", "customers/c-1001/orders", customer="c-1001")
    for broker in open_broker(settings):
        held = broker.exchange(SUPPORT, "orders-db", export, requested_token_type=DB_CREDS)
        assert held.status_code == 200 and "access_token" not in held.json(), held.text
        auth_req_id = held.json()["auth_req_id"]
        assert not any(e["kind"] == "issuance" for e in broker.entries())  # nothing minted while held
        r = broker.client.post(f"/v1/admin/approvals/{auth_req_id}/approve", json={"reason": "audit export"},
                               headers={"Authorization": f"Bearer {secret}"})
        assert r.status_code == 200, r.text
        poll = broker.client.post("/v1/token", data={
            "grant_type": "urn:openid:params:grant-type:ciba", "auth_req_id": auth_req_id,
            "subject_token": broker.identity(SUPPORT), "subject_token_type": "urn:ietf:params:oauth:token-type:jwt"})
        assert poll.status_code == 200, poll.text
        assert poll.json()["vault"]["username"]
        approval_entry = next(e for e in broker.entries() if e["kind"] == "approval")
        issuance = broker.entries()[-1]
        assert issuance["kind"] == "issuance" and issuance["credential"]["kind"] == "vault-db"
        assert issuance["approval"]["auth_req_id"] == auth_req_id
        assert issuance["approval"]["approvers"] == ["april"]
        assert approval_entry["approval"]["outcome"] == "approved"
        validate_entry(issuance)
        lease_id = issuance["credential"]["lease_id"]
        assert lease_ttl(dev_vault, lease_id)
