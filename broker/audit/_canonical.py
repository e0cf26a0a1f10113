"""A fast path for :func:`broker.ledger.canonical.decode_entry`, with the same answers.

``decode_entry`` re-encodes every leaf with the pure-Python ``rfc8785`` package, about 100 µs
for a typical 1 KiB entry: a minute and a half for a million entries. Most leaves sit in a
subset of JSON where the C-accelerated :mod:`json` encoder (sorted keys, no whitespace, no ASCII
escaping) produces exactly the RFC 8785 bytes:

- only ASCII bytes (so member names sort the same by code point and by UTF-16 code unit,
  RFC 8785 §3.2.3, and no string needs more than the short escapes and ``\\u00xx``, which both
  encoders write identically, in lower-case hex, §3.2.2.2);
- no fractions or exponents (ECMAScript number formatting, §3.2.2.3, differs from Python's
  ``repr``), no integers of 16 digits or more (I-JSON's exact range), no ``NaN``/``Infinity``.

If a leaf is in that subset *and* re-encodes to itself byte for byte, it is canonical and has no
duplicate member names (a duplicate would be dropped by the parser and the bytes would differ).
Anything else goes to ``decode_entry``, which gives the reference answer and the precise error.
"""

from __future__ import annotations

import json
from typing import Any

from broker.ledger.canonical import decode_entry

__all__ = ["decode_leaf"]


class _OutsideFastPath(Exception):
    pass


def _refuse(_text: str) -> Any:
    raise _OutsideFastPath


def _small_int(text: str) -> int:
    if len(text) > 15:  # |n| <= 999,999,999,999,999 < 2**53: exact in every JSON reader
        raise _OutsideFastPath
    return int(text)


_decoder = json.JSONDecoder(parse_float=_refuse, parse_int=_small_int, parse_constant=_refuse)
_encode = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode


def decode_leaf(leaf: bytes) -> dict[str, Any]:
    """The entry of a canonical leaf; raises :class:`~broker.errors.VerificationError` otherwise."""
    if isinstance(leaf, bytes) and leaf.isascii():
        text = leaf.decode("ascii")
        try:
            entry = _decoder.decode(text)
            if type(entry) is dict and _encode(entry) == text:
                return entry
        except (_OutsideFastPath, ValueError, RecursionError):
            pass
    return decode_entry(leaf)
