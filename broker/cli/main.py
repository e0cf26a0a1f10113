"""``nhi-broker``: the operator's command line.

    serve                  run the broker (embedded defaults when nothing is configured)
    dev identity ID        print a short-lived workload JWT from the trial issuer
    dev user SUBJECT       print a short-lived end-user JWT from the trial user issuer (delegation)
    dev vault              run a local OpenBao configured for the sample vault-* intents
    keys list|rotate       task-token signing keys
    policy test|explain|lint
    audit verify|prove|consistency|witness|report
    ledger export|schema|rotate-key
    db upgrade|status      the shared PostgreSQL schema (ledger_url = "postgresql://...")
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from broker import __version__
from broker.errors import BrokerError, ConfigError, PolicyLoadError

__all__ = ["build_parser", "main"]


def _settings(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from broker.config import load_settings

    return load_settings(
        getattr(args, "config", None),
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
        data_dir=getattr(args, "data_dir", None),
        policies_dir=getattr(args, "policies", None),
        workers=getattr(args, "workers", None),
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    from broker.api.server import run as run_server
    from broker.runtime import Runtime

    settings = _settings(args)
    runtime = Runtime.open(settings)
    try:
        runtime.record_startup()
        verifier_key = runtime.ledger_verifier_key
        dev = runtime.dev_issuer is not None
        dev_user = runtime.dev_user_issuer is not None
    finally:
        runtime.close()
    base = settings.issuer_url
    print(f"nhi-broker {__version__} listening on http://{settings.host}:{settings.port}")
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
    if dev:
        print("  trial issuer      ON (no trust configured) - `nhi-broker dev identity <spiffe-id>`;"
              " for trials only")
    if dev_user:
        print("  trial user issuer ON (no user_issuers configured) - `nhi-broker dev user <subject>`;"
              " for trials only")
    sys.stdout.flush()
    run_server(settings, args.server, access_log=args.access_log)
    return 0


def _cmd_dev_identity(args: argparse.Namespace) -> int:
    from broker.attest.dev import DevIssuer
    from broker.attest.spiffe import parse_spiffe_id
    from broker.clock import SystemClock

    settings = _settings(args)
    if not settings.dev_issuer_enabled:
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
    if not settings.dev_user_issuer_enabled:
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
    from broker.mint.keys import KeySet

    settings = _settings(args)
    keys = KeySet(settings.data_dir / "keys" / "token", alg=settings.token_alg)
    published = {k["kid"] for k in keys.jwks()["keys"]}
    for key in reversed(keys.keys):
        state = "active" if key is keys.active else ("published" if key.kid in published else "retired")
        print(f"{key.kid}  {key.alg}  created {key.created_at}  {state}")
    return 0


def _cmd_keys_rotate(args: argparse.Namespace) -> int:
    import uuid

    from broker.entries import key_rotation_entry
    from broker.runtime import Runtime

    settings = _settings(args)
    runtime = Runtime.open(settings)
    try:
        key = runtime.keys.rotate(runtime.clock.now())
        entry = key_rotation_entry(
            now=runtime.clock.now(), request_id=f"cli-{uuid.uuid4().hex}",
            purpose="task-token", kid=key.kid, alg=key.alg, jwk=key.jwk,
        )
        runtime.ledger.append(entry)
    finally:
        runtime.close()
    print(f"new signing key {key.kid}; running brokers use it after a restart")
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
    serve.add_argument("--server", choices=["uvicorn", "granian"], default="uvicorn",
                       help="HTTP server (default uvicorn with a bounded request head; see broker/api/server.py)")
    serve.set_defaults(func=_cmd_serve)

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
    klist.set_defaults(func=_cmd_keys_list)
    krot = keys_sub.add_parser("rotate", help="create a new signing key (recorded in the ledger)")
    _add_common(krot)
    krot.set_defaults(func=_cmd_keys_rotate)

    from broker.cli import audit_cmd, db_cmd, policy_cmd

    policy_cmd.register(sub)
    audit_cmd.register(sub)
    db_cmd.register(sub)
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
