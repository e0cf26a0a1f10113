"""Who may call the admin, introspection and revocation endpoints.

Credentials come from configuration and are stored as SHA-256 hashes only; a presented secret is
hashed and compared with every configured hash in constant time (:func:`hmac.compare_digest`), so
neither timing nor an early exit tells which credential was close.

Operator roles (admin API; ``Authorization: Bearer`` with either a configured secret, or an identity
token from an ``operator_issuers`` issuer such as the organisation's OIDC provider, mapped to a SPIFFE
ID by the issuer's template and matched against the operator's ``spiffe_id``)::

    admin      revoke by scope, suspend and resume workloads, and everything below
    approver   decide pending approvals of the groups it belongs to (``groups``) and read state
    auditor    read state only

Resource servers authenticate to ``/v1/introspect`` and ``/v1/revoke`` either with HTTP Basic client
credentials (RFC 6749 §2.3.1) or with their own workload identity token (``Authorization: Bearer``,
verified by the broker's attestor exactly like a subject token, single-use ``jti`` included), and see
only tokens for the audiences they are configured for.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Literal
from urllib.parse import unquote

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from broker.errors import InsufficientRole, InvalidClient, InvalidGrant, InvalidOperatorToken, InvalidRequest
from broker.models import WorkloadIdentity

__all__ = [
    "ROLE_PERMISSIONS",
    "AuthenticatedClient",
    "ClientAuthenticator",
    "IntrospectionClient",
    "Operator",
    "OperatorAuthenticator",
    "OperatorCredential",
    "Role",
    "hash_secret",
]

Role = Literal["admin", "approver", "auditor"]

#: What each role may do on the admin API.
ROLE_PERMISSIONS: dict[str, frozenset[str]] = {
    "admin": frozenset({"revoke", "suspend", "reload", "read"}),
    "approver": frozenset({"approve", "read"}),
    "auditor": frozenset({"read"}),
}

_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}")
# Hashes of secrets nobody should deploy: refused at load time.
_PLACEHOLDERS = frozenset(
    hashlib.sha256(word.encode()).hexdigest()
    for word in ("", "changeme", "change-me", "secret", "password", "admin", "test", "example")
)
_MAX_SECRET = 512
_DUMMY_HASH = "0" * 64


def hash_secret(secret: str) -> str:
    """The hex SHA-256 configuration stores for ``secret`` (``nhi-broker`` never stores the secret)."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _check_hash(value: str) -> str:
    if _HEX64.fullmatch(value) is None:
        raise ValueError("must be the lowercase hex SHA-256 of the secret")
    if value in _PLACEHOLDERS:
        raise ValueError("is the hash of a placeholder secret; generate a random one")
    return value


_SPIFFE_PATTERN = r"^spiffe://[a-z0-9._-]+(/[A-Za-z0-9._-]+)+$"


class OperatorCredential(BaseModel):
    """A configured operator: a name for the ledger, a role, and how it authenticates: the SHA-256 of
    its bearer secret, or the SPIFFE ID its identity token (from an ``operator_issuers`` issuer) proves."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="The operator's name, as the ledger records it.")
    role: Role = Field(description="admin (revoke, suspend, read), approver (decide its groups' approvals) or auditor.")
    token_sha256: str | None = Field(None, description="Hex SHA-256 of its bearer secret (never the secret).")
    spiffe_id: str | None = Field(
        None, pattern=_SPIFFE_PATTERN, description="Or: the SPIFFE ID its operator_issuers identity token proves."
    )
    #: Approver groups (``approvers`` of ``policies/approvals.toml``) this operator decides for.
    groups: tuple[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,63}$")], ...] = Field(
        (), description="Approver groups of policies/approvals.toml it decides for; an approver needs one."
    )

    @model_validator(mode="after")
    def _one_method(self) -> OperatorCredential:
        if (self.token_sha256 is None) == (self.spiffe_id is None):
            raise ValueError("an operator needs exactly one of token_sha256 or spiffe_id")
        return self

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if _NAME.fullmatch(value) is None:
            raise ValueError("operator name must be 1-128 characters of letters, digits and ._@:-")
        return value

    @field_validator("token_sha256")
    @classmethod
    def _hash(cls, value: str | None) -> str | None:
        return None if value is None else _check_hash(value)


class IntrospectionClient(BaseModel):
    """A resource server allowed to introspect and revoke tokens for ``audiences`` (``*`` = any).

    It authenticates with a client secret (``secret_sha256``) or with its workload identity
    (``spiffe_id``): exactly one of the two.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    client_id: str = Field(description="The resource server's client id (HTTP Basic user name).")
    secret_sha256: str | None = Field(None, description="Hex SHA-256 of its client secret.")
    spiffe_id: str | None = Field(
        None, pattern=_SPIFFE_PATTERN, description="Or: the SPIFFE ID its workload identity token proves."
    )
    audiences: tuple[str, ...] = Field(min_length=1, description="Audiences whose tokens it may see (`*` = any).")

    @model_validator(mode="after")
    def _one_method(self) -> IntrospectionClient:
        if (self.secret_sha256 is None) == (self.spiffe_id is None):
            raise ValueError("an introspection client needs exactly one of secret_sha256 or spiffe_id")
        return self

    @field_validator("client_id")
    @classmethod
    def _client_id(cls, value: str) -> str:
        if _NAME.fullmatch(value) is None:
            raise ValueError("client_id must be 1-128 characters of letters, digits and ._@:-")
        return value

    @field_validator("secret_sha256")
    @classmethod
    def _hash(cls, value: str | None) -> str | None:
        return None if value is None else _check_hash(value)


@dataclass(frozen=True, slots=True)
class Operator:
    """An authenticated operator; built only by :class:`OperatorAuthenticator`."""

    name: str
    role: str
    method: str
    groups: tuple[str, ...] = ()

    def require(self, permission: str) -> Operator:
        """Return self if the role grants ``permission``; raise :class:`InsufficientRole` otherwise."""
        if permission not in ROLE_PERMISSIONS.get(self.role, frozenset()):
            raise InsufficientRole(f"role {self.role!r} may not {permission}")
        return self

    def to_json(self) -> dict[str, str]:
        """The actor as the ledger records it."""
        return {"kind": "operator", "name": self.name, "role": self.role, "auth": self.method}


@dataclass(frozen=True, slots=True)
class AuthenticatedClient:
    """An authenticated resource server; built only by :class:`ClientAuthenticator`."""

    client_id: str
    audiences: tuple[str, ...]
    method: str = "client_secret_basic"

    def may_see(self, audience: object) -> bool:
        """True if tokens for ``audience`` (a string or a list of them) are this client's business."""
        wanted = audience if isinstance(audience, list) else [audience]
        return "*" in self.audiences or any(a in self.audiences for a in wanted)

    def to_json(self) -> dict[str, str]:
        """The actor as the ledger records it."""
        return {"kind": "client", "client_id": self.client_id, "auth": self.method}


def _match(presented: str, hashes: list[str]) -> int | None:
    digest = hash_secret(presented)
    found = None
    for i, candidate in enumerate(hashes):
        # No early exit: every configured hash is compared.
        if hmac.compare_digest(digest, candidate) and found is None:
            found = i
    return found


_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


class OperatorAuthenticator:
    """Authenticates ``Authorization: Bearer`` against the configured operators: a secret, or an
    identity token verified by ``attest`` (an attestor over ``operator_issuers`` only)."""

    def __init__(
        self,
        credentials: list[OperatorCredential] | tuple[OperatorCredential, ...],
        attest: Callable[[str], Awaitable[WorkloadIdentity]] | None = None,
    ) -> None:
        self._secrets = [c for c in credentials if c.token_sha256 is not None]
        self._identities = {c.spiffe_id: c for c in credentials if c.spiffe_id is not None}
        self._attest = attest

    async def authenticate(self, authorization: str | None) -> Operator:
        """The operator whose credential was presented, or :class:`InvalidOperatorToken`."""
        if not self._secrets and not self._identities:
            raise InvalidOperatorToken("no operator credentials are configured; the admin API is closed")
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise InvalidOperatorToken("an operator bearer token is required")
        if self._attest is not None and self._identities and _JWS.fullmatch(token):
            return await self._by_identity(token)
        if len(token) > _MAX_SECRET:
            raise InvalidOperatorToken("the operator token is not valid")
        index = _match(token, [c.token_sha256 for c in self._secrets if c.token_sha256 is not None])
        if index is None:
            raise InvalidOperatorToken("the operator token is not valid")
        cred = self._secrets[index]
        return Operator(name=cred.name, role=cred.role, method="bearer", groups=cred.groups)

    async def _by_identity(self, token: str) -> Operator:
        assert self._attest is not None
        try:
            identity = await self._attest(token)
        except (InvalidGrant, InvalidRequest) as exc:
            raise InvalidOperatorToken(f"operator identity not accepted: {exc.description}") from None
        cred = self._identities.get(identity.spiffe_id)
        if cred is None:
            raise InvalidOperatorToken("this identity is not a configured operator")
        return Operator(name=cred.name, role=cred.role, method=f"identity:{identity.method}", groups=cred.groups)


class ClientAuthenticator:
    """Authenticates resource servers: HTTP Basic client credentials (RFC 6749 §2.3.1), or a workload
    identity token verified by ``attest`` (the broker's attestor)."""

    def __init__(
        self,
        clients: list[IntrospectionClient] | tuple[IntrospectionClient, ...],
        attest: Callable[[str], Awaitable[WorkloadIdentity]] | None = None,
    ) -> None:
        self._clients = {c.client_id: c for c in clients if c.secret_sha256 is not None}
        self._workloads = {c.spiffe_id: c for c in clients if c.spiffe_id is not None}
        self._attest = attest

    async def authenticate(self, authorization: str | None) -> AuthenticatedClient:
        """The client whose credentials were presented, or :class:`InvalidClient`.

        May raise :class:`~broker.errors.TemporarilyUnavailable` when an identity cannot be checked.
        """
        scheme, _, encoded = (authorization or "").partition(" ")
        if scheme.lower() == "bearer" and self._attest is not None and self._workloads:
            return await self._by_identity(encoded.strip())
        if scheme.lower() != "basic" or not encoded.strip():
            raise InvalidClient("client authentication (HTTP Basic or a workload identity token) is required")
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            raise InvalidClient("the Basic credentials are not valid base64 UTF-8") from None
        raw_id, sep, raw_secret = decoded.partition(":")
        if not sep or len(decoded) > 2 * _MAX_SECRET:
            raise InvalidClient("client authentication failed")
        # RFC 6749 §2.3.1: client id and secret are form-urlencoded before Basic encoding.
        client_id, secret = unquote(raw_id), unquote(raw_secret)
        client = self._clients.get(client_id)
        # Hash and compare even for an unknown id, so timing does not tell which ids exist.
        expected = client.secret_sha256 if client is not None and client.secret_sha256 else _DUMMY_HASH
        if not hmac.compare_digest(hash_secret(secret), expected) or client is None:
            raise InvalidClient("client authentication failed")
        return AuthenticatedClient(client_id=client.client_id, audiences=client.audiences)

    async def _by_identity(self, token: str) -> AuthenticatedClient:
        assert self._attest is not None
        try:
            identity = await self._attest(token)
        except (InvalidGrant, InvalidRequest) as exc:
            raise InvalidClient(f"workload identity not accepted: {exc.description}") from None
        client = self._workloads.get(identity.spiffe_id)
        if client is None:
            raise InvalidClient("this workload is not a configured introspection client")
        return AuthenticatedClient(client_id=client.client_id, audiences=client.audiences, method="workload_identity")
