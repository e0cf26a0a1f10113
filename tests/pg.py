"""PostgreSQL for tests: the server on 127.0.0.1:5432 (trust auth), one database per test session.

Each test that needs a clean ledger gets its own schema in the session database (``search_path`` in
the URL), so tests never see each other's rows and the database ``test`` is never touched.
"""

from __future__ import annotations

import urllib.parse
import uuid

import psycopg

from broker.pg import connect, upgrade

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def create_database() -> str:
    """A new, uniquely named database; its URL."""
    name = f"nhi_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


def drop_database(url: str) -> None:
    """Drop the database of ``url`` (closing whatever is still connected)."""
    name = urllib.parse.urlsplit(url).path.lstrip("/")
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def with_schema(database_url: str, schema: str) -> str:
    """``database_url`` with ``search_path`` set to ``schema`` for every connection made from it."""
    options = urllib.parse.quote(f"-c search_path={schema}")
    return f"{database_url}?options={options}"


def new_schema(database_url: str, *, migrate: bool = True) -> str:
    """A fresh schema in the session database (migrated unless ``migrate`` is false); its URL."""
    schema = f"s_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    url = with_schema(database_url, schema)
    if migrate:
        with connect(url, autocommit=True) as conn:
            upgrade(conn)
    return url
