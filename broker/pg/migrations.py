"""The broker's PostgreSQL schema, in numbered migrations recorded in ``schema_version``.

``nhi-broker db upgrade [--url URL] [--grant ROLE]`` applies the missing ones in order, each in its
own transaction, under an advisory lock (two operators upgrading at once apply each step once).
A broker never changes the schema itself: at start it checks the recorded version and refuses to
run on an older one, naming the command (:func:`require_schema`).

Append-only is enforced by the database, twice: triggers refuse ``UPDATE``, ``DELETE`` and
``TRUNCATE`` on ledger entries and checkpoints for every role (the table owner and superusers
included, unless they drop the trigger, which is itself visible DDL), and privileges: ``UPDATE``,
``DELETE`` and ``TRUNCATE`` are revoked from ``PUBLIC``, and ``--grant ROLE`` gives the broker's own
role only what it needs (``SELECT``/``INSERT`` on entries, ``UPDATE`` on the one sequencer row).
Run brokers as that role, not as the owner: an owner can always re-grant itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from broker.errors import ConfigError

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "Migration", "SchemaOutdated", "current_version", "require_schema",
           "upgrade"]

_LOCK_KEY = 0x6E68_6962  # "nhib": serialises concurrent `db upgrade` runs


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema step: its number, what it does, its SQL, and the privileges the broker role needs."""

    version: int
    description: str
    sql: str
    grants: tuple[tuple[str, str], ...]  # (privileges, table)


_LEDGER = """
CREATE TABLE ledger_sequencer (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    next_idx  bigint  NOT NULL CHECK (next_idx >= 0)
);
INSERT INTO ledger_sequencer (singleton, next_idx) VALUES (true, 0);

CREATE TABLE ledger_entries (
    idx       bigint PRIMARY KEY CHECK (idx >= 0),
    leaf      bytea  NOT NULL,
    leaf_hash bytea  NOT NULL CHECK (length(leaf_hash) = 32),
    CONSTRAINT ledger_entries_leaf_hash_key UNIQUE (leaf_hash)
);

CREATE TABLE ledger_checkpoints (
    size bigint PRIMARY KEY CHECK (size >= 0),
    root bytea  NOT NULL CHECK (length(root) = 32),
    note text   NOT NULL
);

CREATE TABLE ledger_cosignatures (
    size bigint NOT NULL REFERENCES ledger_checkpoints (size),
    name text   NOT NULL,
    line text   NOT NULL,
    PRIMARY KEY (size, name)
);

CREATE FUNCTION ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger table % is append-only (% refused)', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'integrity_constraint_violation';
END
$$;

CREATE FUNCTION ledger_sequencer_forward() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'UPDATE' OR NEW.next_idx < OLD.next_idx OR NEW.singleton IS DISTINCT FROM OLD.singleton THEN
        RAISE EXCEPTION 'the ledger sequencer only moves forward (% refused)', TG_OP
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER ledger_entries_no_truncate BEFORE TRUNCATE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER ledger_checkpoints_append_only BEFORE UPDATE OR DELETE ON ledger_checkpoints
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER ledger_checkpoints_no_truncate BEFORE TRUNCATE ON ledger_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER ledger_cosignatures_no_delete BEFORE DELETE ON ledger_cosignatures
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER ledger_cosignatures_no_truncate BEFORE TRUNCATE ON ledger_cosignatures
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER ledger_sequencer_forward BEFORE UPDATE OR DELETE ON ledger_sequencer
    FOR EACH ROW EXECUTE FUNCTION ledger_sequencer_forward();
CREATE TRIGGER ledger_sequencer_no_truncate BEFORE TRUNCATE ON ledger_sequencer
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();

REVOKE UPDATE, DELETE, TRUNCATE ON ledger_entries, ledger_checkpoints FROM PUBLIC;
REVOKE DELETE, TRUNCATE ON ledger_sequencer, ledger_cosignatures FROM PUBLIC;
"""

_LEASES = """
CREATE TABLE vault_leases (
    task_id        text             PRIMARY KEY,
    workload       text             NOT NULL,
    spiffe_id      text             NOT NULL,
    kind           text             NOT NULL,
    ref_type       text             NOT NULL,
    ref            text             NOT NULL,
    issued_at      double precision NOT NULL,
    expires_at     double precision NOT NULL,
    release_sha256 text             NOT NULL UNIQUE,
    leaf_hash      text,
    state          text             NOT NULL CHECK (state IN ('pending', 'live', 'revoking', 'revoked')),
    reason         text,
    revoked_at     double precision
);
CREATE INDEX vault_leases_due ON vault_leases (state, expires_at);
CREATE INDEX vault_leases_workload ON vault_leases (workload, state);
CREATE TRIGGER vault_leases_no_delete BEFORE DELETE ON vault_leases
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER vault_leases_no_truncate BEFORE TRUNCATE ON vault_leases
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();
REVOKE DELETE, TRUNCATE ON vault_leases FROM PUBLIC;
"""

_TILES = """
CREATE TABLE ledger_tile_roots (
    idx  bigint PRIMARY KEY CHECK (idx >= 0),
    root bytea  NOT NULL CHECK (length(root) = 32)
);
CREATE TRIGGER ledger_tile_roots_append_only BEFORE UPDATE OR DELETE ON ledger_tile_roots
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER ledger_tile_roots_no_truncate BEFORE TRUNCATE ON ledger_tile_roots
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();
REVOKE UPDATE, DELETE, TRUNCATE ON ledger_tile_roots FROM PUBLIC;
"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "ledger: sequencer, append-only entries, checkpoints, cosignatures",
        _LEDGER,
        (
            ("SELECT, INSERT", "ledger_entries"),
            ("SELECT, INSERT", "ledger_checkpoints"),
            ("SELECT, INSERT, UPDATE", "ledger_cosignatures"),
            ("SELECT, UPDATE", "ledger_sequencer"),
        ),
    ),
    Migration(
        2,
        "vault lease book shared by every replica (rows are never deleted)",
        _LEASES,
        (("SELECT, INSERT, UPDATE", "vault_leases"),),
    ),
    Migration(
        3,
        "ledger: roots of complete 256-leaf tiles, so a replica starts without reading every leaf hash",
        _TILES,
        (("SELECT, INSERT", "ledger_tile_roots"),),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


class SchemaOutdated(ConfigError):
    """The database's schema is older than this broker needs; the message names the command."""


def current_version(conn: psycopg.Connection[tuple[object, ...]]) -> int:
    """The highest applied migration, 0 on a database the broker never upgraded."""
    row = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return 0
    found = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
    return int(found[0]) if found is not None else 0  # type: ignore[call-overload]


def require_schema(conn: psycopg.Connection[tuple[object, ...]], url_for_message: str) -> int:
    """The schema version, or :class:`SchemaOutdated` if it is older than :data:`SCHEMA_VERSION`.

    A newer schema is accepted: migrations only add, so a broker one release behind keeps working
    while a rolling upgrade replaces it.
    """
    version = current_version(conn)
    if version < SCHEMA_VERSION:
        raise SchemaOutdated(
            f"the PostgreSQL schema is at version {version}, this broker needs {SCHEMA_VERSION}: "
            f"run `nhi-broker db upgrade --url {url_for_message}` (as the schema owner) and start again"
        )
    return version


def upgrade(conn: psycopg.Connection[tuple[object, ...]], grant_to: str | None = None) -> list[Migration]:
    """Apply every missing migration in order (each in its own transaction); the ones applied.

    ``grant_to`` names the role brokers connect as; it gets exactly the privileges of every
    migration (applied now or before), which is idempotent.
    """
    applied: list[Migration] = []
    conn.autocommit = False
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                " version integer PRIMARY KEY, description text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
        for migration in MIGRATIONS:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                if current_version(conn) >= migration.version:
                    continue
                conn.execute(migration.sql.encode())  # several statements: the simple query protocol
                conn.execute("INSERT INTO schema_version (version, description) VALUES (%s, %s)",
                             (migration.version, migration.description))
                applied.append(migration)
        if grant_to is not None:
            with conn.transaction():
                conn.execute(sql.SQL("GRANT SELECT ON schema_version TO {}").format(sql.Identifier(grant_to)))
                for migration in MIGRATIONS:
                    for privileges, table in migration.grants:
                        conn.execute(sql.SQL("GRANT {} ON {} TO {}").format(
                            sql.SQL(privileges), sql.Identifier(table), sql.Identifier(grant_to)))
    finally:
        conn.autocommit = True
    return applied
