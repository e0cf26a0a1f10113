"""Builds the Vault issuer from settings (used by ``broker.runtime``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from broker.clock import Clock

from .identity import VaultIdentity
from .issuer import VaultIssuer
from .leases import LeaseBook
from .minter import VaultMinter
from .settings import VaultSettings

__all__ = ["open_vault_issuer"]


def open_vault_issuer(settings: VaultSettings, data_dir: Path, ledger: Any, clock: Clock) -> VaultIssuer:
    """A :class:`VaultIssuer` with its lease book under ``data_dir``, sweeping in the background.

    Nothing here talks to Vault: the broker starts while Vault is down and fails closed per request.
    """
    identity = VaultIdentity(settings, clock)
    issuer = VaultIssuer(VaultMinter(identity), LeaseBook(data_dir / "vault-leases.sqlite3"), ledger, clock)
    issuer.start_sweeper(settings.sweep_interval)
    return issuer
