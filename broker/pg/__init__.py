"""PostgreSQL, the shared engine replicas agree on: connections, errors and versioned migrations.

Entry points:
- :func:`connect` — a psycopg 3 connection with ``synchronous_commit=on`` set explicitly, so a
  returned ``COMMIT`` is durable on the server before the broker acknowledges anything.
- :func:`upgrade` / :func:`require_schema` — the versioned schema (``schema_version`` table) that
  ``nhi-broker db upgrade`` applies and every broker checks at start.
- :func:`describe` — the text of a psycopg error that is safe to show (SQLSTATE or class name;
  never the URL, which may carry a password, nor the SQL).

Modules: ``connection`` (connect, error texts), ``migrations`` (schema versions).
"""

from broker.pg.connection import connect, describe, is_postgres_url, redact
from broker.pg.migrations import SCHEMA_VERSION, SchemaOutdated, current_version, require_schema, upgrade

__all__ = [
    "SCHEMA_VERSION",
    "SchemaOutdated",
    "connect",
    "current_version",
    "describe",
    "is_postgres_url",
    "redact",
    "require_schema",
    "upgrade",
]
