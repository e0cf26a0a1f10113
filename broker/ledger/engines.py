"""Which ledger storage a broker uses: ``ledger_url`` names the engine.

- ``sqlite:///relative/path`` or ``sqlite:////absolute/path`` (SQLAlchemy's spelling): one SQLite file,
  the embedded default (``<data_dir>/ledger.sqlite3`` when ``ledger_url`` is unset). Safe for the
  worker processes of one host, never for replicas on several hosts.
- ``postgresql://...`` (or ``postgres://...``): one log in PostgreSQL for every replica
  (:class:`~broker.ledger.postgres.PostgresLedgerStorage`); its schema comes from
  ``nhi-broker db upgrade``.
"""

from __future__ import annotations

from pathlib import Path

from broker.errors import ConfigError
from broker.ledger.sqlite import SqliteLedgerStorage
from broker.ledger.storage import LedgerStorage
from broker.pg.connection import is_postgres_url

__all__ = ["SQLITE_PREFIX", "check_ledger_url", "default_ledger_url", "is_shared", "open_ledger_storage",
           "sqlite_path"]

SQLITE_PREFIX = "sqlite:///"


def default_ledger_url(data_dir: Path) -> str:
    """The embedded default: ``ledger.sqlite3`` under the data dir."""
    return SQLITE_PREFIX + str(data_dir / "ledger.sqlite3")


def check_ledger_url(url: str) -> str:
    """``url`` if it names a supported engine; :class:`ValueError` saying what is accepted otherwise."""
    if url.startswith(SQLITE_PREFIX) and len(url) > len(SQLITE_PREFIX):
        return url
    if is_postgres_url(url):
        return url
    raise ValueError("ledger_url must be sqlite:///<path> or postgresql://<user>@<host>/<database>")


def sqlite_path(url: str) -> Path:
    """The file of a ``sqlite:///`` URL (``sqlite:////abs`` is absolute, ``sqlite:///rel`` relative)."""
    return Path(url[len(SQLITE_PREFIX):])


def is_shared(url: str) -> bool:
    """True when several hosts can append to this ledger (PostgreSQL)."""
    return is_postgres_url(url)


def open_ledger_storage(url: str) -> LedgerStorage:
    """Open the storage ``url`` names; :class:`ConfigError` for an unsupported URL.

    Raises :class:`~broker.errors.LedgerUnavailable` when the engine cannot be reached and
    :class:`~broker.pg.SchemaOutdated` when a PostgreSQL schema needs ``nhi-broker db upgrade``.
    """
    try:
        check_ledger_url(url)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if is_postgres_url(url):
        from broker.ledger.postgres import PostgresLedgerStorage  # psycopg only when configured

        return PostgresLedgerStorage(url)
    return SqliteLedgerStorage(sqlite_path(url))
