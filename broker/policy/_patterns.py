"""Fully anchored patterns for the audience, action and resource columns of a rule.

No pattern is a regular expression and no user text becomes one. Requests are validated by
``broker.intent`` before they get here (no ``.``/``..`` or empty segments, no trailing newline);
patterns are validated here, at load time, against the same segment grammar.

- Audience: ``*`` or an exact audience.
- Action: an exact action (``payments.refund``), ``prefix.*`` (exactly one more dotted segment:
  ``payments.*`` matches ``payments.refund`` but neither ``payments`` nor ``payments.refund.partial``)
  or ``*`` (every action).
- Resource: ``/``-separated segments. ``*`` matches exactly one segment; a final ``**`` matches one
  or more segments; ``{key}`` matches a segment equal to ``str(ctx[key])`` (no match when the key is
  missing); anything else is a literal segment. Partial wildcards (``ord-*``) are not supported.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from broker.intent import ACTION_RE, CONTEXT_KEY_RE, MAX_RESOURCE_SEGMENTS, RESOURCE_SEGMENT_RE

__all__ = [
    "AUDIENCE_RE",
    "ActionPattern",
    "PatternError",
    "ResourcePattern",
    "compile_action_pattern",
    "compile_resource_pattern",
    "is_valid_audience",
]

# Audiences are service names or URLs: printable, no whitespace, no comma, no quote, no '*'.
AUDIENCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,255}")
_CTX_SEGMENT_RE = re.compile(r"\{([^{}]*)\}")

_MISSING = object()


class PatternError(ValueError):
    """A pattern is not valid; the message says why."""


def is_valid_audience(audience: object) -> bool:
    """True for an exact audience such as ``payments-api`` (``*`` is not an audience)."""
    return isinstance(audience, str) and AUDIENCE_RE.fullmatch(audience) is not None


def check_audience_pattern(pattern: str) -> None:
    """Raise :class:`PatternError` unless ``pattern`` is ``*`` or an exact audience."""
    if pattern != "*" and not is_valid_audience(pattern):
        raise PatternError(f"audience {pattern!r} must be '*' or a name without spaces, commas or quotes")


def audience_matches(audience: object, pattern: str) -> bool:
    """The ``audienceMatch`` matcher function."""
    return isinstance(audience, str) and (pattern == "*" or audience == pattern)


@dataclass(frozen=True, slots=True)
class ActionPattern:
    """A compiled action pattern. ``prefix`` is set for ``prefix.*``; ``any`` for ``*``."""

    text: str
    exact: str | None = None
    prefix: str | None = None
    any: bool = False

    def matches(self, action: object) -> bool:
        """True when ``action`` is matched; never for non-strings."""
        if not isinstance(action, str):
            return False
        if self.any:
            return True
        if self.exact is not None:
            return action == self.exact
        assert self.prefix is not None
        head, dot, last = action.rpartition(".")
        return bool(dot) and head == self.prefix and bool(last)


def compile_action_pattern(text: str) -> ActionPattern:
    """Validate and compile an action pattern, or raise :class:`PatternError`."""
    if text == "*":
        return ActionPattern(text=text, any=True)
    if text.endswith(".*"):
        prefix = text[:-2]
        if ACTION_RE.fullmatch(prefix) is None or prefix.count(".") >= 3:
            raise PatternError(
                f"action pattern {text!r}: the part before '.*' must be a dotted lower-case name "
                "of at most three segments"
            )
        return ActionPattern(text=text, prefix=prefix)
    if ACTION_RE.fullmatch(text) is None:
        raise PatternError(
            f"action pattern {text!r} must be an exact action (payments.refund), 'prefix.*' or '*'"
        )
    return ActionPattern(text=text, exact=text)


@dataclass(frozen=True, slots=True)
class _Segment:
    kind: str  # "literal" | "one" | "rest" | "ctx"
    value: str = ""

    @property
    def text(self) -> str:
        return {"one": "*", "rest": "**", "ctx": f"{{{self.value}}}"}.get(self.kind, self.value)


@dataclass(frozen=True, slots=True)
class ResourcePattern:
    """A compiled resource pattern. Built only by :func:`compile_resource_pattern`."""

    text: str
    segments: tuple[_Segment, ...]

    @property
    def context_keys(self) -> frozenset[str]:
        """The context keys this pattern binds as ``{key}`` segments."""
        return frozenset(s.value for s in self.segments if s.kind == "ctx")

    @property
    def has_rest(self) -> bool:
        return self.segments[-1].kind == "rest"

    def matches(self, resource: object, ctx: Mapping[str, Any]) -> bool:
        """True when ``resource`` is matched, substituting ``{key}`` from ``ctx``."""
        return self.explain(resource, ctx) is None

    def explain(self, resource: object, ctx: Mapping[str, Any]) -> str | None:
        """``None`` on a match, else a short reason (shown by ``policy explain``)."""
        if not isinstance(resource, str):
            return "resource is not text"
        if not isinstance(ctx, Mapping):
            raise TypeError("request context must be a mapping")
        parts = resource.split("/")
        n = len(self.segments)
        if self.has_rest:
            if len(parts) < n:
                return f"resource has {len(parts)} segments, pattern needs at least {n}"
        elif len(parts) != n:
            return f"resource has {len(parts)} segments, pattern needs {n}"
        for index, (seg, part) in enumerate(zip(self.segments, parts, strict=False), start=1):
            kind = seg.kind
            if not part:  # requests never have empty segments; never let one match anything
                return f"segment {index} is empty"
            if kind == "literal":
                if part != seg.value:
                    return f"segment {index} {part!r} is not {seg.value!r}"
            elif kind == "ctx":
                value = ctx.get(seg.value, _MISSING)
                if value is _MISSING:
                    return f"segment {index}: context has no {seg.value!r}"
                if part != str(value):
                    return f"segment {index} {part!r} is not {seg.value} = {str(value)!r}"
        if self.has_rest and not all(parts[n:]):
            return "a segment matched by ** is empty"
        return None


def compile_resource_pattern(text: str) -> ResourcePattern:
    """Validate and compile a resource pattern, or raise :class:`PatternError`."""
    if not text:
        raise PatternError("resource pattern is empty")
    raw = text.split("/")
    if len(raw) > MAX_RESOURCE_SEGMENTS:
        raise PatternError(f"resource pattern {text!r} has more than {MAX_RESOURCE_SEGMENTS} segments")
    segments: list[_Segment] = []
    for index, part in enumerate(raw):
        last = index == len(raw) - 1
        if part == "*":
            segments.append(_Segment("one"))
        elif part == "**":
            if not last:
                raise PatternError(f"resource pattern {text!r}: '**' is only allowed as the last segment")
            segments.append(_Segment("rest"))
        elif (m := _CTX_SEGMENT_RE.fullmatch(part)) is not None:
            key = m.group(1)
            if CONTEXT_KEY_RE.fullmatch(key) is None:
                raise PatternError(f"resource pattern {text!r}: {{{key}}} does not name a context key")
            segments.append(_Segment("ctx", key))
        elif RESOURCE_SEGMENT_RE.fullmatch(part) is not None:
            segments.append(_Segment("literal", part))
        elif part in ("", ".", ".."):
            raise PatternError(f"resource pattern {text!r} has an empty, '.' or '..' segment")
        elif "*" in part or "{" in part or "}" in part:
            raise PatternError(
                f"resource pattern {text!r}: wildcards and {{key}} must fill a whole segment ({part!r})"
            )
        else:
            raise PatternError(
                f"resource pattern {text!r}: segment {part!r} must be letters, digits and -_.~:@ "
                "(not starting or ending with '.')"
            )
    return ResourcePattern(text=text, segments=tuple(segments))
