"""Agent-to-agent attenuation: a sub-agent narrows its parent's task token (RFC 8693 §2.1, §4.1).

A sub-agent presents its own workload identity as ``actor_token`` and the parent's task token (one
this broker signed) as ``subject_token``. :meth:`ParentTokens.verify` checks the parent token
(signature with the broker's own keys, ``typ``, issuer, lifetime, not revoked, not sender-bound) and
returns the verified :class:`~broker.models.Delegation`; :func:`check_within` then refuses, with
``invalid_target``, any child request that is not *within* the parent's grant:

- the same audience and the same action;
- the same resource or one below it (``customers/c-1/orders`` -> ``customers/c-1/orders/o-7``);
- the same context keys; every number at most the parent's; every string and boolean equal; a list
  a subset of the parent's list;
- not outliving the parent: the child's ``exp`` is capped at the parent's (:mod:`broker.mint.jwt`);
- not out-using the parent: issuing a child of an N-use parent consumes one of the parent's uses, and
  the child is good for one use (:mod:`broker.pipeline`), so handing on never multiplies uses.

The child is then decided by the policy on its own rules, as its own workload. Its token carries the
parent's ``sub`` (and ``sub_id``) and nests ``act``: ``{"sub": child, "act": <the parent's act>}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from broker.clock import Clock
from broker.errors import AttestationError, InvalidRequest, InvalidTarget
from broker.intent import is_valid_action, is_valid_resource
from broker.mint.keys import KeySet
from broker.models import Delegation, EndUser, Intent
from broker.state.introspection import InvalidTaskToken, verify_task_token
from broker.state.tokens import TokenState

__all__ = ["MAX_ACT_DEPTH", "PARENT_TOKEN_TYPES", "ParentTokens", "check_within", "user_of"]

#: Token types a parent task token may be presented as (RFC 8693 §3).
PARENT_TOKEN_TYPES = frozenset(
    {"urn:ietf:params:oauth:token-type:access_token", "urn:ietf:params:oauth:token-type:jwt"}
)
#: The longest actor chain a parent may already carry (a child adds one more level).
MAX_ACT_DEPTH = 4


def _act_depth(act: Any) -> int:
    depth = 0
    while act is not None:
        if not isinstance(act, dict) or not isinstance(act.get("sub"), str) or set(act) - {"sub", "act"}:
            raise AttestationError("the parent token's act claim is malformed")
        depth += 1
        if depth > MAX_ACT_DEPTH:
            raise InvalidRequest(f"the delegation chain is longer than {MAX_ACT_DEPTH} actors")
        act = act.get("act")
    return depth


def user_of(claims: Mapping[str, Any]) -> EndUser | None:
    """The verified end user a task token acts for (its RFC 9493 ``sub_id``), or ``None``."""
    sub_id = claims.get("sub_id")
    if sub_id is None:
        return None
    if (
        not isinstance(sub_id, dict)
        or sub_id.get("format") != "iss_sub"
        or not isinstance(sub_id.get("iss"), str)
        or sub_id.get("sub") != claims.get("sub")
    ):
        raise AttestationError("the parent token's sub_id is malformed")
    return EndUser(issuer=sub_id["iss"], subject=sub_id["sub"])


class ParentTokens:
    """Verifies parent task tokens presented by sub-agents: this broker's keys, live, not bound."""

    def __init__(self, keys: KeySet, issuer: str, tokens: TokenState, clock: Clock) -> None:
        self._keys = keys
        self._issuer = issuer
        self._tokens = tokens
        self._clock = clock

    @property
    def issuer(self) -> str:
        """The ``iss`` of the broker's own task tokens."""
        return self._issuer

    async def verify(self, subject_token: str, subject_token_type: str) -> tuple[Delegation, EndUser | None]:
        """The verified parent and the end user it acts for (if any), or an error.

        Raises :class:`~broker.errors.InvalidRequest` for a wrong token type and
        :class:`~broker.errors.AttestationError` (``invalid_grant``) for a token that is not a live,
        unbound task token of this broker.
        """
        # (1) A parent is presented as an access token or a JWT.
        if subject_token_type not in PARENT_TOKEN_TYPES:
            raise InvalidRequest(
                "a parent task token is presented as urn:ietf:params:oauth:token-type:access_token"
            )
        # (2) Signature with our keys, typ at+jwt, issuer, types and lifetime, in one call.
        try:
            claims = verify_task_token(subject_token, self._keys, self._issuer, self._clock.now())
        except InvalidTaskToken as exc:
            raise AttestationError(f"subject_token is not a valid task token of this broker ({exc})") from None
        # (3) Still live: not revoked, its workload not suspended, no scoped cut-off (a use of an N-use
        # parent is consumed only when the child is issued: consume_use).
        if not (await self._tokens.status(claims, consume_use=False)).active:
            raise AttestationError("the parent task token is no longer active")
        # (4) A sender-constrained token is usable only with its holder's key: a sub-agent has another.
        if "cnf" in claims:
            raise AttestationError("a DPoP-bound task token cannot be handed to a sub-agent")
        details = claims["authorization_details"]
        if not isinstance(details, list) or len(details) != 1 or not isinstance(details[0], dict):
            raise AttestationError("the parent token's authorization_details are malformed")
        granted = details[0]
        action, resource, context = granted.get("action"), granted.get("resource"), granted.get("context", {})
        if (
            not isinstance(action, str) or not isinstance(resource, str) or not isinstance(context, dict)
            or not is_valid_action(action) or not is_valid_resource(resource)
        ):
            raise AttestationError("the parent token's intent is malformed")
        act = claims.get("act")
        _act_depth(act)
        txn, aud, sub = claims.get("txn"), claims["aud"], claims["sub"]
        if not isinstance(txn, str) or not isinstance(aud, str) or not isinstance(sub, str):
            raise AttestationError("the parent token's txn, aud and sub must be strings")
        # The parent's own workload: the first actor of its chain, or its subject if it acted for itself.
        parent_spiffe = act["sub"] if isinstance(act, dict) else sub
        delegation = Delegation(
            subject=sub, act=act, parent_client_id=claims["client_id"], parent_spiffe_id=parent_spiffe,
            jti=claims["jti"], txn=txn, exp=int(claims["exp"]), audience=aud,
            intent=Intent(action=action, resource=resource, context=dict(context)),
            num_uses=claims.get("num_uses"), claims=dict(claims),
        )
        return delegation, user_of(claims)

    async def consume_use(self, parent: Delegation) -> None:
        """Consume one use of an N-use parent for the child about to be issued (the child carries it on).

        Raises :class:`~broker.errors.AttestationError` when the parent has no use left (or was
        revoked meanwhile); does nothing for a parent without ``num_uses``.
        """
        if parent.num_uses is None:
            return
        status = await self._tokens.status(parent.claims, consume_use=True)
        if not status.active:
            raise AttestationError(
                "the parent task token has no uses left" if status.reason == "uses exhausted"
                else "the parent task token is no longer active"
            )


def _within_value(key: str, child: Any, parent: Any) -> None:
    if isinstance(parent, bool) or isinstance(child, bool):
        if child is not parent:
            raise InvalidTarget(f"context.{key} must equal the parent's")
    elif isinstance(parent, int | float):
        if not isinstance(child, int | float) or not math.isfinite(child) or child > parent:
            raise InvalidTarget(f"context.{key} must be a number no greater than the parent's")
    elif isinstance(parent, list):
        if not isinstance(child, list) or any(item not in parent for item in child):
            raise InvalidTarget(f"context.{key} must be a subset of the parent's list")
    elif child != parent or type(child) is not type(parent):
        raise InvalidTarget(f"context.{key} must equal the parent's")


def check_within(parent: Delegation, audience: str, intent: Intent) -> None:
    """Raise :class:`~broker.errors.InvalidTarget` unless ``intent`` for ``audience`` is within the
    parent's grant (see the module docstring)."""
    granted = parent.intent
    if audience != parent.audience:
        raise InvalidTarget("audience must be the parent token's audience")
    if intent.action != granted.action:
        raise InvalidTarget("action must be the parent token's action")
    parent_segments = granted.resource.split("/")
    if intent.resource.split("/")[: len(parent_segments)] != parent_segments:
        raise InvalidTarget("resource must be the parent token's resource or one below it")
    if set(intent.context) != set(granted.context):
        raise InvalidTarget("context must name exactly the parent token's context keys")
    for key, value in granted.context.items():
        _within_value(key, intent.context[key], value)
