"""Mint and revoke Vault secrets for one task: dynamic DB users, child tokens, wrapped KV secrets.

Every call goes through :func:`~broker.vault.errors.vault_errors`; every TTL is capped by the rule:

- ``vault-db``: ``<database>/creds/<role>``; a lease longer than the rule's TTL is shortened with a
  renewal to exactly that TTL, and revoked (refused) if Vault will not shorten it. A row-scoped kind
  (``rows=<key>``) reads ``<database>/creds/scoped-<role>-<digest>`` instead: a Vault role the broker
  writes from ``<role>`` whose creation statements also record the user's scope in
  ``nhi.row_scope``, which the database's row-level security policies consult (docs/vault.md);
- ``vault-token``: ``auth/token/create/<token role>`` with exactly the rule's policies, ``ttl`` and
  ``explicit_max_ttl`` = the rule's TTL, ``num_uses`` from the rule, not renewable, no default policy;
- ``vault-wrapped``: a KV v2 read with ``X-Vault-Wrap-TTL`` = min(rule TTL, 60 s); the broker sees the
  wrapping token only, never the secret.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import hvac.exceptions as hvac_errors

from broker.intent import CONTEXT_KEY_RE

from .errors import VaultRefused, vault_errors
from .identity import VaultIdentity
from .kinds import MAX_WRAP_TTL, SCOPED_ROLE_PREFIX, VaultKind

__all__ = ["SCOPE_TABLE", "MintedSecret", "RowScope", "VaultMinter", "scoped_role_name"]

log = logging.getLogger("nhi_broker.vault")

RefType = Literal["lease", "accessor"]

#: The table the creation statements of a scoped role fill: ``(role_name, scope_key, scope_value)``.
SCOPE_TABLE = "nhi.row_scope"
# A scope value goes into a SQL string literal: the resource-segment grammar without '.', so no quote,
# backslash or separator can reach the statement (checked here again, whatever the caller checked).
_SCOPE_VALUE = re.compile(r"[A-Za-z0-9_~:@-][A-Za-z0-9_.~:@-]{0,127}")
# How long this process trusts that a scoped role it wrote is still in Vault as written.
_SCOPED_ROLE_FRESH = 60.0


@dataclass(frozen=True, slots=True)
class RowScope:
    """The rows a database user may see: ``nhi.row_scope`` gets ``(user, key, value)``."""

    key: str
    value: str

    def __post_init__(self) -> None:
        if CONTEXT_KEY_RE.fullmatch(self.key) is None:
            raise ValueError(f"row scope key {self.key!r} is not a context key")
        if _SCOPE_VALUE.fullmatch(self.value) is None or ".." in self.value:
            raise ValueError(f"row scope {self.key!r} needs a plain identifier value")


def scoped_role_name(base_role: str, scope: RowScope) -> str:
    """The Vault role of ``base_role``'s users confined to ``scope``: ``scoped-<base>-<24 hex digest>``."""
    digest = hashlib.sha256(f"{base_role}\0{scope.key}\0{scope.value}".encode()).hexdigest()[:24]
    return f"{SCOPED_ROLE_PREFIX}{base_role}-{digest}"


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
        # Scoped role -> monotonic time this process wrote it (single dict operations: no lock needed).
        self._scoped_roles: dict[str, float] = {}

    def mint(
        self, kind: VaultKind, max_ttl: int, meta: dict[str, str] | None = None, rows: RowScope | None = None
    ) -> MintedSecret:
        """Issue ``kind`` living at most ``max_ttl`` seconds; raises VaultUnavailable / VaultRefused.

        ``rows`` is required for (and only for) a row-scoped ``vault-db`` kind.
        """
        if (kind.rows is not None) != (rows is not None) or (rows is not None and rows.key != kind.rows):
            raise VaultRefused(f"{kind.describe} is row-scoped by {kind.rows!r}; the grant's scope does not match")
        with vault_errors(kind.describe):
            if kind.family == "vault-db":
                role = self._scoped_role(kind.target, rows) if rows is not None else kind.target
                return self._db(kind, role, max_ttl)
            if kind.family == "vault-token":
                return self._token(kind, max_ttl, meta or {})
            return self._wrapped(kind, max_ttl)

    def _scoped_role(self, base_role: str, scope: RowScope) -> str:
        """Write (or trust, for a minute) the Vault role whose users see only ``scope``'s rows."""
        name = scoped_role_name(base_role, scope)
        written = self._scoped_roles.get(name)
        if written is not None and time.monotonic() - written < _SCOPED_ROLE_FRESH:
            return name
        client = self.identity.client()
        mount = self.settings.database_mount
        try:
            base = client.secrets.database.read_role(name=base_role, mount_point=mount)["data"]
        except hvac_errors.InvalidPath:
            raise VaultRefused(f"Vault has no database role {base_role!r} to scope") from None
        # Literals, not parameters: Vault runs statements as text. RowScope admits no quote or backslash.
        record = (f"INSERT INTO {SCOPE_TABLE} (role_name, scope_key, scope_value) "  # noqa: S608
                  f"VALUES ('{{{{name}}}}', '{scope.key}', '{scope.value}');")
        forget = f"DELETE FROM {SCOPE_TABLE} WHERE role_name = '{{{{name}}}}';"  # noqa: S608
        client.secrets.database.create_role(
            name=name, db_name=base["db_name"], mount_point=mount,
            creation_statements=[*base["creation_statements"], record],
            revocation_statements=[forget, *(base.get("revocation_statements") or [])],
            default_ttl=base.get("default_ttl") or None, max_ttl=base.get("max_ttl") or None,
        )
        self._scoped_roles[name] = time.monotonic()
        return name

    def _db(self, kind: VaultKind, role: str, max_ttl: int) -> MintedSecret:
        client = self.identity.client()
        mount = self.settings.database_mount
        resp = client.secrets.database.generate_credentials(name=role, mount_point=mount)
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
