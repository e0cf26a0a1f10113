"""``nhi-broker dev vault``: run a local OpenBao configured for the sample policies, until Ctrl-C."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

__all__ = ["register"]


def _cmd_dev_vault(args: argparse.Namespace) -> int:
    from broker.errors import ConfigError
    from broker.vault.devserver import DevVault

    workdir: Path = args.dir.resolve()
    try:
        vault = DevVault.start(workdir, args.port, postgres_dsn=args.postgres)
    except Exception as exc:
        raise ConfigError(f"could not start the dev OpenBao: {type(exc).__name__}: {exc}") from None
    try:
        print(f"OpenBao dev server at {vault.addr} (in memory; everything is gone when it stops)")
        print(f"  root token file   {vault.root_token_file}   (for trials: export BAO_TOKEN=$(cat ...))")
        print(f"  database          {vault.addr}/v1/database/creds/orders-reader -> PostgreSQL nhi_vault_demo")
        env_file = workdir / "env"
        env_file.write_text("".join(f"export {name}={shlex.quote(value)}\n" for name, value in vault.env().items()))
        print("Run the broker with these settings (environment), or put them under [vault] in its TOML file:")
        for name, value in vault.env().items():
            print(f"  export {name}={shlex.quote(value)}")
        print(f"  (also in {env_file}: `. {env_file}` in the broker's shell)")
        print("Ctrl-C stops the server and revokes every database user it created.")
        sys.stdout.flush()

        def _stop(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, _stop)
        try:
            vault.process.wait()
        except KeyboardInterrupt:
            pass
    finally:
        vault.stop()
    return 0


def register(dev_sub: Any) -> None:
    """Add ``vault`` under ``nhi-broker dev``."""
    p = dev_sub.add_parser("vault", help="run a local OpenBao dev server for vault-* intents (until Ctrl-C)")
    p.add_argument("--port", type=int, default=8200, help="loopback port (default 8200; dev mode also binds port + 1)")
    p.add_argument("--dir", type=Path, default=Path(".nhi-broker/dev-vault"),
                   help="where the AppRole secret id and root token files go (default .nhi-broker/dev-vault)")
    p.add_argument("--postgres", default="host=127.0.0.1 port=5432 user=postgres dbname=test",
                   help="libpq connection string of a PostgreSQL superuser (default: local, user postgres)")
    p.set_defaults(func=_cmd_dev_vault)
