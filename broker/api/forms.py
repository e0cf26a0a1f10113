"""Form-encoded request bodies (RFC 6749 §3.2, RFC 7662, RFC 7009): read, bounded and strict.

Every OAuth endpoint of the broker takes ``application/x-www-form-urlencoded``. Parsed here, not by a
generic form library, so that each malformed input gets its own precise error: wrong media type (415),
oversized body (413), undecodable or repeated parameters (RFC 6749 §3.2: parameters MUST NOT be
included more than once).
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from fastapi import Request

from broker.errors import InvalidRequest, RequestTooLarge, UnsupportedMediaType

__all__ = ["MAX_FIELDS", "parse_form", "read_body", "read_form", "required"]

MAX_FIELDS = 32


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
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=True, max_num_fields=MAX_FIELDS,
                          errors="strict")
    except UnicodeDecodeError:
        raise InvalidRequest("a form parameter is not UTF-8 after percent-decoding") from None
    except ValueError:
        raise InvalidRequest("request body is not a valid form encoding") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            raise InvalidRequest(f"parameter {name[:40]!r} is repeated")
        form[name] = value
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
