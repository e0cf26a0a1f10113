"""JSON request bodies of the admin and approvals APIs: read only after the caller is authenticated,
bounded while streaming, parsed strictly.

FastAPI reads and parses a declared body model *before* it resolves the route's dependencies, so an
unauthenticated caller could make the broker buffer and parse any body it sends. These routes
therefore declare no body parameter: they depend on the operator first and then call
:func:`read_json`, which refuses the wrong media type (415), stops reading as soon as the body
passes :data:`MAX_JSON_BODY` (413, never buffering more), parses with
:func:`~broker.strict_json.loads_strict` (duplicate member names, oversized numbers, unpaired
surrogates, deep nesting: 400) and validates with the pydantic model (400 naming the member).
"""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from broker.api.forms import read_body
from broker.errors import InvalidRequest, UnsupportedMediaType
from broker.strict_json import StrictJSONError, loads_strict

__all__ = ["MAX_JSON_BODY", "json_body_openapi", "read_json"]

#: The largest JSON body an admin or approvals call may send (a reason is at most 500 characters).
MAX_JSON_BODY = 16 * 1024

Model = TypeVar("Model", bound=BaseModel)


def json_body_openapi(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` documenting ``model`` as the route's required ``application/json`` body."""
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": model.model_json_schema()}}}}


async def read_json(request: Request, model: type[Model], limit: int = MAX_JSON_BODY) -> Model:
    """The request's JSON body validated as ``model``; call only after authenticating the caller."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaType("this endpoint takes application/json")
    body = await read_body(request, limit)
    try:
        data = loads_strict(body)
    except StrictJSONError as exc:
        raise InvalidRequest(f"request body is refused: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = str(first.get("msg", "invalid value"))
        raise InvalidRequest(f"{where}: {message}" if where else message) from None
