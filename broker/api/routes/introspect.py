"""``POST /v1/introspect`` (RFC 7662) and ``POST /v1/revoke`` (RFC 7009) for resource servers.

Callers authenticate (``introspection_clients`` in the settings: HTTP Basic client credentials, or
their own workload identity token as ``Authorization: Bearer``) before anything else is read.
Introspection of an N-use token consumes one use. A revocation that takes effect is a ``revocation``
ledger entry naming the client.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from broker.api.deps import RuntimeDep, single_header
from broker.api.errors import NO_STORE
from broker.api.forms import read_form
from broker.entries import revocation_entry
from broker.errors import InvalidRequest
from broker.operators import AuthenticatedClient
from broker.state.services import StateServices
from broker.tracing import current_trace_id

__all__ = ["router"]

router = APIRouter()

_FORM: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/x-www-form-urlencoded": {
                "schema": {
                    "type": "object",
                    "required": ["token"],
                    "properties": {"token": {"type": "string"}, "token_type_hint": {"type": "string"}},
                }
            }
        },
    }
}
_AUTH: dict[int | str, dict[str, Any]] = {
    401: {"description": "invalid_client"}, 503: {"description": "state store unavailable"},
}


def _services(runtime: Any) -> StateServices:
    assert runtime.state is not None
    return runtime.state  # type: ignore[no-any-return]


async def _authenticated_form(request: Request, runtime: Any) -> tuple[AuthenticatedClient, str]:
    client = await _services(runtime).clients.authenticate(single_header(request, "Authorization"))
    form = await read_form(request, runtime.settings.max_body_bytes)
    token = form.get("token")
    if not token:
        raise InvalidRequest("token is required")
    hint = form.get("token_type_hint")
    # RFC 7662 §2.1 / RFC 7009 §2.1: an unknown hint is ignored, the whole token space is searched.
    if hint is not None and len(hint) > 64:
        raise InvalidRequest("token_type_hint is too long")
    return client, token


@router.post("/v1/introspect", openapi_extra=_FORM, responses=_AUTH,
             summary="RFC 7662 token introspection for resource servers")
async def introspect(request: Request, runtime: RuntimeDep) -> JSONResponse:
    """``active`` plus the granted intent, owner and ledger ``txn``; ``{"active": false}`` otherwise."""
    client, token = await _authenticated_form(request, runtime)
    # On the event loop: the broker's own keys and a few async state-store reads (see broker.pipeline).
    answer = await _services(runtime).introspector.introspect(token, client)
    return JSONResponse(answer, headers=NO_STORE)


@router.post("/v1/revoke", openapi_extra=_FORM, responses=_AUTH, summary="RFC 7009 token revocation")
async def revoke(request: Request, runtime: RuntimeDep) -> Response:
    """Revoke a task token; 200 with an empty body whether or not it was valid (RFC 7009 §2.2)."""
    client, token = await _authenticated_form(request, runtime)
    claims = await _services(runtime).introspector.revoke(token, client)
    if claims is not None:
        entry = revocation_entry(
            now=runtime.clock.now(), request_id=uuid.uuid4().hex, actor=client.to_json(), scope="token",
            target={"jti": claims["jti"], "workload": claims["client_id"]}, reason="RFC 7009 revocation",
            trace_id=current_trace_id(),
        )
        await runtime.ledger.append_async(entry)
    return Response(status_code=200, headers=NO_STORE)
