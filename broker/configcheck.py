"""``nhi-broker config check``: validate a deployment's configuration without starting the broker.

Each check returns a :class:`Check` (``ok``, ``warn`` or ``fail`` with one line of detail); nothing is
created or written (keys that do not exist yet are reported as "created at first start"). The checks:

- ``settings``: the TOML file, the ``NHI_BROKER_*`` environment and the flags (done by the caller);
- ``policies``: the policy directory loads (every rule validated) and ``tests.toml`` parses;
- ``keys``: the task-token keys, the ledger key and the trial issuer's key load, mode 0600;
- ``files``: every file a setting names (JWKS files, Vault token or AppRole secret id) is readable;
- ``backends`` (unless ``network=False``): Redis answers PING, PostgreSQL answers ``SELECT 1``,
  Vault/OpenBao is unsealed and accepts the broker's login, every JWKS URL serves a usable key set.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from broker.config import Settings
from broker.errors import BrokerError, ConfigError, PolicyLoadError

__all__ = ["Check", "run_checks"]

Status = Literal["ok", "warn", "fail"]
_TIMEOUT = 3.0


@dataclass(frozen=True)
class Check:
    """The outcome of one check: its group (``policies``, ``keys``, ``backends``...), its name and a line."""

    group: str
    name: str
    status: Status
    detail: str

    def to_json(self) -> dict[str, str]:
        """The check as ``config check --format json`` prints it."""
        return {"group": self.group, "name": self.name, "status": self.status, "detail": self.detail}


@contextlib.contextmanager
def _suppress_into(out: list[Check], group: str, name: str) -> Iterator[None]:
    try:
        yield
    except (ConfigError, BrokerError, OSError, ValueError) as exc:
        out.append(Check(group, name, "fail", str(exc).splitlines()[0] if str(exc) else type(exc).__name__))


def _policies(settings: Settings) -> list[Check]:
    from broker.policy import load_policies
    from broker.policy.testing import load_cases

    out: list[Check] = []
    directory = settings.policies_dir
    try:
        policy_set = load_policies(directory)
    except PolicyLoadError as exc:
        return [Check("policies", str(directory), "fail", "; ".join(exc.problems))]
    detail = f"{len(policy_set.rules)} rules, {len(policy_set.registry)} workloads, version {policy_set.version}"
    out.append(Check("policies", str(directory), "ok", detail))
    tests = directory / "tests.toml"
    if tests.is_file():
        try:
            out.append(Check("policies", str(tests), "ok", f"{len(load_cases(tests))} test cases parse"))
        except PolicyLoadError as exc:
            out.append(Check("policies", str(tests), "fail", "; ".join(exc.problems)))
    return out


def _keys(settings: Settings) -> list[Check]:
    from broker.attest.dev import DEV_KEY_FILE, DevIssuer
    from broker.mint.keys import KeySet, load_or_create_private_key

    out: list[Check] = []
    data = settings.data_dir
    if data.exists() and not data.is_dir():
        return [Check("keys", str(data), "fail", "data_dir exists and is not a directory")]
    token_dir = data / "keys" / "token"
    if any(token_dir.glob("*.pem")):
        with _suppress_into(out, "keys", str(token_dir)):
            keys = KeySet(token_dir, alg=settings.token_alg)
            out.append(Check("keys", str(token_dir), "ok", f"{len(keys.keys)} {settings.token_alg} key(s), "
                             f"active {keys.active.kid}"))
    else:
        out.append(Check("keys", str(token_dir), "warn", "no task-token key yet: one is created at first start"))
    ledger_key = data / "keys" / "ledger-key.pem"
    if ledger_key.exists():
        with _suppress_into(out, "keys", str(ledger_key)):
            load_or_create_private_key(ledger_key, "EdDSA")  # exists: only loaded and checked
            out.append(Check("keys", str(ledger_key), "ok", "Ed25519 ledger key, mode 0600"))
    else:
        out.append(Check("keys", str(ledger_key), "warn", "no ledger key yet: one is created at first start "
                         "(replicas must share one: see docs/deploy.md)"))
    if settings.trial_issuers_enabled and (data / DEV_KEY_FILE).exists():
        with _suppress_into(out, "keys", str(data / DEV_KEY_FILE)):
            DevIssuer.load_or_create(data)
            out.append(Check("keys", str(data / DEV_KEY_FILE), "ok", "trial issuer key"))
    return out


def _files(settings: Settings) -> list[Check]:
    from broker.attest.jwks import parse_jwks

    out: list[Check] = []
    for config in [*settings.trust, *settings.operator_issuers]:
        if config.jwks_file is not None:
            with _suppress_into(out, "files", str(config.jwks_file)):
                keys = parse_jwks(config.jwks_file.read_bytes())
                out.append(Check("files", str(config.jwks_file), "ok", f"{len(keys)} key(s) for {config.issuer}"))
    vault = settings.vault
    if vault is not None:
        for path, what in ((vault.token_file, "vault token"), (vault.approle_secret_id_file, "AppRole secret id"),
                           (vault.ca_cert, "Vault CA certificate")):
            if path is not None:
                with _suppress_into(out, "files", str(path)):
                    if not Path(path).read_bytes().strip():
                        raise ConfigError(f"{what} file {path} is empty")
                    out.append(Check("files", str(path), "ok", f"{what} file readable"))
    return out


def _redis(url: str) -> Check:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=_TIMEOUT, socket_connect_timeout=_TIMEOUT)
    try:
        client.ping()
        return Check("backends", "redis", "ok", f"{_redact(url)} answers PING")
    except redis.RedisError as exc:
        return Check("backends", "redis", "fail", f"{_redact(url)}: {type(exc).__name__}: {exc}")
    finally:
        client.close()


def _postgresql(url: str) -> Check:
    try:
        import psycopg
    except ImportError:
        return Check("backends", "postgresql", "fail", "psycopg is not installed")
    try:
        with psycopg.connect(url, connect_timeout=int(_TIMEOUT)) as conn:
            conn.execute("SELECT 1")
        return Check("backends", "postgresql", "ok", f"{_redact(url)} answers SELECT 1")
    except psycopg.Error as exc:
        return Check("backends", "postgresql", "fail", f"{_redact(url)}: {str(exc).strip().splitlines()[0]}")


def _vault(settings: Settings) -> Check:
    from broker.vault.identity import VaultIdentity

    assert settings.vault is not None
    addr = settings.vault.addr
    identity = VaultIdentity(settings.vault)
    try:
        client = identity.client()  # logs in with the configured token file or AppRole
        health: Any = client.sys.read_health_status(method="GET")
        sealed = isinstance(health, dict) and health.get("sealed")
        if sealed:
            return Check("backends", "vault", "fail", f"{addr} is sealed")
        return Check("backends", "vault", "ok", f"{addr} unsealed; the broker's login works")
    except (BrokerError, ConfigError) as exc:
        return Check("backends", "vault", "fail", f"{addr}: {exc}")
    except Exception as exc:  # hvac/requests raise many types; any of them means "not usable"
        return Check("backends", "vault", "fail", f"{addr}: {type(exc).__name__}")
    finally:
        identity.close()


def _jwks_url(issuer: str, url: str) -> Check:
    import httpx

    from broker.attest.jwks import parse_jwks

    try:
        response = httpx.get(url, timeout=_TIMEOUT, follow_redirects=False)
        if response.status_code != 200:
            return Check("backends", f"jwks {issuer}", "fail", f"{url} answered HTTP {response.status_code}")
        keys = parse_jwks(response.content)
        return Check("backends", f"jwks {issuer}", "ok", f"{url} serves {len(keys)} key(s)")
    except httpx.HTTPError as exc:
        return Check("backends", f"jwks {issuer}", "fail", f"{url}: {type(exc).__name__}")
    except ValueError as exc:
        return Check("backends", f"jwks {issuer}", "fail", f"{url}: not a usable JWKS: {exc}")


def _redact(url: str) -> str:
    """A connection URL without its password."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _backends(settings: Settings) -> list[Check]:
    out: list[Check] = []
    if settings.state_backend == "redis":
        out.append(_redis(settings.redis_url))
    ledger_url = str(getattr(settings, "ledger_url", "") or "")
    if ledger_url.startswith(("postgresql://", "postgres://")):
        out.append(_postgresql(ledger_url))
    if settings.vault is not None:
        out.append(_vault(settings))
    for config in [*settings.trust, *settings.operator_issuers]:
        if config.jwks_url is not None:
            out.append(_jwks_url(config.issuer, config.jwks_url))
    return out


def run_checks(settings: Settings, *, network: bool = True) -> list[Check]:
    """Every check for ``settings`` (the settings themselves already loaded), in a stable order."""
    checks = [*_policies(settings), *_keys(settings), *_files(settings)]
    if settings.trial_issuers_enabled:
        checks.append(Check("trust", "trial issuer", "warn", "ON: for trials only (embedded defaults on loopback "
                            "or unsafe_trial_issuers = true)"))
    elif not settings.trust:
        checks.append(Check("trust", "issuers", "warn", "no [[trust]] issuer: every token exchange is refused"))
    else:
        checks.append(Check("trust", "issuers", "ok", ", ".join(t.issuer for t in settings.trust)))
    if settings.otlp_endpoint is not None:
        from broker.telemetry import require_exporter

        with _suppress_into(checks, "telemetry", settings.otlp_endpoint):
            require_exporter(settings)
            checks.append(Check("telemetry", settings.otlp_endpoint, "ok", "OpenTelemetry spans exported over "
                                "OTLP/HTTP (a collector that is down loses spans, never requests)"))
    if network:
        checks.extend(_backends(settings))
    return checks
