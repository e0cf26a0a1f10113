"""psycopg 3 connections for the broker, and the one safe way to describe their errors.

Every connection the broker opens sets ``synchronous_commit = on`` itself (a server or role default
of ``off`` or ``local`` would acknowledge a commit before it is on disk, or before a synchronous
standby has it) and checks that the setting took. Connect, statement and idle-in-transaction
timeouts are short, so a PostgreSQL that is down costs a caller a bounded wait and a 503, never a
hang, and a replica that disappears mid-batch releases the sequencer within seconds.
"""

from __future__ import annotations

import re

import psycopg

__all__ = ["connect", "describe", "is_postgres_url", "redact"]

_SCHEMES = ("postgresql://", "postgres://")
_CONNECT_TIMEOUT = 5  # seconds: libpq's minimum is 2
_STATEMENT_TIMEOUT_MS = 15_000
_IDLE_IN_TRANSACTION_MS = 10_000


def is_postgres_url(url: str) -> bool:
    """True for ``postgresql://`` and ``postgres://`` URLs (libpq's two spellings)."""
    return url.startswith(_SCHEMES)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


def describe(exc: BaseException) -> str:
    """A safe, stable text for a psycopg error: its SQLSTATE (``40P01``...) or its class name.

    psycopg messages can quote the server's host, the user name or a row's values; the SQLSTATE says
    what failed without any of that.
    """
    sqlstate = getattr(exc, "sqlstate", None)
    return f"{type(exc).__name__} {sqlstate}" if sqlstate else type(exc).__name__


def connect(url: str, *, autocommit: bool, application: str = "nhi-broker") -> psycopg.Connection[tuple[object, ...]]:
    """A new connection to ``url`` with durable commits; raises :class:`psycopg.Error` on failure.

    ``autocommit`` connections serve single-statement reads; writers run explicit transactions.
    TCP keepalives make a vanished server (host down, network cut) an error within seconds.
    """
    conn: psycopg.Connection[tuple[object, ...]] = psycopg.connect(
        url,
        autocommit=True,
        connect_timeout=_CONNECT_TIMEOUT,
        application_name=application,
        keepalives=1,
        keepalives_idle=5,
        keepalives_interval=2,
        keepalives_count=3,
    )
    try:
        conn.execute("SET synchronous_commit TO on")
        conn.execute(f"SET statement_timeout TO {_STATEMENT_TIMEOUT_MS}")
        # A replica that vanishes mid-transaction (host down, network cut: no TCP reset) must not hold
        # the ledger's sequencer row for long: the server ends such a session after this much idling.
        conn.execute(f"SET idle_in_transaction_session_timeout TO {_IDLE_IN_TRANSACTION_MS}")
        row = conn.execute("SHOW synchronous_commit").fetchone()
        if row is None or row[0] != "on":
            raise psycopg.OperationalError("synchronous_commit could not be set to on")
        conn.autocommit = autocommit
    except BaseException:
        conn.close()
        raise
    return conn
