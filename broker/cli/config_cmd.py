"""``nhi-broker config check|docs``: validate a configuration without starting; print its reference.

Exit codes of ``config check``: 0 everything passed (warnings allowed); 1 the configuration, the
policies or the keys are refused; 3 the configuration is valid but a configured backend (Redis,
PostgreSQL, Vault/OpenBao, a JWKS URL) cannot be reached or refuses the broker; 2 usage errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from broker.errors import ConfigError

__all__ = ["EXIT_BACKEND", "EXIT_INVALID", "register"]

EXIT_INVALID = 1
EXIT_BACKEND = 3


def _cmd_check(args: argparse.Namespace) -> int:
    from broker.cli.main import _settings
    from broker.configcheck import Check, run_checks

    try:
        settings = _settings(args)
    except ConfigError as exc:
        if args.format == "json":
            print(json.dumps({"ok": False, "exit": EXIT_INVALID, "checks": [
                {"group": "settings", "name": str(args.config or "settings"), "status": "fail", "detail": line.strip()}
                for line in str(exc).splitlines()[1:] or [str(exc)]
            ]}, indent=2))
        else:
            print(f"FAIL  settings: {exc}", file=sys.stderr)
        return EXIT_INVALID
    source = str(args.config) if args.config else "embedded defaults and environment"
    checks = [Check("settings", source, "ok", "valid"), *run_checks(settings, network=not args.offline)]
    failed_groups = {c.group for c in checks if c.status == "fail"}
    code = 0
    if failed_groups - {"backends"}:
        code = EXIT_INVALID
    elif failed_groups:
        code = EXIT_BACKEND
    if args.format == "json":
        print(json.dumps({"ok": code == 0, "exit": code, "checks": [c.to_json() for c in checks]}, indent=2))
        return code
    for check in checks:
        label = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}[check.status]
        print(f"{label}  {check.group:<9} {check.name}: {check.detail}")
    verdict = {0: "configuration ok", EXIT_INVALID: "configuration refused",
               EXIT_BACKEND: "configuration valid, but a backend is unreachable"}[code]
    print(f"\n{verdict} (exit {code})")
    return code


def _cmd_docs(args: argparse.Namespace) -> int:
    from broker.config import Settings
    from broker.settings_doc import render_configuration_doc

    sys.stdout.write(render_configuration_doc(Settings))
    return 0


def register(subparsers: Any) -> None:
    """Add ``config check|docs`` to the ``nhi-broker`` subcommands."""
    config = subparsers.add_parser("config", help="check a configuration; print the configuration reference",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = config.add_subparsers(dest="config_command", metavar="COMMAND", required=True)
    check = commands.add_parser(
        "check", help="validate settings, policies, keys and backends without starting (exit 0/1/3)"
    )
    check.add_argument("--config", type=Path, help="TOML settings file (default: $NHI_BROKER_CONFIG)")
    check.add_argument("--data-dir", type=Path, help="state directory (default: ./.nhi-broker)")
    check.add_argument("--policies", type=Path, help="policy directory (default: ./policies)")
    check.add_argument("--offline", action="store_true", help="skip the reachability of backends")
    check.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    check.set_defaults(func=_cmd_check)
    docs = commands.add_parser("docs", help="print docs/configuration.md (every setting) to stdout")
    docs.set_defaults(func=_cmd_docs)
