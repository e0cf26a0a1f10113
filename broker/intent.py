"""Parse and validate RFC 9396 ``authorization_details`` carrying one intent.

Actions and resources are checked with ``re.fullmatch`` against narrow grammars before any policy
sees them: no ``.``/``..`` segments, no empty segments, no trailing newline, bounded lengths. This is
what keeps Casbin's loose built-in matchers out of the picture.
"""

from __future__ import annotations

import math
import re
from typing import Any

from broker.errors import InvalidAuthorizationDetails
from broker.models import Intent
from broker.strict_json import StrictJSONError, loads_strict

__all__ = [
    "ACTION_RE",
    "CONTEXT_KEY_RE",
    "RESOURCE_SEGMENT_RE",
    "is_valid_action",
    "is_valid_resource",
    "parse_authorization_details",
    "parse_intent",
]

ACTION_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}(?:\.[a-z][a-z0-9_-]{0,31}){0,3}")
RESOURCE_SEGMENT_RE = re.compile(r"[A-Za-z0-9_~:@-](?:[A-Za-z0-9_.~:@-]{0,126}[A-Za-z0-9_~:@-])?")
CONTEXT_KEY_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")

MAX_DETAILS_BYTES = 8192
MAX_RESOURCE_LEN = 512
MAX_RESOURCE_SEGMENTS = 16
MAX_CONTEXT_KEYS = 32
MAX_CONTEXT_STRING = 256
MAX_CONTEXT_LIST = 32
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def is_valid_action(action: object) -> bool:
    """True when ``action`` is a dotted lower-case name such as ``payments.refund``."""
    return isinstance(action, str) and ACTION_RE.fullmatch(action) is not None


def is_valid_resource(resource: object) -> bool:
    """True when ``resource`` is ``/``-separated safe segments such as ``orders/ord-1``."""
    if not isinstance(resource, str) or not resource or len(resource) > MAX_RESOURCE_LEN:
        return False
    segments = resource.split("/")
    if len(segments) > MAX_RESOURCE_SEGMENTS:
        return False
    return all(RESOURCE_SEGMENT_RE.fullmatch(s) is not None for s in segments)


def _check_scalar(key: str, value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if abs(value) > 2**53:
            raise InvalidAuthorizationDetails(f"context.{key} is outside the exact integer range")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidAuthorizationDetails(f"context.{key} must be a finite number")
        return value
    if isinstance(value, str):
        if len(value) > MAX_CONTEXT_STRING or _CONTROL.search(value):
            raise InvalidAuthorizationDetails(
                f"context.{key} must be at most {MAX_CONTEXT_STRING} characters without control characters"
            )
        return value
    raise InvalidAuthorizationDetails(
        f"context.{key} must be a string, number, boolean or a list of strings"
    )


def _check_context(context: Any) -> dict[str, Any]:
    if not isinstance(context, dict):
        raise InvalidAuthorizationDetails("intent context must be a JSON object")
    if len(context) > MAX_CONTEXT_KEYS:
        raise InvalidAuthorizationDetails(f"intent context has more than {MAX_CONTEXT_KEYS} members")
    checked: dict[str, Any] = {}
    for key, value in context.items():
        if CONTEXT_KEY_RE.fullmatch(key) is None:
            raise InvalidAuthorizationDetails(f"context member name {key[:64]!r} is not a lower-case identifier")
        if isinstance(value, list):
            if len(value) > MAX_CONTEXT_LIST or not all(isinstance(v, str) for v in value):
                raise InvalidAuthorizationDetails(
                    f"context.{key} lists must hold at most {MAX_CONTEXT_LIST} strings"
                )
            checked[key] = [_check_scalar(key, v) for v in value]
        else:
            checked[key] = _check_scalar(key, value)
    return checked


def parse_intent(entry: Any) -> Intent:
    """Validate one ``authorization_details`` entry and return the :class:`Intent`."""
    if not isinstance(entry, dict):
        raise InvalidAuthorizationDetails("each authorization_details entry must be a JSON object")
    if entry.get("type") != "intent":
        raise InvalidAuthorizationDetails('authorization_details entries must have "type": "intent"')
    unknown = set(entry) - {"type", "action", "resource", "context"}
    if unknown:
        raise InvalidAuthorizationDetails(f"unknown intent member {sorted(unknown)[0][:64]!r}")
    action = entry.get("action")
    if not is_valid_action(action):
        raise InvalidAuthorizationDetails("intent action must be a dotted lower-case name such as payments.refund")
    resource = entry.get("resource")
    if not is_valid_resource(resource):
        raise InvalidAuthorizationDetails(
            "intent resource must be '/'-separated segments of letters, digits and -_.~:@ "
            "(no empty, '.' or '..' segments)"
        )
    context = _check_context(entry.get("context", {}))
    assert isinstance(action, str) and isinstance(resource, str)
    return Intent(action=action, resource=resource, context=context)


def parse_authorization_details(raw: str | None) -> Intent:
    """Parse the ``authorization_details`` form parameter: a JSON array with exactly one intent.

    One exchange yields a credential for one task; a bot with two tasks makes two exchanges.
    """
    if raw is None or raw == "":
        raise InvalidAuthorizationDetails("authorization_details is required: a JSON array with one intent")
    if len(raw.encode()) > MAX_DETAILS_BYTES:
        raise InvalidAuthorizationDetails(f"authorization_details is larger than {MAX_DETAILS_BYTES} bytes")
    try:
        details = loads_strict(raw)
    except StrictJSONError as exc:
        if exc.reason == "duplicate":
            raise InvalidAuthorizationDetails(f"duplicate member name {exc.name!r} in authorization_details") from None
        if exc.reason == "constant":
            raise InvalidAuthorizationDetails(f"{exc.name} is not a valid JSON number") from None
        raise InvalidAuthorizationDetails("authorization_details is not valid JSON") from None
    if not isinstance(details, list):
        raise InvalidAuthorizationDetails("authorization_details must be a JSON array")
    if len(details) != 1:
        raise InvalidAuthorizationDetails("authorization_details must hold exactly one intent per exchange")
    return parse_intent(details[0])
