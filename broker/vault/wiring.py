"""Builds the Vault issuer from settings (used by ``broker.runtime``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from broker.clock import Clock
from broker.telemetry import NO_SPANS, Spans

from .identity import VaultIdentity
from .issuer import SuspendedSince, VaultIssuer
from .leases import LeaseBook
from .minter import VaultMinter
from .settings import VaultSettings

__all__ = ["open_lease_book", "open_vault_issuer"]


def open_lease_book(data_dir: Path, shared_url: str | None, timeout: float = 10.0) -> LeaseBook:
    """The lease book: in PostgreSQL at ``shared_url`` (replicas), else a SQLite file under ``data_dir``."""
    if shared_url is not None:
        from .pg_leases import PostgresLeaseBook

        return PostgresLeaseBook(shared_url)
    return LeaseBook(data_dir / "vault-leases.sqlite3", timeout=timeout)


def open_vault_issuer(settings: VaultSettings, data_dir: Path, ledger: Any, clock: Clock,
                      shared_url: str | None = None, suspended_since: SuspendedSince | None = None, *,
                      spans: Spans = NO_SPANS) -> VaultIssuer:
    """A :class:`VaultIssuer` with its lease book, sweeping in the background.

    The book lives in PostgreSQL when ``shared_url`` names one (the ledger's database, so every
    replica shares it), else under ``data_dir``. ``suspended_since`` is the kill switch, read again
    once a lease is live (a workload suspended mid-request gets no credential). Nothing here talks to
    Vault: the broker starts while Vault is down and fails closed per request.
    """
    identity = VaultIdentity(settings, clock)
    # The lease book's SQLite busy timeout fits in its lane's deadline (VaultIssuer.book_lane).
    book = open_lease_book(data_dir, shared_url, timeout=settings.timeout)
    issuer = VaultIssuer(VaultMinter(identity), book, ledger, clock, suspended_since=suspended_since, spans=spans)
    issuer.start_sweeper(settings.sweep_interval)
    return issuer
