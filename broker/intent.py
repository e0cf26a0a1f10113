"""Parse and validate RFC 9396 ``authorization_details`` carrying one intent.

Actions and resources are checked with ``re.fullmatch`` against narrow grammars before any policy
sees them: no ``.``/``..`` segments, no empty segments, no trailing newline, bounded lengths. This is
what keeps Casbin's loose built-in matchers out of the picture.

Context values are shown to approvers and recorded for auditors, so strings may not hold control,
bidirectional-formatting or separator characters (:mod:`broker.text`). Numbers are exact: a
fraction is accepted only when the double the broker works with is exactly the decimal the client
wrote, and ``amount``/``currency`` follow the money rule of :mod:`broker.money` (a positive JSON
number with no more decimals than the ISO 4217 currency allows).
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Any

from broker.errors import InvalidAuthorizationDetails
from broker.models import Intent
from broker.money import CURRENCY_EXPONENTS, AmountError, exact_decimal, minor_units
from broker.strict_json import StrictJSONError, loads_strict
from broker.text import unsafe_character

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
#: The context keys that carry money (:mod:`broker.money`).
AMOUNT_KEY, CURRENCY_KEY = "amount", "currency"
# A whole resource in one match: 1..MAX_RESOURCE_SEGMENTS segments (none can hold a "/").
_RESOURCE_RE = re.compile(
    f"(?:{RESOURCE_SEGMENT_RE.pattern})(?:/(?:{RESOURCE_SEGMENT_RE.pattern})){{0,{MAX_RESOURCE_SEGMENTS - 1}}}")


def is_valid_action(action: object) -> bool:
    """True when ``action`` is a dotted lower-case name such as ``payments.refund``."""
    return isinstance(action, str) and ACTION_RE.fullmatch(action) is not None


def is_valid_resource(resource: object) -> bool:
    """True when ``resource`` is ``/``-separated safe segments such as ``orders/ord-1``."""
    return (isinstance(resource, str) and 0 < len(resource) <= MAX_RESOURCE_LEN
            and _RESOURCE_RE.fullmatch(resource) is not None)


def _check_scalar(key: str, value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if abs(value) > 2**53:
            raise InvalidAuthorizationDetails(f"context.{key} is outside the exact integer range")
        return value
    if isinstance(value, Decimal | float):
        # The policy and the token see a double: accept it only if it is exactly the decimal written.
        as_float = float(value)
        if not math.isfinite(as_float) or abs(as_float) > 2**53:
            raise InvalidAuthorizationDetails(f"context.{key} must be a finite number of at most 2^53")
        if isinstance(value, Decimal) and exact_decimal(as_float) != value:
            raise InvalidAuthorizationDetails(
                f"context.{key} has more digits than a JSON number carries exactly (at most 15 significant digits)"
            )
        return as_float
    if isinstance(value, str):
        if len(value) > MAX_CONTEXT_STRING:
            raise InvalidAuthorizationDetails(f"context.{key} must be at most {MAX_CONTEXT_STRING} characters")
        bad = unsafe_character(value)
        if bad is not None:
            raise InvalidAuthorizationDetails(
                f"context.{key} holds {bad}: control, bidirectional-formatting and separator characters are refused"
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
    _check_money(checked)
    return checked


def _check_money(context: dict[str, Any]) -> None:
    """The money rule of :mod:`broker.money` for ``amount`` and ``currency``."""
    currency = context.get(CURRENCY_KEY)
    if CURRENCY_KEY in context and (not isinstance(currency, str) or currency not in CURRENCY_EXPONENTS):
        raise InvalidAuthorizationDetails(
            "context.currency must be an ISO 4217 currency code with a minor unit, such as 'EUR'"
        )
    if AMOUNT_KEY not in context:
        return
    amount = exact_decimal(context[AMOUNT_KEY])
    if amount is None:
        raise InvalidAuthorizationDetails("context.amount must be a JSON number (not a string, boolean or list)")
    if not isinstance(currency, str):
        raise InvalidAuthorizationDetails("context.amount needs context.currency (an ISO 4217 code)")
    try:
        minor_units(amount, currency)
    except AmountError as exc:
        raise InvalidAuthorizationDetails(f"context.amount {exc}") from None


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
        details = loads_strict(raw, decimals=True)
    except StrictJSONError as exc:
        if exc.reason == "duplicate":
            raise InvalidAuthorizationDetails(f"duplicate member name {exc.name!r} in authorization_details") from None
        if exc.reason == "constant":
            raise InvalidAuthorizationDetails(f"{exc.name} is not a valid JSON number") from None
        if exc.reason in ("number", "surrogate", "too_deep"):
            raise InvalidAuthorizationDetails(f"authorization_details is refused: {exc}") from None
        raise InvalidAuthorizationDetails("authorization_details is not valid JSON") from None
    if not isinstance(details, list):
        raise InvalidAuthorizationDetails("authorization_details must be a JSON array")
    if len(details) != 1:
        raise InvalidAuthorizationDetails("authorization_details must hold exactly one intent per exchange")
    return parse_intent(details[0])
