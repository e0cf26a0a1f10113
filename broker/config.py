"""Broker settings: embedded defaults, a TOML file, environment overrides.

Precedence, highest first: explicit arguments (the CLI's flags), ``NHI_BROKER_*`` environment
variables (nested with ``__``), the TOML file named by ``--config`` or ``NHI_BROKER_CONFIG``, defaults.
Settings are frozen and passed to ``create_app(settings)``; nothing reads them at import time.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from broker.approvals.settings import ApprovalSettings
from broker.attest.issuers import IssuerConfig
from broker.attest.users import UserIssuerConfig
from broker.errors import ConfigError
from broker.operators import IntrospectionClient, OperatorCredential
from broker.vault.settings import VaultSettings

__all__ = ["CONFIG_ENV", "Settings", "load_settings"]

CONFIG_ENV = "NHI_BROKER_CONFIG"
_ORIGIN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:-]{0,254}")


class Settings(BaseSettings):
    """Everything the broker needs to run; every field has an embedded default."""

    model_config = SettingsConfigDict(
        env_prefix="NHI_BROKER_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    data_dir: Path = Field(Path(".nhi-broker"), description="Keys, SQLite ledger and state live here.")
    policies_dir: Path = Field(Path("policies"), description="Casbin model, policy lines, registry, tests.")
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    workers: int = Field(1, ge=1, le=64)
    public_url: str | None = Field(None, description="Issuer URL; defaults to http://host:port.")
    audience: str = Field("nhi-broker", description="The `aud` subject tokens must carry for this broker.")
    token_alg: Literal["ES256", "EdDSA"] = "ES256"
    token_ttl: int = Field(300, ge=10, le=3600, description="Default task-token lifetime; rules cap it.")
    ledger_origin: str = Field("nhi-broker.local/ledger", description="Checkpoint origin line.")
    ledger_key_name: str | None = Field(None, description="Signed-note key name; defaults to the origin.")
    ledger_url: str | None = Field(
        None,
        description="Ledger storage: sqlite:///<path> (default: <data_dir>/ledger.sqlite3) or postgresql://... "
        "(one log for every replica; `nhi-broker db upgrade` creates its schema).",
    )
    trust: list[IssuerConfig] = Field(default_factory=list, description="Trusted workload-identity issuers.")
    ledger_witnesses: list[str] = Field(
        default_factory=list, description="Witness verifier keys whose checkpoint cosignatures the broker publishes."
    )
    dev_issuer: bool | None = Field(
        None, description="Trust the local trial issuer. Default: on only when `trust` is empty."
    )
    user_issuers: list[UserIssuerConfig] = Field(
        default_factory=list, description="Issuers of end-user tokens for delegated exchanges (RFC 8693 §2.1)."
    )
    dev_user_issuer: bool | None = Field(
        None, description="Trust the local trial end-user issuer. Default: on only when `user_issuers` is empty "
        "and the trial workload issuer is on."
    )
    max_body_bytes: int = Field(65536, ge=1024, le=1048576)
    max_subject_token_bytes: int = Field(8192, ge=1024, le=65536)
    dpop_nonce: bool = Field(False, description="Demand a server nonce in DPoP proofs (RFC 9449 §8).")
    # Shared state (issue 5): replay, revocation, use counts, rate limits, budgets, suspensions.
    state_backend: Literal["sqlite", "redis"] = Field("sqlite", description="sqlite (one machine) or redis.")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Used when state_backend is redis.")
    redis_prefix: str = Field("nhi-broker:", pattern=r"^[A-Za-z0-9._:-]{1,64}$", description="Key prefix in Redis.")
    operators: list[OperatorCredential] = Field(default_factory=list, description="Admin API credentials and roles.")
    operator_issuers: list[IssuerConfig] = Field(
        default_factory=list, description="Issuers (e.g. OIDC) of operator identity tokens; never trusted for exchange."
    )
    introspection_clients: list[IntrospectionClient] = Field(
        default_factory=list, description="Resource servers allowed to introspect and revoke."
    )
    vault: VaultSettings | None = Field(None, description="Vault/OpenBao for vault-* intents (docs/vault.md).")
    # Human approval of intents held for review (issue 7): polling, webhook, console sessions.
    approvals: ApprovalSettings = ApprovalSettings()  # frozen, so one shared default is safe

    @field_validator("ledger_origin")
    @classmethod
    def _origin(cls, value: str) -> str:
        if _ORIGIN_RE.fullmatch(value) is None:
            raise ValueError("ledger_origin must be a schema-less URL-like name without spaces")
        return value

    @field_validator("ledger_url")
    @classmethod
    def _ledger_url(cls, value: str | None) -> str | None:
        from broker.ledger.engines import check_ledger_url

        return None if value is None else check_ledger_url(value)

    @field_validator("ledger_witnesses")
    @classmethod
    def _witnesses(cls, value: list[str]) -> list[str]:
        from broker.ledger.cosignature import CosignatureVerifier

        for key in value:
            CosignatureVerifier(key)  # ValueError names what is wrong with it
        return value

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", value):
            raise ValueError("public_url must be an http(s) URL without query or fragment")
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _dev_issuer_only_without_trust(self) -> Settings:
        if self.dev_issuer and self.trust:
            raise ValueError("dev_issuer is for trials only and cannot be combined with configured trust")
        return self

    @model_validator(mode="after")
    def _user_issuers_apart(self) -> Settings:
        if self.dev_user_issuer and self.user_issuers:
            raise ValueError("dev_user_issuer is for trials only and cannot be combined with user_issuers")
        workload_issuers = {cfg.issuer for cfg in (*self.trust, *self.operator_issuers)}
        for cfg in self.user_issuers:
            # An issuer is trusted for one thing: a workload token must never pass as a user's, and the
            # broker's own task tokens are parents of sub-agents, never end-user tokens.
            if cfg.issuer in workload_issuers:
                raise ValueError(f"user issuer {cfg.issuer!r} is also a workload or operator issuer")
            if cfg.issuer == self.issuer_url:
                raise ValueError("a user issuer cannot be the broker itself (public_url)")
        return self

    @property
    def issuer_url(self) -> str:
        """The ``iss`` of task tokens and the RFC 8414 issuer."""
        return self.public_url or f"http://{self.host}:{self.port}"

    @property
    def ledger_storage_url(self) -> str:
        """``ledger_url``, or the embedded default under ``data_dir``."""
        from broker.ledger.engines import default_ledger_url

        return self.ledger_url or default_ledger_url(self.data_dir)

    @property
    def dev_issuer_enabled(self) -> bool:
        return self.dev_issuer if self.dev_issuer is not None else not self.trust

    @property
    def dev_user_issuer_enabled(self) -> bool:
        """The trial end-user issuer: on by default with the trial workload issuer, off with user issuers."""
        if self.dev_user_issuer is not None:
            return self.dev_user_issuer
        return self.dev_issuer_enabled and not self.user_issuers

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = os.environ.get(CONFIG_ENV)
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(toml_path)))
        return tuple(sources)


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from ``config`` (or ``$NHI_BROKER_CONFIG``), the environment and ``overrides``.

    Raises :class:`ConfigError` with every problem, never a traceback.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    previous = os.environ.get(CONFIG_ENV)
    if config is not None:
        if not config.is_file():
            raise ConfigError(f"configuration file {config} does not exist")
        os.environ[CONFIG_ENV] = str(config)
    elif previous and not Path(previous).is_file():
        raise ConfigError(f"configuration file {previous} (from {CONFIG_ENV}) does not exist")
    try:
        return Settings(**overrides)
    except ValueError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None
    finally:
        if config is not None:
            if previous is None:
                os.environ.pop(CONFIG_ENV, None)
            else:
                os.environ[CONFIG_ENV] = previous
