"""Ledger leaves: one entry as RFC 8785 (JSON Canonicalization Scheme) bytes.

A leaf hash commits to exact bytes, so an auditor must be able to rebuild them from the entry it
reads. RFC 8785 fixes key order (§3.2.3, UTF-16 code units), number form (§3.2.2.3, ECMAScript),
string escapes (§3.2.2.2) and whitespace (none). :func:`decode_entry` accepts only bytes that are
already in that form, so one entry has exactly one leaf and therefore one leaf hash.
"""

from __future__ import annotations

from typing import Any

from broker.errors import VerificationError
from broker.jcs import CanonicalizationError, canonical_json
from broker.strict_json import StrictJSONError, loads_strict

__all__ = ["decode_entry", "encode_entry"]


def encode_entry(entry: dict[str, Any]) -> bytes:
    """The RFC 8785 canonical JSON of one ledger entry (a JSON object).

    Raises :class:`ValueError` for anything JSON cannot carry exactly: a non-object entry,
    non-string keys, NaN or infinite floats (RFC 8785 §3.2.2.3), integers beyond ±(2**53 - 1)
    (I-JSON, RFC 7493 §2.2), lone surrogates, or values of other types (bytes, sets, ...).
    """
    if not isinstance(entry, dict):
        raise ValueError("a ledger entry is a JSON object (dict)")
    try:
        return canonical_json(entry)
    except CanonicalizationError as exc:
        raise ValueError(f"entry cannot be canonicalised: {exc}") from None
    except RecursionError:
        raise ValueError("entry is nested too deeply") from None


def decode_entry(data: bytes) -> dict[str, Any]:
    """Parse a leaf back into its entry, refusing anything but canonical RFC 8785 JSON.

    Raises :class:`VerificationError` for invalid UTF-8, invalid JSON, duplicate member names,
    a non-object top level, or bytes that differ from the canonical encoding of what they parse to.
    """
    if not isinstance(data, bytes | bytearray):
        raise VerificationError("a leaf is bytes")
    try:
        entry = loads_strict(bytes(data))
    except StrictJSONError as exc:
        # json.loads would keep the last of two equal names silently; two readers could then see
        # two different entries behind one leaf hash (RFC 8785 §3.1 requires I-JSON).
        messages = {
            "not_utf8": "leaf is not valid UTF-8",
            "duplicate": f"leaf has a duplicate member name {exc.name!r}",
            "constant": f"leaf contains the non-JSON number {exc.name}",
            "too_deep": "leaf is nested too deeply",
            "number": f"leaf cannot be canonicalised: {exc}",
            "surrogate": f"leaf cannot be canonicalised: {exc}",
        }
        raise VerificationError(messages.get(exc.reason, f"leaf is {exc}")) from None
    if not isinstance(entry, dict):
        raise VerificationError("leaf is not a JSON object")
    try:
        canonical = encode_entry(entry)
    except ValueError as exc:
        raise VerificationError(f"leaf cannot be canonicalised: {exc}") from None
    if canonical != data:
        raise VerificationError("leaf is not in RFC 8785 canonical form")
    return entry
