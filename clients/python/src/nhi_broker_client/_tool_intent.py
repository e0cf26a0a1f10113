"""How a tool call maps to an intent: a small declarative description, shared by both ends of the call.

A :class:`ToolIntent` says which action on which resource a tool's call is, at which audience, built
from the call's arguments: ``resource`` is a template of ``{argument}`` segments, ``context`` maps
intent-context keys to ``"{argument}"`` (that argument's JSON value) or to a literal. Keys named in
``session_context`` are not taken from the arguments: the assistant supplies them from its
conversation (the customer it is serving), and the broker's policy ties them to the resource.

The assistant builds the intent it asks the broker for with :meth:`ToolIntent.intent_for`; the tool's
server builds the same intent from the call it receives and compares it with the grant
(:meth:`ToolIntent.require_granted`). No code runs per tool.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._errors import IntentMismatchError
from ._intent import Intent

__all__ = ["ToolIntent"]

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_ACTION_RE = re.compile(r"[a-z][a-z0-9_-]*(\.[a-z][a-z0-9_-]*)+")
_LITERAL_SEGMENT_RE = re.compile(r"[A-Za-z0-9._~-]+")
# A value placed into a resource segment: no '/', no '..', nothing a policy matcher could read as structure.
_SEGMENT_VALUE_RE = re.compile(r"[A-Za-z0-9_~-][A-Za-z0-9._~-]{0,127}")
_REF_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]{0,63})\}")
META_KEY = "org.nhi-broker/intent"


def _template_parts(template: str) -> list[tuple[str, str | None]]:
    """(literal, argument or None) pairs of a resource template; raises ValueError on anything else."""
    parts: list[tuple[str, str | None]] = []
    for literal, name, spec, conversion in string.Formatter().parse(template):
        if name is not None and (spec or conversion or _NAME_RE.fullmatch(name) is None):
            raise ValueError(f"resource template {template!r}: placeholders are plain {{argument}} names")
        parts.append((literal, name))
    return parts


@dataclass(frozen=True)
class ToolIntent:
    """The intent of one tool's calls (see the module docstring).

    ``require_dpop`` refuses tokens that are not DPoP-bound for this tool. ``unbound`` names arguments
    that are deliberately not part of the intent (a display hint, a page size); any other argument
    that the mapping does not use makes the call refused, so nothing the grant did not fix reaches
    the tool.
    """

    audience: str
    action: str
    resource: str
    context: Mapping[str, Any] = field(default_factory=dict)
    session_context: tuple[str, ...] = ()
    require_dpop: bool = False
    unbound: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.audience or not isinstance(self.audience, str):
            raise ValueError("audience must be a non-empty string")
        if _ACTION_RE.fullmatch(self.action) is None:
            raise ValueError(f"action {self.action!r} is not a dotted name such as payments.refund")
        segments = self.resource.split("/")
        for segment in segments:
            parts = _template_parts(segment)
            refs = [name for _, name in parts if name is not None]
            if len(refs) > 1 or (refs and (len(parts) != 1 or parts[0][0])):
                raise ValueError(f"resource {self.resource!r}: a placeholder must be a whole segment")
            if not refs and (_LITERAL_SEGMENT_RE.fullmatch(segment) is None or segment in (".", "..")):
                raise ValueError(f"resource {self.resource!r}: segment {segment!r} is not allowed")
        object.__setattr__(self, "context", dict(self.context))
        object.__setattr__(self, "session_context", tuple(self.session_context))
        object.__setattr__(self, "unbound", tuple(self.unbound))
        for key in (*self.context, *self.session_context):
            if not isinstance(key, str) or _NAME_RE.fullmatch(key) is None:
                raise ValueError(f"context key {key!r} is not a plain name")
        if set(self.context) & set(self.session_context):
            raise ValueError("a context key comes either from the arguments or from the session, not both")
        if set(self.unbound) & self.arguments():
            raise ValueError("an argument used by the intent cannot also be unbound")

    def arguments(self) -> set[str]:
        """The argument names the intent is built from."""
        names = {m.group(1) for m in _REF_RE.finditer(self.resource)}
        for value in self.context.values():
            if isinstance(value, str) and (m := _REF_RE.fullmatch(value)) is not None:
                names.add(m.group(1))
        return names

    def intent_for(self, arguments: Mapping[str, Any], session: Mapping[str, Any] | None = None) -> Intent:
        """The intent of a call with these ``arguments``; ``session`` supplies ``session_context`` keys.

        Raises :class:`~nhi_broker_client.IntentMismatchError` when the call cannot be expressed: an
        argument the mapping does not know, a missing one, a value that cannot be a resource segment,
        or a missing session value.
        """
        used = self.arguments()
        for name in arguments:
            if name not in used and name not in self.unbound:
                raise IntentMismatchError(f"argument '{name}' is not part of the tool's intent")
        for name in sorted(used):
            if name not in arguments:
                raise IntentMismatchError(f"the call does not state argument '{name}', which the intent needs")
        segments = []
        for segment in self.resource.split("/"):
            m = _REF_RE.fullmatch(segment)
            if m is None:
                segments.append(segment)
                continue
            value = arguments[m.group(1)]
            if isinstance(value, bool) or not isinstance(value, str | int) or (
                _SEGMENT_VALUE_RE.fullmatch(str(value)) is None
            ):
                raise IntentMismatchError(f"argument '{m.group(1)}' cannot name a resource")
            segments.append(str(value))
        context: dict[str, Any] = {}
        for key, value in self.context.items():
            m = _REF_RE.fullmatch(value) if isinstance(value, str) else None
            context[key] = arguments[m.group(1)] if m is not None else value
        for key in self.session_context:
            if session is None or key not in session:
                raise IntentMismatchError(f"context '{key}' comes from the conversation, and none was given")
            context[key] = session[key]
        return Intent(self.action, "/".join(segments), context)

    def require_granted(self, granted: Intent, arguments: Mapping[str, Any]) -> None:
        """Raise :class:`~nhi_broker_client.IntentMismatchError` unless a call with ``arguments`` is exactly
        ``granted``. ``session_context`` keys must be in the grant, with the value the broker decided on."""
        for key in self.session_context:
            if key not in granted.context:
                raise IntentMismatchError(f"the grant does not state context '{key}', which the tool needs")
        session = {key: granted.context[key] for key in self.session_context}
        intent = self.intent_for(arguments, session)
        granted.require_match(intent.action, intent.resource, intent.context)

    def to_meta(self) -> dict[str, Any]:
        """The description published in the tool's ``_meta`` under ``org.nhi-broker/intent``."""
        return {
            "audience": self.audience, "action": self.action, "resource": self.resource,
            "context": dict(self.context), "session_context": list(self.session_context),
            "require_dpop": self.require_dpop, "unbound": list(self.unbound),
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any] | None) -> ToolIntent | None:
        """The :class:`ToolIntent` a tool's ``_meta`` declares, or None; raises ValueError if malformed."""
        if not meta or META_KEY not in meta:
            return None
        raw = meta[META_KEY]
        if not isinstance(raw, dict):
            raise ValueError("the tool's intent declaration is not an object")
        try:
            return cls(
                audience=raw["audience"], action=raw["action"], resource=raw["resource"],
                context=dict(raw.get("context", {})), session_context=tuple(raw.get("session_context", ())),
                require_dpop=bool(raw.get("require_dpop", False)), unbound=tuple(raw.get("unbound", ())),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"the tool's intent declaration is malformed: {exc}") from None
