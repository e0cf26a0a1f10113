"""SPIFFE IDs, parsed exactly as the SPIFFE ID specification (SPIFFE-ID.md §2) defines them.

A SPIFFE ID is ``spiffe://<trust domain><path>``:

- the scheme is exactly ``spiffe`` in lower case, followed by ``://``;
- the trust domain is non-empty and uses only ``a-z 0-9 . - _`` (no upper case, no port, no userinfo);
- the path is empty or a sequence of ``/segment``; a segment is non-empty, uses only
  ``a-z A-Z 0-9 . - _``, and is never ``.`` or ``..``; there is no trailing slash;
- there is no query, fragment or percent-encoding;
- the whole ID is at most 2048 bytes.

Every check uses :func:`re.fullmatch`: ``$`` would accept a trailing newline.

:func:`parse_spiffe_id` is a pure function of its input and an exchange parses the same ID several
times (attestation, registry, policy), so it remembers the last :data:`_MEMO_SIZE` valid IDs it
parsed (an exact ``str``; refused input is never remembered). :class:`SpiffeId` is immutable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "MAX_SPIFFE_ID_BYTES",
    "SpiffeId",
    "parse_spiffe_id",
    "validate_path_segment",
    "validate_trust_domain",
]

MAX_SPIFFE_ID_BYTES = 2048

_SCHEME = "spiffe://"
#: How many valid SPIFFE IDs :func:`parse_spiffe_id` remembers (cleared when full: bounded memory).
_MEMO_SIZE = 4096
_MEMO_MAX_CHARS = 512
_memo: dict[str, SpiffeId] = {}
_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]+")
_SEGMENT_RE = re.compile(r"[a-zA-Z0-9._-]+")


def validate_trust_domain(value: str) -> str:
    """Return ``value`` if it is a valid trust domain name; raise :class:`ValueError` saying why not."""
    if not isinstance(value, str):
        raise ValueError("trust domain must be a string")
    if not value:
        raise ValueError("trust domain is missing")
    if "@" in value:
        raise ValueError("trust domain cannot contain userinfo")
    if ":" in value:
        raise ValueError("trust domain cannot contain a port")
    if "%" in value:
        raise ValueError("trust domain cannot contain percent-encoding")
    if _TRUST_DOMAIN_RE.fullmatch(value) is None:
        raise ValueError(
            "trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores"
        )
    return value


def validate_path_segment(value: str) -> str:
    """Return ``value`` if it is a valid SPIFFE path segment; raise :class:`ValueError` saying why not."""
    if not isinstance(value, str):
        raise ValueError("path segment must be a string")
    if not value:
        raise ValueError("path cannot contain empty segments")
    if value in (".", ".."):
        raise ValueError("path cannot contain dot segments")
    if "%" in value:
        raise ValueError("path cannot contain percent-encoding")
    if _SEGMENT_RE.fullmatch(value) is None:
        raise ValueError(
            "path segment characters are limited to letters, numbers, dots, dashes, and underscores"
        )
    return value


def _validate_path(path: str) -> str:
    if path == "":
        return path
    if not path.startswith("/"):
        raise ValueError("path must be empty or start with '/'")
    if path.endswith("/"):
        raise ValueError("path cannot have a trailing slash")
    for segment in path[1:].split("/"):
        validate_path_segment(segment)
    return path


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A valid SPIFFE ID. Construction validates both parts, so no invalid instance exists.

    ``path`` is ``""`` (the trust domain's own ID) or starts with ``/``.
    """

    trust_domain: str
    path: str

    def __post_init__(self) -> None:
        validate_trust_domain(self.trust_domain)
        _validate_path(self.path)
        if len(str(self).encode("utf-8")) > MAX_SPIFFE_ID_BYTES:
            raise ValueError(f"SPIFFE ID exceeds {MAX_SPIFFE_ID_BYTES} bytes")

    def __str__(self) -> str:
        return f"{_SCHEME}{self.trust_domain}{self.path}"

    @property
    def segments(self) -> tuple[str, ...]:
        """The path segments, without slashes."""
        return tuple(self.path[1:].split("/")) if self.path else ()


def parse_spiffe_id(value: str) -> SpiffeId:
    """Parse ``value`` as a SPIFFE ID; raise :class:`ValueError` with the precise reason it is not one."""
    if type(value) is str:  # not a subclass: its own __eq__/__hash__ could make the memo lie
        known = _memo.get(value)
        if known is not None:
            return known
        parsed = _parse(value)
        if len(value) <= _MEMO_MAX_CHARS:
            if len(_memo) >= _MEMO_SIZE:
                _memo.clear()
            _memo[value] = parsed
        return parsed
    return _parse(value)


def _parse(value: str) -> SpiffeId:
    if not isinstance(value, str):
        raise ValueError("SPIFFE ID must be a string")
    if not value:
        raise ValueError("SPIFFE ID is empty")
    # Checked first, so no later step works on an unbounded string.
    if len(value.encode("utf-8", "surrogatepass")) > MAX_SPIFFE_ID_BYTES:
        raise ValueError(f"SPIFFE ID exceeds {MAX_SPIFFE_ID_BYTES} bytes")
    if not value.startswith(_SCHEME):
        raise ValueError("scheme is missing or invalid (must be exactly 'spiffe://')")
    rest = value[len(_SCHEME) :]
    # Name the URI feature being refused: a precise reason helps whoever wrote the bad ID.
    if "?" in rest:
        raise ValueError("SPIFFE ID cannot contain a query")
    if "#" in rest:
        raise ValueError("SPIFFE ID cannot contain a fragment")
    trust_domain, slash, path = rest.partition("/")
    validate_trust_domain(trust_domain)
    return SpiffeId(trust_domain, slash + path)
