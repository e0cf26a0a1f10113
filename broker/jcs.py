"""RFC 8785 (JSON Canonicalization Scheme) bytes, fast for the values the broker writes.

Ledger leaves and the task-token claims digest are canonical JSON. The reference encoder
(``rfc8785``) is pure Python and costs about 0.25 ms for one ledger entry, a third of an exchange.
For the values the broker itself builds — objects, arrays, strings, booleans, null, integers
within I-JSON's exact range and most floats, with keys inside the Basic Multilingual Plane — the standard library's
``json.dumps(sort_keys=True)`` without whitespace produces the same bytes:

* key order: Python compares code points, RFC 8785 §3.2.3 compares UTF-16 code units; the two
  orders differ only when a key holds a character above U+FFFF, which takes the reference path;
* strings (§3.2.2.2): both escape ``"``, ``\\`` and U+0000..U+001F alike (``\\b \\t \\n \\f \\r``,
  otherwise ``\\u00xx`` in lower case) and write everything else as UTF-8;
* integers: decimal digits in both, for magnitudes up to 2**53 - 1;
* finite floats whose shortest round-trip form (``repr``) has neither an exponent nor a trailing
  ``.0`` (``20.5``, ``0.001``, ``-3.25``): ``rfc8785`` builds the ECMAScript form from that same
  text and leaves it unchanged (§3.2.2.3), and ``json`` writes ``repr``. A money amount in an
  intent's context is such a float; before, it sent the whole entry to the reference encoder.

Anything else — other floats (``1.0``, ``1e+21``, ``1e-07``), larger integers, other types, lone
surrogates — goes to ``rfc8785``, which formats ECMAScript numbers or raises.
``tests/unit/test_jcs.py`` checks the two paths against each other on random and adversarial values.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import Any

import rfc8785

__all__ = ["CanonicalizationError", "canonical_json"]

CanonicalizationError = rfc8785.CanonicalizationError

_MAX_EXACT = 2**53 - 1
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")
_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False)


def _plain_object(value: dict[Any, Any]) -> bool:
    for key in value:
        if type(key) is not str:
            return False
    return _plain_values(value.values())


def _plain_values(values: Iterable[Any]) -> bool:
    # One pass, scalars checked inline (no call per member): this runs twice per token exchange.
    for item in values:
        kind = type(item)
        if kind is str or kind is bool or item is None:
            continue
        if kind is int:
            if -_MAX_EXACT <= item <= _MAX_EXACT:
                continue
            return False
        if kind is float:
            if _plain_float(item):
                continue
            return False
        if kind is dict:
            if _plain_object(item):
                continue
            return False
        if kind is list:
            if _plain_values(item):
                continue
            return False
        return False
    return True


def _plain_float(value: float) -> bool:
    # rfc8785 formats a float from str(value) (its shortest round-trip digits) and changes that text
    # only for an exponent, a trailing ".0" (integral values, zero) or a non-finite value; otherwise
    # it writes str(value), which is what the json encoder writes too.
    text = repr(value)
    return "e" not in text and not text.endswith(".0") and math.isfinite(value)


def _astral_key(value: Any) -> bool:
    """Some member name in ``value`` holds a character above U+FFFF."""
    if type(value) is dict:
        return any(_ASTRAL.search(key) is not None or _astral_key(item) for key, item in value.items())
    if type(value) is list:
        return any(_astral_key(item) for item in value)
    return False


def _plain(value: Any) -> bool:
    """``value`` is in the subset where :data:`_encoder` writes the RFC 8785 bytes (module docstring)."""
    kind = type(value)
    if kind is dict:
        return _plain_object(value)
    if kind is list:
        return _plain_values(value)
    if kind is str or kind is bool or value is None:
        return True
    if kind is int:
        return bool(-_MAX_EXACT <= value <= _MAX_EXACT)
    if kind is float:
        return _plain_float(value)
    return False


def canonical_json(value: Any) -> bytes:
    """The RFC 8785 canonical UTF-8 bytes of ``value``.

    Raises :class:`CanonicalizationError` (a :class:`ValueError`) for what JSON cannot carry
    exactly, and :class:`RecursionError` for nesting deeper than the interpreter allows.
    """
    if _plain(value):
        text = _encoder.encode(value)
        # Keys sort alike unless one holds a character above U+FFFF: look for keys only when the
        # text holds such a character at all (rare; one C-speed scan otherwise).
        if text.isascii() or _ASTRAL.search(text) is None or not _astral_key(value):
            try:
                return text.encode("utf-8")
            except UnicodeEncodeError:
                pass  # a lone surrogate: the reference encoder names the error
    try:
        return rfc8785.dumps(value)
    except UnicodeEncodeError:  # rfc8785 lets this escape for a lone surrogate in a key
        raise CanonicalizationError("input contains non-UTF-8 codepoints") from None
