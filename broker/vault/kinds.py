"""Vault credential kinds: what a policy rule's ``kind`` column may name, and the token-type URNs.

A rule names its credential in one CSV field (Casbin sees it as an opaque string)::

    jwt                                   a broker task token (the default)
    vault-db:<role>[;rows=<context key>]  dynamic database user from <database mount>/creds/<role>;
                                          with ``rows=``, a user that PostgreSQL's row-level security
                                          confines to the rows of the intent's ``context[<key>]``
                                          (the rule's resource pattern must bind ``{<key>}``)
    vault-token:<policy>[+<policy>...][;uses=<n>]
                                          a child Vault token with exactly these Vault policies,
                                          the rule's TTL and at most <n> uses (default 1)
    vault-wrapped:kv/<path>               a KV v2 secret, response-wrapped (wrap TTL <= 60 s)

A client asks for the kind with ``requested_token_type``:

=====================  ==================================================
kind                   requested_token_type
=====================  ==================================================
``vault-db``           ``urn:nhi-broker:token-type:vault-db-creds``
``vault-token``        ``urn:nhi-broker:token-type:vault-token``
``vault-wrapped``      ``urn:nhi-broker:token-type:vault-wrapped``
=====================  ==================================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from broker.errors import InvalidTarget
from broker.intent import CONTEXT_KEY_RE

__all__ = [
    "MAX_TOKEN_USES",
    "MAX_WRAP_TTL",
    "SCOPED_ROLE_PREFIX",
    "TOKEN_TYPES",
    "VAULT_DB_CREDS",
    "VAULT_TOKEN",
    "VAULT_WRAPPED",
    "VaultKind",
    "check_requested_type",
    "parse_vault_kind",
]

VAULT_DB_CREDS = "urn:nhi-broker:token-type:vault-db-creds"
VAULT_TOKEN = "urn:nhi-broker:token-type:vault-token"
VAULT_WRAPPED = "urn:nhi-broker:token-type:vault-wrapped"
TOKEN_TYPES = {"vault-db": VAULT_DB_CREDS, "vault-token": VAULT_TOKEN, "vault-wrapped": VAULT_WRAPPED}
MAX_WRAP_TTL = 60
MAX_TOKEN_USES = 100
# Vault roles the broker writes for row-scoped users (one per base role and scope value).
SCOPED_ROLE_PREFIX = "scoped-"

# Vault role and policy names: no path separators, so a rule can never point outside its mount.
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_KV_PATH = re.compile(r"kv/[a-z0-9][a-z0-9_-]{0,63}(?:/[a-z0-9][a-z0-9_-]{0,63}){0,7}")
_USES = re.compile(r"[1-9][0-9]{0,2}")


@dataclass(frozen=True, slots=True)
class VaultKind:
    """A parsed Vault credential kind.

    ``family`` is ``vault-db``, ``vault-token`` or ``vault-wrapped``; ``target`` the database role,
    the ``+``-joined policies, or the KV path (``kv/...``); ``uses`` the token's ``num_uses``;
    ``rows`` the context key of a row-scoped database user (docs/vault.md, "Row-scoped users").
    """

    family: str
    target: str
    policies: tuple[str, ...] = ()
    uses: int = 0
    #: ``vault-db`` only: the intent context key whose value scopes the user's rows (``rows=<key>``).
    rows: str | None = None

    @property
    def token_type(self) -> str:
        """The ``requested_token_type`` / ``issued_token_type`` URN of this kind."""
        return TOKEN_TYPES[self.family]

    @property
    def describe(self) -> str:
        """Names the Vault object for errors and the ledger (never a secret)."""
        if self.family == "vault-db":
            return f"database role {self.target!r}"
        if self.family == "vault-token":
            return f"token policies {self.target!r}"
        return f"secret {self.target!r}"


def parse_vault_kind(text: str) -> VaultKind:
    """Parse a ``vault-*`` kind; raises :class:`ValueError` naming what is wrong."""
    family, colon, spec = text.partition(":")
    if family not in TOKEN_TYPES:
        raise ValueError(f"credential kind {text!r} is not jwt, vault-db:, vault-token: or vault-wrapped:")
    if not colon or not spec:
        raise ValueError(f"credential kind {family!r} needs a target after ':'")
    if family == "vault-db":
        role, semi, option = spec.partition(";")
        if _NAME.fullmatch(role) is None or role.startswith(SCOPED_ROLE_PREFIX):
            raise ValueError(
                f"vault-db role {role!r} must match [a-z0-9][a-z0-9_-]* (at most 64, not {SCOPED_ROLE_PREFIX}*)"
            )
        if not semi:
            return VaultKind(family, role)
        key, eq, value = option.partition("=")
        if key != "rows" or not eq or CONTEXT_KEY_RE.fullmatch(value) is None:
            raise ValueError(f"vault-db option {option!r} must be rows=<context key>")
        return VaultKind(family, role, rows=value)
    if family == "vault-token":
        names, semi, option = spec.partition(";")
        uses = 1
        if semi:
            key, eq, value = option.partition("=")
            if key != "uses" or not eq or _USES.fullmatch(value) is None or int(value) > MAX_TOKEN_USES:
                raise ValueError(f"vault-token option {option!r} must be uses=<1..{MAX_TOKEN_USES}>")
            uses = int(value)
        policies = tuple(names.split("+"))
        for name in policies:
            if _NAME.fullmatch(name) is None or name in ("root", "default"):
                raise ValueError(f"vault-token policy {name!r} must be a named policy (not root/default)")
        if len(set(policies)) != len(policies):
            raise ValueError("vault-token policies are repeated")
        return VaultKind(family, "+".join(policies), policies=policies, uses=uses)
    if _KV_PATH.fullmatch(spec) is None:
        raise ValueError(f"vault-wrapped target {spec!r} must be kv/<path> (lower-case segments)")
    return VaultKind(family, spec)


def check_requested_type(grant_kind: str, requested: str | None) -> None:
    """Refuse a ``requested_token_type`` that is not what the deciding rule issues.

    A Vault rule must be asked for by its URN (a client expecting a JWT never receives a password);
    a JWT rule cannot be asked for a Vault URN.
    """
    if grant_kind.startswith("vault-"):
        expected = parse_vault_kind(grant_kind).token_type
        if requested != expected:
            raise InvalidTarget(f"this intent is served as {expected}; set requested_token_type to it")
    elif requested in TOKEN_TYPES.values():
        raise InvalidTarget(f"this intent is served as a task token, not {requested}")
