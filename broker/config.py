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
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from broker.approvals.settings import ApprovalSettings
from broker.attest.issuers import IssuerConfig, is_loopback_host
from broker.attest.methods.wimse import WimseSettings
from broker.attest.methods.x509_svid import X509Settings
from broker.attest.users import UserIssuerConfig
from broker.config_explain import explain_validation_error, read_toml, unknown_environment
from broker.errors import ConfigError
from broker.operators import IntrospectionClient, OperatorCredential
from broker.tls import TlsSettings
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
    host: str = Field("127.0.0.1", description="Bind address; anything but loopback turns the trial issuer off.")
    port: int = Field(8080, ge=1, le=65535, description="TCP port to listen on.")
    workers: int = Field(1, ge=1, le=64, description="uvicorn worker processes sharing the port; with 2 or more on "
                         "embedded SQLite, one storage process writes the files for all of them (broker.storaged).")
    worker_cpu_affinity: Literal["on", "off"] = Field(
        "off", description="on: with several workers and at least as many usable CPUs, each worker keeps to one "
        "CPU with its threads (broker.affinity; for hosts that run nothing else busy); off: the kernel places them.",
    )
    public_url: str | None = Field(None, description="Issuer URL; defaults to http(s)://host:port.")
    audience: str = Field("nhi-broker", description="The `aud` subject tokens must carry for this broker.")
    token_alg: Literal["ES256", "EdDSA"] = Field("ES256", description="Task-token signature algorithm.")
    token_ttl: int = Field(300, ge=10, le=3600, description="Default task-token lifetime; rules cap it.")
    ledger_origin: str = Field("nhi-broker.local/ledger", description="Checkpoint origin line.")
    ledger_key_name: str | None = Field(None, description="Signed-note key name; defaults to the origin.")
    ledger_url: str | None = Field(
        None,
        description="Ledger storage: sqlite:///<path> (default: <data_dir>/ledger.sqlite3) or postgresql://... "
        "(one log for every replica; `nhi-broker db upgrade` creates its schema).",
    )
    ledger_read_threads: int = Field(
        4, ge=1, le=64, description="Threads of their own for ledger reads (proofs, entries, checkpoints, /metrics)."
    )
    ledger_read_timeout: float = Field(
        30.0, gt=0, le=300, description="Seconds a ledger read may take (as an append); then 503, the loop never waits."
    )
    trust: list[IssuerConfig] = Field(default_factory=list, description="Trusted workload-identity issuers.")
    ledger_witnesses: list[str] = Field(
        default_factory=list, description="Witness verifier keys whose checkpoint cosignatures the broker publishes."
    )
    unsafe_trial_issuers: bool | None = Field(
        None,
        description="Trust the local trial issuer(s) (anyone with the data dir's dev key can claim any identity). "
        "Default: on only on embedded defaults bound to loopback (no `trust`, loopback host and public_url).",
    )
    max_body_bytes: int = Field(65536, ge=1024, le=1048576, description="Largest request body accepted (413 above).")
    max_subject_token_bytes: int = Field(
        8192, ge=1024, le=65536, description="Largest subject/actor token accepted, checked before decoding."
    )
    user_issuers: list[UserIssuerConfig] = Field(
        default_factory=list, description="Issuers of end-user tokens for delegated exchanges (RFC 8693 §2.1)."
    )
    unsafe_trial_user_issuer: bool | None = Field(
        None, description="Trust the local trial end-user issuer. Default: on only when `user_issuers` is empty "
        "and the trial workload issuer is on (loopback embedded defaults)."
    )
    dpop_nonce: bool = Field(False, description="Demand a server nonce in DPoP proofs (RFC 9449 §8).")
    live_sync_interval: float = Field(
        1.0, gt=0, le=60, description="Seconds between a worker's looks for a policy set another worker or replica "
        "reloaded, and for rotated token or ledger keys (live changes, docs/operators.md)."
    )
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
    approvals: ApprovalSettings = Field(  # frozen, so one shared default is safe
        ApprovalSettings(), description="Approval polling, webhook and console sessions (docs/approvals.md)."
    )
    x509: X509Settings | None = Field(
        None, description="X.509-SVID attestation: trust bundles per trust domain, proxies trusted for XFCC."
    )
    wimse: WimseSettings | None = Field(None, description="WIMSE WIT + WPT attestation: trust anchors per domain.")
    tls: TlsSettings | None = Field(
        None, description="Serve HTTPS, requesting client certificates verified against the x509 bundles."
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines: text for a terminal, or json (one object per line, with the request's "
        "trace_id and span_id) for a log pipeline."
    )
    otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP traces URL (e.g. http://127.0.0.1:4318/v1/traces): export OpenTelemetry "
        "spans of every request there; needs the [otel] extra (docs/observability.md)."
    )

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

    @field_validator("otlp_endpoint")
    @classmethod
    def _otlp_endpoint(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", value):
            raise ValueError("otlp_endpoint must be an http(s) URL without query or fragment, e.g. "
                             "http://127.0.0.1:4318/v1/traces")
        return value

    @model_validator(mode="after")
    def _trial_only_without_trust(self) -> Settings:
        if self.unsafe_trial_issuers and self.trust:
            raise ValueError("unsafe_trial_issuers is for trials only and cannot be combined with configured trust")
        return self

    @model_validator(mode="after")
    def _user_issuers_apart(self) -> Settings:
        if self.unsafe_trial_user_issuer and self.user_issuers:
            raise ValueError("unsafe_trial_user_issuer is for trials only and cannot be combined with user_issuers")
        workload_issuers = {cfg.issuer for cfg in (*self.trust, *self.operator_issuers)}
        for cfg in self.user_issuers:
            # An issuer is trusted for one thing: a workload token must never pass as a user's, and the
            # broker's own task tokens are parents of sub-agents, never end-user tokens.
            if cfg.issuer in workload_issuers:
                raise ValueError(f"user issuer {cfg.issuer!r} is also a workload or operator issuer")
            if cfg.issuer == self.issuer_url:
                raise ValueError("a user issuer cannot be the broker itself (public_url)")
        return self

    @model_validator(mode="after")
    def _tls_needs_one_worker(self) -> Settings:
        if self.tls is not None and self.workers != 1:
            # The TLS layer's client CAs follow bundle rotation in the one process that holds them.
            raise ValueError("tls (mutual TLS termination) runs with workers = 1; scale out with replicas")
        if self.tls is not None and self.tls.client_certificates == "required" and self.x509 is None:
            raise ValueError("tls.client_certificates = \"required\" needs [x509] bundles to verify them")
        return self

    @property
    def token_endpoint(self) -> str:
        """The token endpoint's URL under the issuer URL (a WIMSE proof's required ``aud``)."""
        return self.issuer_url + "/v1/token"

    @property
    def issuer_url(self) -> str:
        """The ``iss`` of task tokens and the RFC 8414 issuer."""
        return self.public_url or f"{'https' if self.tls is not None else 'http'}://{self.host}:{self.port}"

    @property
    def on_loopback(self) -> bool:
        """True when the broker binds a loopback address and its public URL (if any) is on loopback."""
        hosts = [self.host]
        if self.public_url is not None:
            hosts.append(urlsplit(self.public_url).hostname or "")
        return all(is_loopback_host(h) for h in hosts)

    @property
    def ledger_storage_url(self) -> str:
        """``ledger_url``, or the embedded default under ``data_dir``."""
        from broker.ledger.engines import default_ledger_url

        return self.ledger_url or default_ledger_url(self.data_dir)

    @property
    def trial_issuers_enabled(self) -> bool:
        """Whether the trial issuers are trusted: explicitly, or on loopback embedded defaults only."""
        if self.unsafe_trial_issuers is not None:
            return self.unsafe_trial_issuers
        return not self.trust and self.on_loopback

    @property
    def trial_user_issuer_enabled(self) -> bool:
        """The trial end-user issuer: on by default with the trial workload issuer, off with user issuers."""
        if self.unsafe_trial_user_issuer is not None:
            return self.unsafe_trial_user_issuer
        return self.trial_issuers_enabled and not self.user_issuers

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

    Raises :class:`ConfigError` listing every problem, each with its file and line (or environment
    variable), its key, the nearest valid key for an unknown one, and what the value must be.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    previous = os.environ.get(CONFIG_ENV)
    toml_path: Path | None = None
    if config is not None:
        if not config.is_file():
            raise ConfigError(f"configuration file {config} does not exist")
        toml_path = config
    elif previous:
        if not Path(previous).is_file():
            raise ConfigError(f"configuration file {previous} (from {CONFIG_ENV}) does not exist")
        toml_path = Path(previous)
    toml_text = read_toml(toml_path)[0] if toml_path is not None else None  # syntax errors name file:line
    unknown = unknown_environment(Settings, os.environ)
    problems = list(unknown.values())
    if config is not None:
        os.environ[CONFIG_ENV] = str(config)
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems += explain_validation_error(
            exc, Settings, toml_path=toml_path, toml_text=toml_text, environ=dict(os.environ), overrides=overrides,
            unknown_env=list(unknown),
        )
    except ValueError as exc:  # raised outside pydantic's validation (e.g. by a settings source)
        problems.append(f"{toml_path or 'settings'}: {exc}")
    finally:
        if config is not None:
            if previous is None:
                os.environ.pop(CONFIG_ENV, None)
            else:
                os.environ[CONFIG_ENV] = previous
    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        raise ConfigError(f"invalid configuration ({count}):\n  " + "\n  ".join(problems))
    return settings
