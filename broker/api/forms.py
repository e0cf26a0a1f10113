"""Form-encoded request bodies (RFC 6749 §3.2, RFC 7662, RFC 7009): read, bounded and strict.

Every OAuth endpoint of the broker takes ``application/x-www-form-urlencoded``. Parsed here, not by a
generic form library, so that each malformed input gets its own precise error: wrong media type (415),
oversized body (413), undecodable or repeated parameters (RFC 6749 §3.2: parameters MUST NOT be
included more than once).

:func:`parse_form` reads exactly what ``urllib.parse.parse_qsl(body, keep_blank_values=True,
strict_parsing=True, max_num_fields=MAX_FIELDS, errors="strict")`` reads and refuses exactly what it
refuses, in one pass over the fields: ``+`` is a space, ``%XX`` (either case) is the byte XX, any
other ``%`` stays as it is, and the bytes must then be UTF-8. ``tests/api/test_forms.py`` compares
the two on random and hostile bodies.
"""

from __future__ import annotations

from fastapi import Request

from broker.errors import InvalidRequest, RequestTooLarge, UnsupportedMediaType

__all__ = ["MAX_FIELDS", "parse_form", "read_body", "read_form", "required"]

MAX_FIELDS = 32

_HEX_DIGITS = "0123456789abcdefABCDEF"
_HEX_BYTE = {(a + b).encode("ascii"): bytes([int(a + b, 16)]) for a in _HEX_DIGITS for b in _HEX_DIGITS}


def _percent_decode(data: bytes) -> bytes:
    """``urllib.parse.unquote_to_bytes``: ``%XX`` (either case) is the byte XX, any other ``%`` stays."""
    parts = data.split(b"%")
    out = [parts[0]]
    for part in parts[1:]:
        byte = _HEX_BYTE.get(part[:2])
        if byte is None:
            out += (b"%", part)
        else:
            out += (byte, part[2:])
    return b"".join(out)


def _unquote_plus(text: str) -> str:
    """``urllib.parse.unquote(text.replace("+", " "), errors="strict")``; UnicodeDecodeError if not UTF-8.

    The whole text is percent-decoded as bytes and then decoded as UTF-8 once: the same result and the
    same refusals as unquote's decoding of each ASCII run on its own (a non-ASCII character is a
    complete UTF-8 sequence, so it can neither complete nor be completed by an escaped byte).
    """
    if "+" in text:
        text = text.replace("+", " ")
    if "%" not in text:
        return text
    data = text.encode("utf-8")
    try:
        # In C: with every backslash doubled, each "%" becomes a "\x" escape that the unicode_escape
        # codec turns into the character U+00XX, every other byte into the Latin-1 character of the
        # same value, so Latin-1 gives back the percent-decoded bytes. A "%" without two hex digits
        # after it makes the codec fail: those texts take the loop below.
        decoded = data.replace(b"\\", b"\\\\").replace(b"%", b"\\x").decode("unicode_escape").encode("latin-1")
    except UnicodeDecodeError:
        decoded = _percent_decode(data)
    return decoded.decode("utf-8")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it exceeds ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidRequest("Content-Length is not a number")
        if int(declared) > limit:
            raise RequestTooLarge(f"request body is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestTooLarge(f"request body is larger than {limit} bytes")
    return bytes(body)


def parse_form(content_type: str, body: bytes) -> dict[str, str]:
    """The parameters of a form body; 415 for another media type, 400 for anything malformed or repeated."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "application/x-www-form-urlencoded":
        raise UnsupportedMediaType("this endpoint takes application/x-www-form-urlencoded")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("request body is not UTF-8") from None
    if not text:
        raise InvalidRequest("request body is empty")
    # parse_qsl's limit: a body of more than MAX_FIELDS fields is refused before any is decoded.
    if text.count("&") >= MAX_FIELDS:
        raise InvalidRequest("request body is not a valid form encoding")
    form: dict[str, str] = {}
    repeated: str | None = None
    try:
        for field in text.split("&"):
            raw_name, equals, raw_value = field.partition("=")
            if not equals:  # strict parsing: every field is name=value (an empty field included)
                raise InvalidRequest("request body is not a valid form encoding")
            name = _unquote_plus(raw_name)
            if name in form and repeated is None:
                repeated = name  # reported after the whole body parsed, as before
            form[name] = _unquote_plus(raw_value)
    except UnicodeDecodeError:
        raise InvalidRequest("a form parameter is not UTF-8 after percent-decoding") from None
    if repeated is not None:
        raise InvalidRequest(f"parameter {repeated[:40]!r} is repeated")
    return form


def required(form: dict[str, str], name: str) -> str:
    """The non-empty value of parameter ``name``, or 400 ``invalid_request`` naming it."""
    value = form.get(name)
    if not value:
        raise InvalidRequest(f"{name} is required")
    return value


async def read_form(request: Request, limit: int) -> dict[str, str]:
    """:func:`read_body` then :func:`parse_form`: the request's form parameters."""
    return parse_form(request.headers.get("content-type", ""), await read_body(request, limit))
