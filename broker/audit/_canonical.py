"""A fast path for :func:`broker.ledger.canonical.decode_entry`, with the same answers.

``decode_entry`` re-encodes every leaf with the pure-Python ``rfc8785`` package, about 100 µs
for a typical 1 KiB entry: a minute and a half for a million entries. Most leaves sit in a
subset of JSON where the C-accelerated :mod:`json` encoder (sorted keys, no whitespace, no ASCII
escaping) produces exactly the RFC 8785 bytes (:mod:`broker.jcs`):

- only ASCII bytes (so member names sort the same by code point and by UTF-16 code unit,
  RFC 8785 §3.2.3, and no string needs more than the short escapes and ``\\u00xx``, which both
  encoders write identically, in lower-case hex, §3.2.2.2);
- objects, arrays, strings, booleans, null, integers within ±(2**53 - 1) (I-JSON's exact range)
  and floats whose shortest form has no exponent and no trailing ``.0`` (``20.5``; ECMAScript
  number formatting, §3.2.2.3, differs from Python's ``repr`` only for the others).

The leaf is parsed by pydantic-core's JSON parser (Rust, about twice as fast as :mod:`json`), and
the value is kept only if it is in that subset (:func:`broker.jcs._plain_object`, exact types)
*and* re-encodes to the leaf byte for byte. Whatever the parser
returned, a value whose canonical encoding *is* the leaf is the leaf's one meaning, so the
parser's own leniencies do not matter: a duplicate member name (which a parser collapses), a
non-standard constant, ``-0`` or a non-canonical escape all fail the subset check or the comparison.
Anything else goes to ``decode_entry``, which gives the reference answer and the precise error.
"""

from __future__ import annotations

from typing import Any

from pydantic_core import from_json

from broker.jcs import _encoder, _plain_object
from broker.ledger.canonical import decode_entry

__all__ = ["decode_leaf"]

_encode = _encoder.encode


def decode_leaf(leaf: bytes) -> dict[str, Any]:
    """The entry of a canonical leaf; raises :class:`~broker.errors.VerificationError` otherwise."""
    if type(leaf) is bytes and leaf.isascii():
        try:
            entry = from_json(leaf)
            if type(entry) is dict and _plain_object(entry) and _encode(entry) == leaf.decode("ascii"):
                return entry
        except (ValueError, RecursionError):
            pass
    return decode_entry(leaf)
