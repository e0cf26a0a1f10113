"""Strict parsing of untrusted JSON and base64url, shared by every reader of outside input.

``json.loads`` keeps the last of two members with the same name and accepts ``NaN`` and
``Infinity``; two readers of one document could then see different values (the I-JSON rules of
RFC 7493 forbid both). :func:`loads_strict` refuses them and says precisely what was wrong, with a
:class:`StrictJSONError` whose ``reason`` lets each caller word its own protocol error.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Literal, NoReturn

__all__ = ["StrictJSONError", "b64url_decode_canonical", "loads_strict"]

Reason = Literal["not_utf8", "duplicate", "constant", "too_deep", "invalid"]


class StrictJSONError(ValueError):
    """Why a document was refused: ``reason`` (one of :data:`Reason`), and ``name`` — the duplicated
    member or the non-standard constant — where there is one."""

    def __init__(self, reason: Reason, detail: str, name: str | None = None) -> None:
        super().__init__(detail)
        self.reason: Reason = reason
        self.name = name


class _Duplicate(Exception):
    def __init__(self, name: str) -> None:
        self.name = name


class _Constant(Exception):
    def __init__(self, name: str) -> None:
        self.name = name


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise _Duplicate(name)
        out[name] = value
    return out


def _refuse_constant(name: str) -> NoReturn:
    raise _Constant(name)


def loads_strict(data: bytes | str) -> Any:
    """Parse ``data`` (UTF-8 bytes or text) as I-JSON, or raise :class:`StrictJSONError`."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
    except UnicodeDecodeError:
        raise StrictJSONError("not_utf8", "not UTF-8") from None
    try:
        return json.loads(text, object_pairs_hook=_unique_members, parse_constant=_refuse_constant)
    except _Duplicate as dup:
        raise StrictJSONError("duplicate", f"duplicate member name {dup.name!r}", dup.name) from None
    except _Constant as const:
        raise StrictJSONError("constant", f"{const.name} is not a valid JSON number", const.name) from None
    except RecursionError:
        raise StrictJSONError("too_deep", "nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise StrictJSONError("invalid", f"not valid JSON ({exc.msg} at offset {exc.pos})") from None


def b64url_decode_canonical(segment: str) -> bytes | None:
    """Decode unpadded base64url, or ``None`` unless ``segment`` is its one canonical encoding."""
    if not isinstance(segment, str) or len(segment) % 4 == 1:
        return None
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except ValueError:
        return None
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != segment:
        return None
    return raw
