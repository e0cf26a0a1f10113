"""Operator and resource-server credentials in the settings: hashes only, placeholders refused."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from broker.api.app import create_app
from broker.config import Settings
from broker.errors import InvalidClient, InvalidOperatorToken
from broker.operators import (
    ClientAuthenticator,
    IntrospectionClient,
    OperatorAuthenticator,
    OperatorCredential,
    hash_secret,
)
from tests.helpers import POLICIES, run

GOOD = hash_secret("a-long-random-operator-secret")


@pytest.mark.parametrize(
    ("operator", "fragment"),
    [
        ({"name": "ops", "role": "admin", "token_sha256": hash_secret("changeme")}, "placeholder"),
        ({"name": "ops", "role": "admin", "token_sha256": hash_secret("")}, "placeholder"),
        ({"name": "ops", "role": "admin", "token_sha256": GOOD.upper()}, "lowercase hex SHA-256"),
        ({"name": "ops", "role": "admin", "token_sha256": "plain-secret"}, "lowercase hex SHA-256"),
        ({"name": "ops", "role": "root", "token_sha256": GOOD}, "role"),
        ({"name": "ops\n", "role": "admin", "token_sha256": GOOD}, "operator name"),
        ({"name": "ops", "role": "admin"}, "exactly one of token_sha256 or spiffe_id"),
        ({"name": "ops", "role": "admin", "token_sha256": GOOD, "spiffe_id": "spiffe://o.org/u/x"}, "exactly one"),
        ({"name": "ops", "role": "admin", "spiffe_id": "spiffe://o.org/u/x\n"}, "spiffe_id"),
        ({"name": "ops", "role": "admin", "token": "secret", "token_sha256": GOOD}, "token"),
    ],
)
def test_bad_operator_settings(operator: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError) as err:
        Settings(operators=[operator])
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    ("client", "fragment"),
    [
        ({"client_id": "rs", "audiences": ["a"]}, "exactly one of secret_sha256 or spiffe_id"),
        ({"client_id": "rs", "secret_sha256": GOOD, "audiences": []}, "audiences"),
        ({"client_id": "rs", "secret_sha256": hash_secret("secret"), "audiences": ["a"]}, "placeholder"),
    ],
)
def test_bad_introspection_client_settings(client: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError) as err:
        Settings(introspection_clients=[client])
    assert fragment in str(err.value)


def test_admin_api_is_closed_without_operators(tmp_path: Path) -> None:
    with TestClient(create_app(Settings(data_dir=tmp_path / "d", policies_dir=POLICIES))) as client:
        r = client.post("/v1/admin/workloads/ticket-triage/suspend", json={"reason": "x"},
                        headers={"Authorization": "Bearer anything"})
        assert r.status_code == 401
        assert r.json()["error_description"] == "no operator credentials are configured; the admin API is closed"
        assert r.headers["www-authenticate"].startswith("Bearer")


def test_every_configured_hash_is_compared() -> None:
    creds = [OperatorCredential(name=f"op{i}", role="auditor", token_sha256=hash_secret(f"secret-number-{i}"))
             for i in range(3)]
    auth = OperatorAuthenticator(creds)
    assert run(auth.authenticate("Bearer secret-number-2")).name == "op2"
    assert run(auth.authenticate("bearer   secret-number-0 ")).name == "op0"
    for header in (None, "", "Bearer", "Bearer ", "Basic c2VjcmV0", "Bearer " + "x" * 600, "Bearer secret-number-9"):
        with pytest.raises(InvalidOperatorToken):
            run(auth.authenticate(header))


def _basic(raw: str) -> str:
    return "Basic " + base64.b64encode(raw.encode()).decode()


def test_client_credentials_are_form_decoded_and_exact() -> None:
    secret = "p@ss:w%rd+" + "x" * 20
    auth = ClientAuthenticator([IntrospectionClient(client_id="rs:1", secret_sha256=hash_secret(secret),
                                                    audiences=("a",))])
    # RFC 6749 §2.3.1: id and secret are form-urlencoded before the Basic encoding.
    assert run(auth.authenticate(_basic(f"{quote('rs:1', safe='')}:{quote(secret, safe='')}"))).client_id == "rs:1"
    for raw in (f"rs%3A1:{quote(secret, safe='')}extra", "rs%3A1:", f"rs%3A2:{quote(secret, safe='')}", "nocolon"):
        with pytest.raises(InvalidClient):
            run(auth.authenticate(_basic(raw)))
