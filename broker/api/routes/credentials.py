"""``POST /v1/credentials/release``: end a Vault-backed task early and revoke its lease.

The caller proves it holds the task with the ``release_token`` from the token response (form field,
``application/x-www-form-urlencoded``). The answer names the task and its state; the revocation
is a ``revocation`` ledger entry. Releasing a task twice answers the same, without a second entry.
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from broker.api.deps import RuntimeDep
from broker.api.errors import NO_STORE
from broker.api.forms import read_form, required
from broker.errors import InvalidRequest, TemporarilyUnavailable

__all__ = ["router"]

router = APIRouter()

_FORM: dict[str, object] = {
    "requestBody": {
        "required": True,
        "content": {"application/x-www-form-urlencoded": {"schema": {
            "type": "object", "required": ["release_token"],
            "properties": {"release_token": {"type": "string", "description": "From the token response."}},
        }}},
    }
}


@router.post(
    "/v1/credentials/release", openapi_extra=_FORM, summary="End a Vault-backed task early (revokes its lease)",
    responses={400: {"description": "RFC 6749 error"}, 503: {"description": "Vault unavailable; retry"}},
)
async def release(request: Request, runtime: RuntimeDep) -> JSONResponse:
    """Revoke the lease of the task that ``release_token`` belongs to."""
    request_id = uuid.uuid4().hex
    form = await read_form(request, runtime.settings.max_body_bytes)
    unknown = sorted(set(form) - {"release_token"})
    if unknown:
        raise InvalidRequest(f"unknown parameter {unknown[0][:40]!r}")
    token = required(form, "release_token")
    if runtime.vault is None:
        raise TemporarilyUnavailable("this broker has no Vault configured")
    record = await runtime.vault.lane.run(runtime.vault.release, token, request_id)
    payload = {"task_id": record.task_id, "kind": record.kind, "state": record.state, "reason": record.reason}
    return JSONResponse(payload, headers={**NO_STORE, "X-Request-Id": request_id})
