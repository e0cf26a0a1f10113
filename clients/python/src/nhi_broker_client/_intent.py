"""The granted intent (RFC 9396 ``authorization_details`` of ``"type": "intent"``) and how a request is
compared with it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._errors import IntentMismatchError

__all__ = ["Intent"]


def _same(granted: Any, actual: Any) -> bool:
    # JSON equality without Python's coercions: True is not 1, "20" is not 20; 20 equals 20.0.
    if isinstance(granted, bool) or isinstance(actual, bool):
        return type(granted) is type(actual) and granted == actual
    if isinstance(granted, int | float) and isinstance(actual, int | float):
        return granted == actual
    if isinstance(granted, list) and isinstance(actual, list | tuple):
        return len(granted) == len(actual) and all(_same(g, a) for g, a in zip(granted, actual, strict=True))
    if isinstance(granted, dict) and isinstance(actual, Mapping):
        return granted.keys() == actual.keys() and all(_same(granted[k], actual[k]) for k in granted)
    return type(granted) is type(actual) and granted == actual


@dataclass(frozen=True, slots=True)
class Intent:
    """What a task is for: an ``action`` on a ``resource``, with ``context`` (amount, currency, customer)."""

    action: str
    resource: str
    context: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The ``authorization_details`` entry."""
        return {"type": "intent", "action": self.action, "resource": self.resource, "context": dict(self.context)}

    def require_match(self, action: str, resource: str, context: Mapping[str, Any] | None = None) -> None:
        """Raise :class:`IntentMismatchError` unless the actual request is exactly this intent.

        The action and resource must be equal, and ``context`` must carry exactly the granted keys with
        equal JSON values (a refund of 500 does not match a grant of 20; ``"20"`` is not ``20``). Error
        descriptions name the differing part, never the values.
        """
        if action != self.action:
            raise IntentMismatchError("the request's action is not the granted action")
        if resource != self.resource:
            raise IntentMismatchError("the request's resource is not the granted resource")
        actual = dict(context or {})
        for key in sorted(set(self.context) | set(actual)):
            if key not in actual:
                raise IntentMismatchError(f"the request does not state context '{key}', which the grant fixes")
            if key not in self.context:
                raise IntentMismatchError(f"context '{key}' is not part of the grant")
            if not _same(self.context[key], actual[key]):
                raise IntentMismatchError(f"context '{key}' differs from the grant")
