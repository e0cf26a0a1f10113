"""``nhi-broker``: the operator's command line.

    serve                  run the broker (embedded defaults when nothing is configured)
    dev identity ID        print a short-lived workload JWT from the trial issuer
    dev user SUBJECT       print a short-lived end-user JWT from the trial user issuer (delegation)
    dev vault              run a local OpenBao configured for the sample vault-* intents
    keys list|rotate       task-token signing keys
    policy test|explain|lint
    audit verify|prove|consistency|witness|report
    ledger export|schema|rotate-key
    config check|docs      validate a configuration without starting; the configuration reference
    healthcheck            probe the local broker on its configured port (Docker HEALTHCHECK)
    admin ...              operators: workloads, revoke, approvals, leases (against a running broker)
    db upgrade|status      the shared PostgreSQL schema (ledger_url = "postgresql://...")
"""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker import __version__
from broker.errors import BrokerError, ConfigError, PolicyLoadError

if TYPE_CHECKING:
    from broker.config import Settings

__all__ = ["KEY_PUBLISH_SECONDS", "build_parser", "main"]

#: Default of ``keys rotate --publish-for``: the JWKS ``max-age`` (300 s) plus a minute of margin.
KEY_PUBLISH_SECONDS = 360  # broker.mint.keys.JWKS_MAX_AGE + 60 (not imported: the CLI starts light)


def _settings(args: argparse.Namespace) -> Settings:
    """Settings from ``--config``, the environment and the command's flags."""
    from broker.config import load_settings

    return load_settings(
        getattr(args, "config", None),
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
        data_dir=getattr(args, "data_dir", None),
        policies_dir=getattr(args, "policies", None),
        workers=getattr(args, "workers", None),
        log_format=getattr(args, "log_format", None),
    )


def _listen(host: str, port: int) -> socket.socket:
    """Bind and listen before anything is written: a start that cannot serve leaves no trace."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        reason = "the address is already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise ConfigError(f"cannot listen on {host}:{port}: {reason} (nothing was started or recorded)") from None
    sock.set_inheritable(True)
    return sock


def _trust_lines(settings: Any, trial: bool) -> list[str]:
    lines = []
    for issuer in settings.trust:
        lines.append(f"  trusted issuer    {issuer.issuer} ({issuer.kind})")
    if trial:
        why = "explicitly enabled" if settings.unsafe_trial_issuers else "embedded defaults on loopback"
        lines.append(f"  trial issuer      ON ({why}) - `nhi-broker dev identity <spiffe-id>`; for trials only")
    else:
        why = ("unsafe_trial_issuers = false" if settings.unsafe_trial_issuers is False
               else "trust is configured" if settings.trust
               else "not on loopback embedded defaults; set unsafe_trial_issuers = true to try it anyway")
        lines.append(f"  trial issuer      OFF ({why})")
        if not settings.trust:
            lines.append("  WARNING           no [[trust]] issuer is configured: every token exchange is refused")
    return lines


def _cmd_serve(args: argparse.Namespace) -> int:
    from broker.api.server import run as run_server
    from broker.logs import configure_logging
    from broker.runtime import Runtime
    from broker.telemetry import require_exporter

    settings = _settings(args)
    configure_logging(settings.log_format)  # this process's records (the start) as the workers' will be
    require_exporter(settings)  # before anything is bound or recorded
    # SIGHUP means "reload the policies" (broker.api.signals): until a worker can do that, it must not
    # end the broker (its default action).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    sock = _listen(settings.host, settings.port)
    try:
        runtime = Runtime.open(settings)
        try:
            runtime.record_startup()
            verifier_key = runtime.ledger_verifier_key
            trial = runtime.dev_issuer is not None
            trial_user = runtime.dev_user_issuer is not None
            bootstrap = _console_bootstrap(settings, runtime)
        finally:
            runtime.close()
    except BaseException:
        sock.close()
        raise
    base = settings.issuer_url
    scheme = "https" if settings.tls is not None else "http"
    print(f"nhi-broker {__version__} listening on {scheme}://{settings.host}:{settings.port}")
    print(f"  issuer            {base}")
    print(f"  JWKS              {base}/.well-known/jwks.json")
    print(f"  ledger checkpoint {base}/v1/ledger/checkpoint")
    print(f"  ledger verifier   {verifier_key}")
    print(f"  console           {base}/console (approvals and ledger, for configured operators)")
    print(f"  data dir          {settings.data_dir.resolve()}")
    print(f"  policies          {settings.policies_dir.resolve()} ({runtime.policies.version})")
    from broker.pg import redact

    print(f"  ledger storage    {redact(settings.ledger_storage_url)}")
    print(f"  shared state      {settings.state_backend}"
          + (f" (key prefix {settings.redis_prefix})" if settings.state_backend == "redis" else ""))
    from broker.ledger.engines import is_shared

    if is_shared(settings.ledger_storage_url) and settings.state_backend == "sqlite":
        print("  WARNING           the ledger is shared (PostgreSQL) but the state store is this host's SQLite file:"
              " replicas on other hosts will not see its replay, revocation, suspension and approval state;"
              " set state_backend = \"redis\"")
    for line in _trust_lines(settings, trial):
        print(line)
    if trial_user:
        print("  trial user issuer ON (no user_issuers configured) - `nhi-broker dev user <subject>`;"
              " for trials only")
    for line in bootstrap:
        print(line)
    sys.stdout.flush()
    if settings.tls is not None:
        if args.server != "uvicorn":
            sock.close()
            raise ConfigError("tls (mutual TLS termination) runs on uvicorn; use --server uvicorn")
        sock.close()  # uvicorn binds its own TLS listener (broker.tls)
        _serve_tls(settings, "info" if args.access_log else "warning", args.access_log)
        return 0
    try:
        served = run_server(settings, args.server, access_log=args.access_log, sock=sock)
    except KeyboardInterrupt:
        served = True
    finally:
        sock.close()
    return 0 if served else 1


def _console_bootstrap(settings: Settings, runtime: Any) -> list[str]:
    """On embedded defaults: new one-time console sign-ins (hashes stored; the secrets only printed)."""
    from broker.console.bootstrap import bootstrap_enabled, create_bootstrap

    if not bootstrap_enabled(settings):
        return []
    groups = tuple(sorted({terms.approvers for terms in runtime.policies.reviews.values()}))
    lines = ["  console sign-in   one-time bootstrap credentials (embedded defaults; printed once, stored hashed,",
             "                    replaced at the next start; console only, never the admin API):"]
    for cred in create_bootstrap(settings.data_dir, groups):
        op = cred.operator
        extra = f"  (groups: {', '.join(op.groups)})" if op.groups else ""
        lines.append(f"    {op.role:<9} {cred.secret}{extra}")
    return lines


def _serve_tls(settings: Settings, log_level: str, access_log: bool) -> None:
    """HTTPS with optional or required client certificates (one worker; see broker.tls)."""
    import uvicorn

    from broker.api.app import create_app
    from broker.attest.x509_bundles import X509Bundles
    from broker.tls import ServerTls, peer_cert_protocol

    assert settings.tls is not None
    try:
        roots = X509Bundles(settings.x509.bundles).roots if settings.x509 is not None else None
        tls = ServerTls(settings.tls, roots)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"tls: {exc}") from None
    from broker.api.http_server import BoundedHttpToolsProtocol
    from broker.logs import logging_config

    config = uvicorn.Config(create_app(settings, tls=tls), host=settings.host, port=settings.port,
                            log_level=log_level, access_log=access_log, server_header=False, proxy_headers=False,
                            log_config=logging_config(settings.log_format),
                            http=peer_cert_protocol(BoundedHttpToolsProtocol))
    config.load()
    config.ssl = tls.context  # our context: its client CAs follow bundle rotation (ServerTls.add_roots)
    uvicorn.Server(config).run()


def _cmd_dev_identity(args: argparse.Namespace) -> int:
    from broker.attest.dev import DevIssuer
    from broker.attest.spiffe import parse_spiffe_id
    from broker.clock import SystemClock

    settings = _settings(args)
    if not settings.trial_issuers_enabled:
        raise ConfigError("the trial issuer is off because trust is configured")
    try:
        parse_spiffe_id(args.spiffe_id)
    except ValueError as exc:
        raise ConfigError(f"not a SPIFFE ID: {exc}") from None
    issuer = DevIssuer.load_or_create(settings.data_dir)
    token = issuer.mint(args.spiffe_id, args.audience or settings.audience, ttl=args.ttl, clock=SystemClock())
    print(token)
    return 0


def _cmd_dev_user(args: argparse.Namespace) -> int:
    from broker.attest.dev import DevUserIssuer
    from broker.clock import SystemClock

    settings = _settings(args)
    if not settings.trial_user_issuer_enabled:
        raise ConfigError("the trial user issuer is off because user_issuers (or trust) are configured")
    claims: dict[str, str] = {}
    if args.tenant:
        claims["tenant"] = args.tenant
    issuer = DevUserIssuer.load_or_create(settings.data_dir)
    try:
        token = issuer.mint_user(args.subject, args.audience or settings.audience, ttl=args.ttl,
                                 clock=SystemClock(), claims=claims)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    print(token)
    return 0


def _cmd_keys_list(args: argparse.Namespace) -> int:
    import json

    from broker.cli.admin_cmd import human_time
    from broker.mint.keys import KeySet

    settings = _settings(args)
    keys = KeySet(settings.data_dir / "keys" / "token", alg=settings.token_alg)
    rows: list[dict[str, Any]] = [
        {"kid": key.kid, "alg": key.alg, "created_at": key.created_at, "signs_from": key.signs_from,
         "state": keys.state(key)}
        for key in reversed(keys.keys)
    ]
    if args.format == "json":
        print(json.dumps({"keys": rows}, indent=2))
        return 0
    for row in rows:
        line = f"{row['kid']}  {row['alg']}  created {human_time(row['created_at'])}  {row['state']}"
        if row["state"] == "pending":
            line += f" (published; signs from {human_time(row['signs_from'])})"
        print(line)
    return 0


def _cmd_keys_init(args: argparse.Namespace) -> int:
    import uuid

    from broker.runtime import Runtime

    settings = _settings(args)
    runtime = Runtime.open(settings)  # creates the ledger key and a first token key when absent
    try:
        recorded = runtime.record_new_keys(f"keys-init-{uuid.uuid4().hex}")
        verifier, kid = runtime.ledger_verifier_key, runtime.keys.active.kid
    finally:
        runtime.close()
    keys_dir = (settings.data_dir / "keys").resolve()
    print(f"keys in {keys_dir} ({'created and recorded: ' + ', '.join(recorded) if recorded else 'all existed'})")
    print(f"  ledger verifier   {verifier}")
    print(f"  task-token key    {kid} ({settings.token_alg})")
    print("copy keys/ to every replica's data_dir (docs/deploy.md); publish the verifier key out of band")
    return 0


def _cmd_keys_rotate(args: argparse.Namespace) -> int:
    import uuid

    from broker.cli.admin_cmd import human_time
    from broker.entries import key_rotation_entry
    from broker.runtime import Runtime

    if args.publish_for < 0:
        raise ConfigError("--publish-for must be 0 or more seconds")
    settings = _settings(args)
    runtime = Runtime.open(settings)
    try:
        key = runtime.keys.rotate(runtime.clock.now(), publish_for=args.publish_for)
        entry = key_rotation_entry(
            now=runtime.clock.now(), request_id=f"cli-{uuid.uuid4().hex}",
            purpose="task-token", kid=key.kid, alg=key.alg, jwk=key.jwk,
        )
        runtime.ledger.append(entry)
    finally:
        runtime.close()
    print(f"new signing key {key.kid}: in the JWKS now, signs from {human_time(key.signs_from)}")
    print("running brokers pick it up without a restart; on replicas, copy the key file to every data_dir "
          "before then (docs/operators.md)")
    return 0


def _cmd_healthcheck(args: argparse.Namespace) -> int:
    import httpx

    settings = _settings(args)
    # A wildcard bind is probed on loopback; a specific address on that address.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(settings.host, settings.host)  # noqa: S104
    url = f"http://{f'[{host}]' if ':' in host else host}:{settings.port}/{'readyz' if args.ready else 'healthz'}"
    try:
        status = httpx.get(url, timeout=args.timeout).status_code
    except httpx.HTTPError as exc:
        print(f"unhealthy: {url}: {type(exc).__name__}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {url} answered HTTP {status}", file=sys.stderr)
        return 1
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML settings file (default: $NHI_BROKER_CONFIG)")
    p.add_argument("--data-dir", type=Path, help="state directory (default: ./.nhi-broker)")
    p.add_argument("--policies", type=Path, help="policy directory (default: ./policies)")


def build_parser() -> argparse.ArgumentParser:
    """The ``nhi-broker`` argument parser."""
    parser = argparse.ArgumentParser(prog="nhi-broker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"nhi-broker {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the broker")
    _add_common(serve)
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8080)")
    serve.add_argument("--workers", type=int, help="worker processes (default 1)")
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.add_argument("--log-format", choices=("text", "json"),
                       help="log lines as text (default) or one JSON object per line with the request's trace id")
    serve.add_argument("--server", choices=["uvicorn", "granian"], default="uvicorn",
                       help="HTTP server (default uvicorn with a bounded request head; see broker/api/server.py)")
    serve.set_defaults(func=_cmd_serve)

    health = sub.add_parser("healthcheck", help="probe the local broker's /healthz (or /readyz) on its configured "
                            "port; exit 0 healthy, 1 not (the Docker HEALTHCHECK)")
    health.add_argument("--config", type=Path, help="TOML settings file (default: $NHI_BROKER_CONFIG)")
    health.add_argument("--ready", action="store_true", help="probe /readyz (backends) instead of /healthz")
    health.add_argument("--timeout", type=float, default=2.0, help="seconds (default 2)")
    health.set_defaults(func=_cmd_healthcheck)

    dev = sub.add_parser("dev", help="trial helpers (embedded defaults only)")
    dev_sub = dev.add_subparsers(dest="dev_command", metavar="COMMAND", required=True)
    ident = dev_sub.add_parser("identity", help="print a short-lived workload JWT from the trial issuer")
    ident.add_argument("spiffe_id", help="e.g. spiffe://example.org/ns/support/sa/support-assistant")
    ident.add_argument("--audience", help="default: the broker's audience (nhi-broker)")
    ident.add_argument("--ttl", type=int, default=300, help="lifetime in seconds (default 300)")
    _add_common(ident)
    ident.set_defaults(func=_cmd_dev_identity)
    user = dev_sub.add_parser("user", help="print a short-lived end-user JWT from the trial user issuer")
    user.add_argument("subject", help="the end user's subject, e.g. c-42 (the customer the assistant serves)")
    user.add_argument("--tenant", help="a tenant claim (policies see it as user.tenant)")
    user.add_argument("--audience", help="default: the broker's audience (nhi-broker)")
    user.add_argument("--ttl", type=int, default=300, help="lifetime in seconds (default 300)")
    _add_common(user)
    user.set_defaults(func=_cmd_dev_user)
    from broker.cli import vault_cmd

    vault_cmd.register(dev_sub)

    keys = sub.add_parser("keys", help="task-token signing keys")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)
    klist = keys_sub.add_parser("list", help="list keys, newest first")
    _add_common(klist)
    klist.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    klist.set_defaults(func=_cmd_keys_list)
    kinit = keys_sub.add_parser("init", help="create the ledger key and a first token key if absent, "
                                "recorded in the ledger (provisioning for replicas)")
    _add_common(kinit)
    kinit.set_defaults(func=_cmd_keys_init)
    krot = keys_sub.add_parser("rotate", help="create a new signing key (recorded in the ledger): published in the "
                               "JWKS at once, signing after --publish-for seconds, no restart")
    _add_common(krot)
    krot.add_argument("--publish-for", type=int, default=KEY_PUBLISH_SECONDS, metavar="SECONDS",
                      help=f"seconds the new key is only published before it signs (default {KEY_PUBLISH_SECONDS}: "
                      "the JWKS max-age of 300 s plus a minute, so cached JWKS hold it before any token it signs)")
    krot.set_defaults(func=_cmd_keys_rotate)

    from broker.cli import admin_cmd, audit_cmd, config_cmd, db_cmd, policy_cmd

    policy_cmd.register(sub)
    audit_cmd.register(sub)
    db_cmd.register(sub)
    config_cmd.register(sub)
    admin_cmd.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; errors print one line to stderr and exit non-zero, never a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    from broker.cli._exit import exit_status
    from broker.ledger.storage import LedgerCorrupt

    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return func(args)
    except LedgerCorrupt as exc:
        # The same refusal, with the same status, whichever command opened the ledger.
        print(f"nhi-broker: {exc}", file=sys.stderr)
        return exit_status(exc)
    except (ConfigError, PolicyLoadError, BrokerError) as exc:
        print(f"nhi-broker: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
