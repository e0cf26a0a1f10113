"""Row-scoped database users: PostgreSQL itself confines a minted user to the rows its intent names.

The sample rule ``orders-db-read`` issues ``vault-db:orders-reader;rows=customer``: the broker mints
from a Vault role it wrote (``scoped-orders-reader-<digest>``) whose creation statements record the
user's scope in ``nhi.row_scope``; the ``orders`` table's row-level security policy shows a user the
rows of that customer only, and none to a user without a scope. Real OpenBao, real PostgreSQL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import psycopg
import pytest

from broker.errors import PolicyLoadError
from broker.policy.loader import load_policies
from broker.vault.devserver import DEMO_DATABASE, DevVault
from broker.vault.kinds import parse_vault_kind
from broker.vault.minter import RowScope, scoped_role_name
from tests.helpers import SUPPORT, intent
from tests.vault.conftest import DB_CREDS, VaultBroker, db_connect, policies_with


def admin() -> psycopg.Connection[Any]:
    return psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname=DEMO_DATABASE, autocommit=True)


def db_user_for(broker: VaultBroker, customer: str) -> dict[str, Any]:
    r = broker.exchange(SUPPORT, "orders-db", intent("orders.query", f"customers/{customer}/orders", customer=customer),
                        requested_token_type=DB_CREDS)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


@pytest.mark.parametrize(("customer", "own_order", "other_order"), [("c-1001", "o-77", "o-91"),
                                                                    ("c-2002", "o-91", "o-77")])
def test_user_sees_only_the_rows_of_its_intent(
    vault_broker: VaultBroker, customer: str, own_order: str, other_order: str
) -> None:
    body = db_user_for(vault_broker, customer)
    username, password = body["vault"]["username"], body["access_token"]
    entry = vault_broker.entries()[body["receipt"]["index"]]
    assert entry["credential"]["lease_id"].startswith(
        f"database/creds/{scoped_role_name('orders-reader', RowScope('customer', customer))}/")

    with db_connect(username, password) as conn:
        rows = conn.execute("SELECT id, customer FROM orders ORDER BY id").fetchall()
        assert rows == [(own_order, customer)]  # refused the other customer's rows by PostgreSQL itself
        assert conn.execute("SELECT 1 FROM orders WHERE id = %s", (other_order,)).fetchone() is None
        assert conn.execute("SELECT nhi.row_scope('customer')").fetchone() == (customer,)
    # The user cannot read, widen or re-point its scope.
    for statement in ("SELECT * FROM nhi.row_scope",
                      "INSERT INTO nhi.row_scope VALUES (current_user, 'customer', 'c-2002')",
                      "UPDATE nhi.row_scope SET scope_value = 'c-2002'",
                      "DELETE FROM nhi.row_scope",
                      "ALTER TABLE orders DISABLE ROW LEVEL SECURITY"):
        with db_connect(username, password) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(statement)

    # Release: the scope row goes with the user.
    assert vault_broker.release(body["release_token"]).status_code == 200
    with admin() as conn:
        assert conn.execute("SELECT 1 FROM nhi.row_scope WHERE role_name = %s", (username,)).fetchone() is None


def test_unscoped_user_of_a_row_scoped_table_sees_nothing(dev_vault: DevVault) -> None:
    # Fail closed: a user minted straight from the base role has no scope, so no order is visible.
    creds = dev_vault.client().secrets.database.generate_credentials("orders-reader")
    try:
        with db_connect(creds["data"]["username"], creds["data"]["password"]) as conn:
            assert conn.execute("SELECT count(*) FROM orders").fetchone() == (0,)
    finally:
        dev_vault.client().sys.revoke_lease(creds["lease_id"])


def test_broker_identity_may_write_scoped_roles_only(dev_vault: DevVault) -> None:
    # The broker's least-privilege Vault policy: scoped copies with the five role fields, nothing else.
    settings = dev_vault.settings()
    client = hvac.Client(url=dev_vault.addr, timeout=10)
    client.auth.approle.login(role_id=settings.approle_role_id, secret_id=dev_vault.secret_id_file.read_text().strip())
    statements = ["CREATE ROLE \"{{name}}\" WITH LOGIN SUPERUSER PASSWORD '{{password}}';"]
    with pytest.raises(hvac.exceptions.Forbidden):
        client.secrets.database.create_role(name="orders-reader", db_name="demo-postgres",
                                            creation_statements=statements)
    with pytest.raises(hvac.exceptions.Forbidden):
        client.secrets.database.create_role(name="scoped-x", db_name="demo-postgres",
                                            creation_statements=statements, rollback_statements=["SELECT 1"])
    with pytest.raises(hvac.exceptions.Forbidden):
        client.secrets.database.delete_role(name="orders-reader")


@pytest.mark.parametrize(("value", "valid"), [
    ("c-1001", True), ("acct:42@eu", True), ("c.1001", True),
    ("c-1'; DROP TABLE orders; --", False), ("c\\'1", False), ("", False), ("a..b", False), (".hidden", False),
    ("c 1", False), ("c-1\n", False), ("x" * 129, False),
])
def test_scope_values_that_could_reach_sql_are_refused(value: str, valid: bool) -> None:
    if valid:
        assert RowScope("customer", value).value == value
    else:
        with pytest.raises(ValueError, match="plain identifier"):
            RowScope("customer", value)


@pytest.mark.parametrize(("kind", "error"), [
    ("vault-db:orders-reader;rows=Customer", "rows=<context key>"),
    ("vault-db:orders-reader;rows=", "rows=<context key>"),
    ("vault-db:orders-reader;uses=3", "rows=<context key>"),
    ("vault-db:scoped-orders-reader-abc", "not scoped-"),
])
def test_row_scoped_kind_grammar(kind: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_vault_kind(kind)


def test_rows_key_must_be_bound_by_the_resource_pattern(tmp_path: Path) -> None:
    ok = policies_with(tmp_path / "ok", "p, support-agent, orders-db, orders.q, customers/{customer}/orders, , allow, "
                                        "q, 60, vault-db:orders-reader;rows=customer")
    load_policies(ok)
    loose = policies_with(tmp_path / "loose", "p, support-agent, orders-db, orders.q, customers/*/orders, , allow, "
                                              "q, 60, vault-db:orders-reader;rows=customer")
    with pytest.raises(PolicyLoadError, match=r"must bind \{customer\}"):
        load_policies(loose)
