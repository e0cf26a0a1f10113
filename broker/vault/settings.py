"""``[vault]`` settings: where the broker's Vault/OpenBao is and how the broker logs in to it.

Set them in the TOML file under ``[vault]`` or as ``NHI_BROKER_VAULT__ADDR`` etc. Exactly one
identity: a token file (``token_file``) or AppRole (``approle_role_id`` + ``approle_secret_id_file``).
Secrets are read from files, never from the settings themselves, so they never reach a dump of them.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["VaultSettings"]

_MOUNT = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


class VaultSettings(BaseModel):
    """Address, identity and mounts of the broker's Vault/OpenBao."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    addr: str = Field(description="e.g. http://127.0.0.1:8200")
    token_file: Path | None = Field(None, description="A file holding the broker's Vault token.")
    approle_role_id: str | None = Field(None, description="AppRole role id (with approle_secret_id_file).")
    approle_secret_id_file: Path | None = Field(None, description="A file holding the AppRole secret id.")
    approle_mount: str = Field("approle", description="Mount of the AppRole auth method.")
    database_mount: str = Field("database", description="Mount of the database secrets engine.")
    kv_mount: str = Field("kv", description="Mount of the KV engine (response-wrapped secrets).")
    token_role: str = Field("nhi-broker-task", description="Token role used to create child tokens.")
    timeout: float = Field(3.0, gt=0, le=60, description="Seconds per Vault request.")
    concurrency: int = Field(
        8, ge=1, le=256,
        description="Vault calls in flight at once, on threads of their own; more wait, then fail with 503.",
    )
    ca_cert: Path | None = Field(None, description="CA bundle to verify Vault's TLS certificate.")
    sweep_interval: float = Field(5.0, gt=0, le=3600, description="Seconds between lease sweeps.")

    @field_validator("addr")
    @classmethod
    def _addr(cls, value: str) -> str:
        if not re.fullmatch(r"https?://[^\s/?#]+/?", value):
            raise ValueError("vault.addr must be an http(s) URL without a path")
        return value.rstrip("/")

    @field_validator("approle_mount", "database_mount", "kv_mount", "token_role")
    @classmethod
    def _mount(cls, value: str) -> str:
        if _MOUNT.fullmatch(value) is None:
            raise ValueError(f"{value!r} must be a plain mount or role name")
        return value

    @model_validator(mode="after")
    def _one_identity(self) -> VaultSettings:
        approle = self.approle_role_id is not None or self.approle_secret_id_file is not None
        if approle and (self.approle_role_id is None or self.approle_secret_id_file is None):
            raise ValueError("AppRole needs both vault.approle_role_id and vault.approle_secret_id_file")
        if approle == (self.token_file is not None):
            raise ValueError("set exactly one of vault.token_file or vault AppRole settings")
        return self
