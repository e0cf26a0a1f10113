"""Approvals API: list pending intents and decide them (approvers), for scripts and chat-ops.

The web console (:mod:`broker.console`) offers the same decisions to people; both go through
:class:`~broker.approvals.ApprovalDesk`, so every decision is checked and recorded the same way.
Authentication is the admin API's: ``Authorization: Bearer <operator credential>``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, ConfigDict

from broker.api.deps import RuntimeDep
from broker.api.json_body import json_body_openapi, read_json
from broker.api.routes.admin import OperatorDep, Reason
from broker.approvals import ApprovalDesk
from broker.errors import TemporarilyUnavailable
from broker.runtime import Runtime

__all__ = ["router"]

router = APIRouter(prefix="/v1/admin/approvals", responses={
    401: {"description": "invalid_token"}, 403: {"description": "role or group not allowed"},
    404: {"description": "no such request"}, 409: {"description": "already_decided"},
})
_AuthReqId = Annotated[str, Path(min_length=20, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class DecisionRequest(BaseModel):
    """Why the approver decides as they do (recorded in the ledger)."""

    model_config = ConfigDict(extra="forbid")

    reason: Reason


def _desk(runtime: Runtime) -> ApprovalDesk:
    if runtime.approvals is None:
        raise TemporarilyUnavailable("approvals are not available on this broker")
    return runtime.approvals


@router.get("", summary="Every live approval request (pending first), with its full intent and context")
async def list_requests(operator: OperatorDep, runtime: RuntimeDep) -> dict[str, Any]:
    """Every live request (any role may read)."""
    operator.require("read")
    desk = _desk(runtime)
    return {"requests": [desk.public_view(r) for r in await desk.listing()]}


@router.get("/{auth_req_id}", summary="One approval request")
async def get_request(auth_req_id: _AuthReqId, operator: OperatorDep, runtime: RuntimeDep) -> dict[str, Any]:
    """One request, as approvers see it."""
    operator.require("read")
    desk = _desk(runtime)
    return desk.public_view(await desk.get(auth_req_id))


@router.post("/{auth_req_id}/approve", summary="Approve a pending request (recorded in the ledger)",
             openapi_extra=json_body_openapi(DecisionRequest))
async def approve(
    auth_req_id: _AuthReqId, request: Request, operator: OperatorDep, runtime: RuntimeDep
) -> dict[str, Any]:
    """Approve as the calling operator (approver role, in the rule's group)."""
    operator.require("approve")
    body = await read_json(request, DecisionRequest)
    desk = _desk(runtime)
    return desk.public_view(await desk.decide(operator, auth_req_id, approve=True, reason=body.reason))


@router.post("/{auth_req_id}/deny", summary="Deny a pending request (recorded in the ledger)",
             openapi_extra=json_body_openapi(DecisionRequest))
async def deny(
    auth_req_id: _AuthReqId, request: Request, operator: OperatorDep, runtime: RuntimeDep
) -> dict[str, Any]:
    """Deny as the calling operator: the request never yields a token."""
    operator.require("approve")
    body = await read_json(request, DecisionRequest)
    desk = _desk(runtime)
    return desk.public_view(await desk.decide(operator, auth_req_id, approve=False, reason=body.reason))
