"""The broker's own Vault identity (AppRole or token file, renewed when due) and its settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from broker.clock import FixedClock
from broker.errors import ConfigError
from broker.vault.devserver import DevVault
from broker.vault.errors import VaultUnavailable
from broker.vault.identity import VaultIdentity
from broker.vault.settings import VaultSettings


def token_file(tmp_path: Path, dev_vault: DevVault, **params: Any) -> Path:
    token = dev_vault.client().auth.token.create(policies=["nhi-broker"], **params)["auth"]["client_token"]
    path = tmp_path / "vault-token"
    path.write_text(token + "\n")
    return path


def test_approle_login_and_renewal(dev_vault: DevVault) -> None:
    clock = FixedClock(1_000_000)
    identity = VaultIdentity(dev_vault.settings(), clock)
    client = identity.client()
    first = client.auth.token.lookup_self()["data"]
    assert first["policies"] == ["default", "nhi-broker"] and first["ttl"] > 3000
    clock.advance(first["ttl"] * 0.7)  # past two thirds of the TTL: the next call renews the same token
    again = identity.client().auth.token.lookup_self()["data"]
    assert again["accessor"] == first["accessor"]
    assert "last_renewal_time" not in first and again.get("last_renewal_time")
    identity.close()


def test_token_file_renewed_when_due(tmp_path: Path, dev_vault: DevVault) -> None:
    clock = FixedClock(1_000_000)
    path = token_file(tmp_path, dev_vault, ttl="1h", renewable=True)
    identity = VaultIdentity(VaultSettings(addr=dev_vault.addr, token_file=path), clock)
    data = identity.client().auth.token.lookup_self()["data"]
    assert not data.get("last_renewal_time")
    clock.advance(2500)
    data = identity.client().auth.token.lookup_self()["data"]
    assert data.get("last_renewal_time")


def test_non_renewable_token_file_is_read_again(tmp_path: Path, dev_vault: DevVault) -> None:
    clock = FixedClock(1_000_000)
    path = token_file(tmp_path, dev_vault, ttl="1h", renewable=False)
    identity = VaultIdentity(VaultSettings(addr=dev_vault.addr, token_file=path), clock)
    first = identity.client().auth.token.lookup_self()["data"]["accessor"]
    token_file(tmp_path, dev_vault, ttl="1h", renewable=False)  # whoever rotates it writes a new one
    clock.advance(2500)
    assert identity.client().auth.token.lookup_self()["data"]["accessor"] != first


def test_revoked_token_file_is_503(tmp_path: Path, dev_vault: DevVault) -> None:
    path = token_file(tmp_path, dev_vault, ttl="1h")
    dev_vault.client().auth.token.revoke(path.read_text().strip())
    identity = VaultIdentity(VaultSettings(addr=dev_vault.addr, token_file=path))
    with pytest.raises(VaultUnavailable, match="broker's own Vault identity"):
        identity.client()


@pytest.mark.parametrize("content", ["", "two tokens\n", "   \n"])
def test_bad_token_file_is_a_config_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "token"
    path.write_text(content)
    with pytest.raises(ConfigError, match="exactly one value"):
        VaultIdentity(VaultSettings(addr="http://127.0.0.1:1", token_file=path)).client()


def test_missing_token_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read vault token file"):
        VaultIdentity(VaultSettings(addr="http://127.0.0.1:1", token_file=tmp_path / "absent")).client()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"addr": "http://127.0.0.1:8200"}, "exactly one of vault.token_file"),
        ({"addr": "http://127.0.0.1:8200", "token_file": "t", "approle_role_id": "r",
          "approle_secret_id_file": "s"}, "exactly one of vault.token_file"),
        ({"addr": "http://127.0.0.1:8200", "approle_role_id": "r"}, "needs both"),
        ({"addr": "127.0.0.1:8200", "token_file": "t"}, "http(s) URL"),
        ({"addr": "http://127.0.0.1:8200/v1", "token_file": "t"}, "http(s) URL"),
        ({"addr": "http://127.0.0.1:8200", "token_file": "t", "database_mount": "../sys"}, "plain mount"),
        ({"addr": "http://127.0.0.1:8200", "token_file": "t", "timeout": 0}, "greater than 0"),
        ({"addr": "http://127.0.0.1:8200", "token_file": "t", "token": "s.x"}, "Extra inputs"),
    ],
)
def test_settings_refused(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        VaultSettings.model_validate(values)


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from broker.config import Settings

    monkeypatch.setenv("NHI_BROKER_VAULT__ADDR", "http://127.0.0.1:8200/")
    monkeypatch.setenv("NHI_BROKER_VAULT__TOKEN_FILE", str(tmp_path / "t"))
    settings = Settings(data_dir=tmp_path)
    assert settings.vault == VaultSettings(addr="http://127.0.0.1:8200", token_file=tmp_path / "t")


def test_expired_approle_token_logs_in_again(dev_vault: DevVault) -> None:
    clock = FixedClock(1_000_000)
    identity = VaultIdentity(dev_vault.settings(), clock)
    first = identity.client().auth.token.lookup_self()["data"]["accessor"]
    clock.advance(3600)  # the token's whole TTL: renewing is pointless, log in again
    assert identity.client().auth.token.lookup_self()["data"]["accessor"] != first


def test_refused_renewal_logs_in_again(dev_vault: DevVault) -> None:
    clock = FixedClock(1_000_000)
    identity = VaultIdentity(dev_vault.settings(), clock)
    client = identity.client()
    first = client.auth.token.lookup_self()["data"]["accessor"]
    dev_vault.client().auth.token.revoke_accessor(first)  # e.g. an operator revoked it
    clock.advance(2500)
    assert identity.client().auth.token.lookup_self()["data"]["accessor"] != first
