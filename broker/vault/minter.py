"""Mint and revoke Vault secrets for one task: dynamic DB users, child tokens, wrapped KV secrets.

Every call goes through :func:`~broker.vault.errors.vault_errors`; every TTL is capped by the rule:

- ``vault-db``: ``<database>/creds/<role>``; a lease longer than the rule's TTL is shortened with a
  renewal to exactly that TTL, and revoked (refused) if Vault will not shorten it;
- ``vault-token``: ``auth/token/create/<token role>`` with exactly the rule's policies, ``ttl`` and
  ``explicit_max_ttl`` = the rule's TTL, ``num_uses`` from the rule, not renewable, no default policy;
- ``vault-wrapped``: a KV v2 read with ``X-Vault-Wrap-TTL`` = min(rule TTL, 60 s); the broker sees the
  wrapping token only, never the secret.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import hvac.exceptions as hvac_errors

from .errors import VaultRefused, vault_errors
from .identity import VaultIdentity
from .kinds import MAX_WRAP_TTL, VaultKind

__all__ = ["MintedSecret", "VaultMinter"]

log = logging.getLogger("nhi_broker.vault")

RefType = Literal["lease", "accessor"]


@dataclass(frozen=True)
class MintedSecret:
    """A secret Vault issued. ``ref`` is the lease id or token accessor that revokes it (not a secret);
    ``secret`` is what the client receives (the RFC 8693 ``access_token``) and ``extra`` the other
    response fields."""

    kind: VaultKind
    ref_type: RefType
    ref: str
    ttl: int
    secret: str = field(repr=False)
    extra: dict[str, Any] = field(default_factory=dict)


class VaultMinter:
    """Issues and revokes task secrets with the broker's :class:`VaultIdentity`."""

    def __init__(self, identity: VaultIdentity) -> None:
        self.identity = identity
        self.settings = identity.settings

    def mint(self, kind: VaultKind, max_ttl: int, meta: dict[str, str] | None = None) -> MintedSecret:
        """Issue ``kind`` living at most ``max_ttl`` seconds; raises VaultUnavailable / VaultRefused."""
        with vault_errors(kind.describe):
            if kind.family == "vault-db":
                return self._db(kind, max_ttl)
            if kind.family == "vault-token":
                return self._token(kind, max_ttl, meta or {})
            return self._wrapped(kind, max_ttl)

    def _db(self, kind: VaultKind, max_ttl: int) -> MintedSecret:
        client = self.identity.client()
        mount = self.settings.database_mount
        resp = client.secrets.database.generate_credentials(name=kind.target, mount_point=mount)
        lease_id, ttl = resp["lease_id"], int(resp["lease_duration"])
        if ttl > max_ttl:
            # The role's default TTL is longer than the rule allows: shorten this lease to the rule's TTL.
            try:
                renewed = client.adapter.put(f"/v1/sys/leases/renew/{lease_id}", json={"increment": max_ttl})
                ttl = int(renewed["lease_duration"])
            except BaseException:
                self._revoke_quietly(client, "lease", lease_id)
                raise
            if ttl > max_ttl:
                self._revoke_quietly(client, "lease", lease_id)
                raise VaultRefused(f"Vault kept {kind.describe} above the rule's TTL of {max_ttl}s")
        data = resp["data"]
        return MintedSecret(
            kind, "lease", lease_id, ttl, secret=data["password"],
            extra={"username": data["username"], "database_role": kind.target},
        )

    def _token(self, kind: VaultKind, max_ttl: int, meta: dict[str, str]) -> MintedSecret:
        client = self.identity.client()
        resp = client.auth.token.create(
            role_name=self.settings.token_role, policies=list(kind.policies), meta=meta,
            no_default_policy=True, renewable=False, ttl=f"{max_ttl}s", explicit_max_ttl=f"{max_ttl}s",
            num_uses=kind.uses, display_name="nhi-task",
        )
        auth = resp["auth"]
        ttl = int(auth["lease_duration"])
        granted = sorted(p for p in auth.get("token_policies") or auth.get("policies") or [] if p != "default")
        if ttl > max_ttl or granted != sorted(kind.policies):
            self._revoke_quietly(client, "accessor", auth["accessor"])
            raise VaultRefused(f"Vault issued {kind.describe} with other policies or a longer TTL than the rule")
        return MintedSecret(
            kind, "accessor", auth["accessor"], ttl, secret=auth["client_token"],
            extra={"policies": list(kind.policies), "num_uses": kind.uses},
        )

    def _wrapped(self, kind: VaultKind, max_ttl: int) -> MintedSecret:
        client = self.identity.client()
        wrap_ttl = min(max_ttl, MAX_WRAP_TTL)
        path = kind.target.removeprefix("kv/")
        resp = client.read(f"{self.settings.kv_mount}/data/{path}", wrap_ttl=f"{wrap_ttl}s")
        wrap = (resp or {}).get("wrap_info") if isinstance(resp, dict) else None
        if not wrap:
            raise VaultRefused(f"Vault did not wrap {kind.describe} (no such secret?)")
        return MintedSecret(
            kind, "accessor", wrap["accessor"], int(wrap["ttl"]), secret=wrap["token"],
            extra={"wrap_ttl": int(wrap["ttl"]), "creation_path": wrap["creation_path"],
                   "unwrap": "POST /v1/sys/wrapping/unwrap on the Vault server, with this token"},
        )

    def revoke(self, ref_type: RefType, ref: str, what: str) -> None:
        """Revoke a lease or a token by accessor. Idempotent: one Vault no longer knows is done."""
        with vault_errors(f"revocation of {what}"):
            self._revoke(self.identity.client(), ref_type, ref)

    @classmethod
    def _revoke_quietly(cls, client: Any, ref_type: RefType, ref: str) -> None:
        # Clean-up on a path that already fails: the original error is the one to report.
        try:
            cls._revoke(client, ref_type, ref)
        except Exception as exc:
            log.error("could not revoke a refused %s: %s", ref_type, type(exc).__name__)

    @staticmethod
    def _revoke(client: Any, ref_type: RefType, ref: str) -> None:
        try:
            if ref_type == "lease":
                client.adapter.put(f"/v1/sys/leases/revoke/{ref}")
            else:
                client.adapter.post("/v1/auth/token/revoke-accessor", json={"accessor": ref})
        except hvac_errors.InvalidRequest:
            # Vault answers 400 for a token or lease it no longer knows: already expired and reaped.
            return
