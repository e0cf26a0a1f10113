"""Strict parsing of untrusted JSON and base64url, shared by every reader of outside input.

``json.loads`` keeps the last of two members with the same name and accepts ``NaN`` and
``Infinity``; two readers of one document could then see different values (the I-JSON rules of
RFC 7493 forbid both). :func:`loads_strict` refuses them and says precisely what was wrong, with a
:class:`StrictJSONError` whose ``reason`` lets each caller word its own protocol error.

It also refuses what would otherwise escape as an unexpected exception deep inside a request:
a number literal longer than :data:`MAX_NUMBER_CHARS` (Python's ``int()`` raises a bare
``ValueError`` past 4300 digits, and no protocol the broker speaks needs more than a double's
17 digits), a number too large for a double (``1e400`` would silently become ``inf``), and unpaired
UTF-16 surrogate escapes such as ``"\\ud800"`` (RFC 7493 §2.1; they cannot be encoded as UTF-8, so
every later ``encode()`` of the value would fail).
"""

from __future__ import annotations

import binascii
import json
import math
import re
from decimal import Decimal
from typing import Any, Literal, NoReturn

__all__ = ["MAX_NUMBER_CHARS", "StrictJSONError", "b64url_decode_canonical", "loads_strict"]

Reason = Literal["not_utf8", "duplicate", "constant", "too_deep", "number", "surrogate", "invalid"]

#: The longest number literal accepted (a double needs at most 17 significant digits plus sign,
#: point and exponent; integers of the protocols are 53-bit).
MAX_NUMBER_CHARS = 64
# A \uD800-\uDFFF escape, or a raw surrogate in text input: only then can the result hold one.
_SURROGATE_HINT = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}|[\ud800-\udfff]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


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


class _Number(Exception):
    def __init__(self, why: str) -> None:
        self.why = why


def _parse_int(literal: str) -> int:
    if len(literal) > MAX_NUMBER_CHARS:
        raise _Number(f"a number has more than {MAX_NUMBER_CHARS} characters")
    return int(literal)


def _parse_float(literal: str) -> float:
    if len(literal) > MAX_NUMBER_CHARS:
        raise _Number(f"a number has more than {MAX_NUMBER_CHARS} characters")
    value = float(literal)
    if not math.isfinite(value):
        raise _Number("a number is too large for a double")
    return value


def _parse_decimal(literal: str) -> Decimal:
    _parse_float(literal)  # the same limits as without decimals
    return Decimal(literal)


def _has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    return False


# One decoder of each kind, built once (``json.loads`` with hooks builds a new one per call); a
# decoder keeps no state between documents, and the standard library shares its default one too.
_DECODER = json.JSONDecoder(
    object_pairs_hook=_unique_members, parse_constant=_refuse_constant, parse_int=_parse_int,
    parse_float=_parse_float,
)
_DECIMAL_DECODER = json.JSONDecoder(
    object_pairs_hook=_unique_members, parse_constant=_refuse_constant, parse_int=_parse_int,
    parse_float=_parse_decimal,
)


def loads_strict(data: bytes | str, *, decimals: bool = False) -> Any:
    """Parse ``data`` (UTF-8 bytes or text) as I-JSON, or raise :class:`StrictJSONError`.

    With ``decimals=True`` a number with a fraction or an exponent comes back as the exact
    :class:`~decimal.Decimal` of its literal (after the same size checks), not as a binary float.
    """
    try:
        text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
    except UnicodeDecodeError:
        raise StrictJSONError("not_utf8", "not UTF-8") from None
    try:
        if text.startswith("\ufeff"):  # what json.loads refuses before decoding
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        value = (_DECIMAL_DECODER if decimals else _DECODER).decode(text)
    except _Duplicate as dup:
        raise StrictJSONError("duplicate", f"duplicate member name {dup.name!r}", dup.name) from None
    except _Constant as const:
        raise StrictJSONError("constant", f"{const.name} is not a valid JSON number", const.name) from None
    except _Number as num:
        raise StrictJSONError("number", num.why) from None
    except RecursionError:
        raise StrictJSONError("too_deep", "nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise StrictJSONError("invalid", f"not valid JSON ({exc.msg} at offset {exc.pos})") from None
    except ValueError:
        # Anything else the parser may raise is still refused input, never a server error.
        raise StrictJSONError("invalid", "not valid JSON") from None
    # ASCII text without an escape cannot hold a surrogate (isascii is O(1)); otherwise look closer.
    if (
        ("\\u" in text or not text.isascii())
        and _SURROGATE_HINT.search(text) is not None
        and _has_surrogate(value)
    ):
        raise StrictJSONError("surrogate", "a string holds an unpaired UTF-16 surrogate")
    return value


# base64url -> base64 for binascii; "+", "/" and "=" are not base64url, so they become a byte that
# strict decoding refuses.
_URLSAFE_TO_STD = bytes.maketrans(b"-_+/=", b"+/!!!")
# The last character of a canonical encoding leaves no unused bits set (RFC 4648 §3.5): with two
# characters in the last group its value is a multiple of 16, with three a multiple of 4.
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_CANONICAL_LAST = {2: frozenset(_ALPHABET[::16]), 3: frozenset(_ALPHABET[::4])}


def b64url_decode_canonical(segment: str) -> bytes | None:
    """Decode unpadded base64url, or ``None`` unless ``segment`` is its one canonical encoding."""
    if not isinstance(segment, str):
        return None
    tail = len(segment) % 4
    if tail == 1 or not segment.isascii():
        return None
    if tail and segment[-1] not in _CANONICAL_LAST[tail]:
        return None
    try:
        # Strict mode refuses any character outside the alphabet (and misplaced padding).
        return binascii.a2b_base64(
            segment.encode("ascii").translate(_URLSAFE_TO_STD) + b"=" * (-len(segment) % 4), strict_mode=True
        )
    except binascii.Error:
        return None
