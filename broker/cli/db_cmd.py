"""``nhi-broker db upgrade|status``: the PostgreSQL schema replicas share.

``upgrade`` applies the numbered migrations of :mod:`broker.pg.migrations` that the database lacks
(run it as the schema owner before starting brokers of a new release; brokers never migrate by
themselves and refuse to start on an older schema). ``--grant ROLE`` gives the role brokers connect
as exactly the privileges they need, and nothing that could rewrite the ledger.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["register"]


def _url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url)
    from broker.cli.main import _settings

    return str(_settings(args).ledger_storage_url)


def _cmd_upgrade(args: argparse.Namespace) -> int:
    from broker.errors import ConfigError, LedgerUnavailable
    from broker.ledger.engines import check_ledger_url, open_ledger_storage
    from broker.pg import SCHEMA_VERSION, connect, describe, is_postgres_url, redact, upgrade

    url = _url(args)
    try:
        check_ledger_url(url)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not is_postgres_url(url):
        if args.grant:
            raise ConfigError("--grant applies to PostgreSQL only")
        open_ledger_storage(url).close()  # SQLite creates and upgrades its schema when opened
        print(f"SQLite ledger {url} is up to date (its schema is created when it is opened)")
        return 0
    import psycopg

    try:
        with connect(url, autocommit=True, application="nhi-broker db upgrade") as conn:
            applied = upgrade(conn, grant_to=args.grant)
    except psycopg.Error as exc:
        raise LedgerUnavailable(f"cannot upgrade {redact(url)}: {describe(exc)}") from None
    for migration in applied:
        print(f"applied {migration.version}: {migration.description}")
    print(f"{redact(url)} is at schema version {SCHEMA_VERSION}"
          + (f"; role {args.grant} granted the broker's privileges" if args.grant else ""))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from broker.errors import ConfigError, LedgerUnavailable
    from broker.pg import SCHEMA_VERSION, connect, current_version, describe, is_postgres_url, redact

    url = _url(args)
    if not is_postgres_url(url):
        raise ConfigError("db status applies to a PostgreSQL ledger_url")
    import psycopg

    try:
        with connect(url, autocommit=True, application="nhi-broker db status") as conn:
            version = current_version(conn)
    except psycopg.Error as exc:
        raise LedgerUnavailable(f"cannot read {redact(url)}: {describe(exc)}") from None
    state = "up to date" if version >= SCHEMA_VERSION else "needs `nhi-broker db upgrade`"
    print(f"{redact(url)}: schema version {version}, this broker needs {SCHEMA_VERSION} ({state})")
    return 0 if version >= SCHEMA_VERSION else 1


def register(subparsers: Any) -> None:
    """Add ``db upgrade|status`` to the ``nhi-broker`` subcommands."""
    db = subparsers.add_parser("db", help="the shared PostgreSQL schema (migrations)")
    commands = db.add_subparsers(dest="db_command", metavar="COMMAND", required=True)
    for name, func, text in (
        ("upgrade", _cmd_upgrade, "apply the schema migrations the database lacks"),
        ("status", _cmd_status, "print the schema version (exit 1 when an upgrade is needed)"),
    ):
        p = commands.add_parser(name, help=text, description=text)
        p.add_argument("--url", help="postgresql://user@host/database (default: the configured ledger_url)")
        p.add_argument("--config", type=Path, help="TOML settings file (default: $NHI_BROKER_CONFIG)")
        p.add_argument("--data-dir", type=Path, help="state directory (for the default SQLite ledger)")
        if name == "upgrade":
            p.add_argument("--grant", metavar="ROLE",
                           help="grant ROLE (the role brokers connect as) exactly the privileges brokers need")
        p.set_defaults(func=func)
