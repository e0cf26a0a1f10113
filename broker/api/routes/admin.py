"""Admin API: scoped revocation, the kill switch, Vault leases and live policy reloads, for
authenticated operators only.

Every call needs ``Authorization: Bearer <operator token>`` (see :mod:`broker.operators`); the role
decides what it may do. Each action takes effect in the shared state store first (it only ever takes
access away) and is then recorded as a ledger entry naming the operator.

The caller is authenticated and its role checked before the body is read; the body is read with a
cap and parsed strictly (:mod:`broker.api.json_body`).
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from broker.api.deps import RuntimeDep, single_header
from broker.api.json_body import json_body_openapi, read_json
from broker.entries import revocation_entry, suspension_entry
from broker.errors import NotFound, PolicyLoadError, PolicySetRefused, TemporarilyUnavailable
from broker.operators import Operator
from broker.runtime import Runtime
from broker.text import unsafe_character
from broker.tracing import current_trace_id
from broker.vault.errors import VaultRefused
from broker.vault.leases import LeaseRecord

__all__ = ["router"]


async def _operator(request: Request) -> Operator:
    runtime: Runtime = request.app.state.runtime
    assert runtime.state is not None
    return await runtime.state.operators.authenticate(single_header(request, "Authorization"))


OperatorDep = Annotated[Operator, Depends(_operator)]
router = APIRouter(prefix="/v1/admin", responses={401: {"description": "invalid_token"},
                                                  403: {"description": "role not allowed"}})


def _displayable(value: str) -> str:
    # Operators and auditors read these: nothing that displays otherwise than it is (broker.text).
    bad = unsafe_character(value.replace("\t", " ").replace("\n", " "))
    if bad is not None:
        raise ValueError(f"holds {bad}: control and bidirectional-formatting characters are refused")
    return value


_Value = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$"),
                   AfterValidator(_displayable)]
#: A reason: printable text; tabs and line breaks are allowed (shared with the approvals API).
Reason = Annotated[str, Field(min_length=1, max_length=500, pattern=r"^[^\x00-\x08\x0b-\x1f\x7f]+$"),
                   AfterValidator(_displayable)]
_WorkloadName = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")]


class RevocationRequest(BaseModel):
    """Revoke every live token of one workload, end user (``customer``) or conversation."""

    model_config = ConfigDict(extra="forbid")

    scope: Literal["workload", "end_user", "conversation"]
    value: _Value
    reason: Reason


class SuspensionRequest(BaseModel):
    """Why an operator suspends or resumes a workload (recorded in the ledger)."""

    model_config = ConfigDict(extra="forbid")

    reason: Reason


def _known_workload(runtime: Runtime, name: str) -> str:
    if runtime.policies.registry.get(name) is None:
        raise NotFound(f"no workload named {name!r} in the registry")
    return name


@router.post("/revocations", summary="Revoke every live token of a workload, end user or conversation",
             openapi_extra=json_body_openapi(RevocationRequest))
async def revoke_scope(request: Request, operator: OperatorDep, runtime: RuntimeDep) -> dict[str, Any]:
    operator.require("revoke")
    body = await read_json(request, RevocationRequest)
    if body.scope == "workload":
        _known_workload(runtime, body.value)
    assert runtime.state is not None
    cutoff = await runtime.state.tokens.revoke_scope(body.scope, body.value)
    entry = revocation_entry(now=cutoff, request_id=uuid.uuid4().hex, actor=operator.to_json(), scope=body.scope,
                             target={"value": body.value}, reason=body.reason,
                             trace_id=current_trace_id())
    receipt = await runtime.ledger.append_async(entry)
    return {"scope": body.scope, "value": body.value, "revoked_before": cutoff,
            "receipt": {"index": receipt.index, "leaf_hash": receipt.leaf_hash}}


@router.post("/workloads/{name}/suspend", summary="Kill switch: issue nothing more, every live token inactive",
             openapi_extra=json_body_openapi(SuspensionRequest))
async def suspend(name: _WorkloadName, request: Request, operator: OperatorDep, runtime: RuntimeDep) -> dict[str, Any]:
    operator.require("suspend")
    body = await read_json(request, SuspensionRequest)
    _known_workload(runtime, name)
    assert runtime.state is not None
    at = await runtime.state.tokens.suspend(name)
    request_id = uuid.uuid4().hex
    entry = suspension_entry(now=at, request_id=request_id, actor=operator.to_json(), workload=name,
                             suspended=True, reason=body.reason, trace_id=current_trace_id())
    receipt = await runtime.ledger.append_async(entry)
    answer: dict[str, Any] = {"workload": name, "suspended": True, "since": at,
                              "receipt": {"index": receipt.index, "leaf_hash": receipt.leaf_hash}}
    if runtime.vault is not None:
        # Its Vault secrets end too, each with a revocation entry under this request id. If Vault is
        # down the suspension still holds (nothing new is issued) and the sweeper ends the leases.
        try:
            answer["vault_leases_revoked"] = await runtime.vault.lane.run(
                runtime.vault.revoke_workload, name, request_id, operator.to_json(), "suspended"
            )
        except (TemporarilyUnavailable, VaultRefused) as exc:
            answer["vault_leases_error"] = exc.description
    return answer


@router.post("/workloads/{name}/resume", summary="Lift a suspension; tokens from before it stay inactive",
             openapi_extra=json_body_openapi(SuspensionRequest))
async def resume(name: _WorkloadName, request: Request, operator: OperatorDep, runtime: RuntimeDep) -> dict[str, Any]:
    operator.require("suspend")
    body = await read_json(request, SuspensionRequest)
    _known_workload(runtime, name)
    assert runtime.state is not None
    was = await runtime.state.tokens.resume(name)
    entry = suspension_entry(now=runtime.clock.now(), request_id=uuid.uuid4().hex, actor=operator.to_json(),
                             workload=name, suspended=False, reason=body.reason, trace_id=current_trace_id())
    receipt = await runtime.ledger.append_async(entry)
    return {"workload": name, "suspended": False, "was_suspended": was,
            "receipt": {"index": receipt.index, "leaf_hash": receipt.leaf_hash}}


@router.get("/workloads", summary="Every registered workload with its owner, suspension and revocation state")
async def workloads_state(operator: OperatorDep, runtime: RuntimeDep) -> dict[str, Any]:
    operator.require("read")
    assert runtime.state is not None
    entries = list(runtime.policies.registry)
    status = await runtime.state.tokens.workloads_status([e.name for e in entries])
    return {"workloads": [
        {"workload": e.name, "owner": e.owner, "suspended": status[e.name]["suspended_since"] is not None,
         **status[e.name]}
        for e in entries
    ]}


@router.get("/workloads/{name}", summary="Suspension and revocation state of a workload")
async def workload_state(name: _WorkloadName, operator: OperatorDep, runtime: RuntimeDep) -> dict[str, Any]:
    operator.require("read")
    _known_workload(runtime, name)
    assert runtime.state is not None
    status = await runtime.state.tokens.workload_status(name)
    return {"workload": name, "suspended": status["suspended_since"] is not None, **status}


_TaskId = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")]


def _lease_view(record: LeaseRecord) -> dict[str, Any]:
    return {"task_id": record.task_id, "workload": record.workload, "spiffe_id": record.spiffe_id,
            "kind": record.kind, "ref_type": record.ref_type, "ref": record.ref, "issued_at": record.issued_at,
            "expires_at": record.expires_at, "state": record.state, "reason": record.reason,
            "issuance": record.leaf_hash}


@router.get("/leases", summary="Vault/OpenBao leases handed out (open ones unless state=all), newest first")
async def leases(
    operator: OperatorDep, runtime: RuntimeDep,
    workload: Annotated[str | None, Query(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")] = None,
    state: Literal["open", "all"] = "open",
) -> dict[str, Any]:
    operator.require("read")
    if runtime.vault is None:
        return {"vault_configured": False, "leases": []}
    if workload is not None:
        _known_workload(runtime, workload)
    vault = runtime.vault
    records = await vault.book_lane.run(vault.leases.listing, workload=workload, open_only=state == "open")
    return {"vault_configured": True, "leases": [_lease_view(r) for r in records]}


@router.post("/leases/{task_id}/revoke", summary="End one Vault task now: revoke its lease (a revocation entry)",
             openapi_extra=json_body_openapi(SuspensionRequest))
async def revoke_lease(
    task_id: _TaskId, request: Request, operator: OperatorDep, runtime: RuntimeDep
) -> dict[str, Any]:
    operator.require("revoke")
    body = await read_json(request, SuspensionRequest)
    if runtime.vault is None:
        raise NotFound("no Vault is configured on this broker, so it holds no leases")
    vault = runtime.vault
    try:
        record = await vault.lane.run(vault.revoke_task, task_id, uuid.uuid4().hex, operator.to_json(), body.reason)
    except (TemporarilyUnavailable, VaultRefused) as exc:
        raise TemporarilyUnavailable(f"the lease stays open (the sweeper retries): {exc.description}") from None
    if record is None:
        raise NotFound(f"no Vault task {task_id!r} in the lease book")
    return _lease_view(record)


@router.post("/policies/reload", summary="Reload policies, registry, limits and approval terms without a restart",
             responses={422: {"description": "invalid_policy: the set was refused; the old one keeps serving"}})
async def reload_policies(operator: OperatorDep, runtime: RuntimeDep) -> dict[str, Any]:
    """Lint the policy directory, swap the set in and record one ``policy_load`` entry (``recorded``);
    every worker and replica follows. A set already live answers ``changed: false`` with its entry."""
    operator.require("reload")
    try:
        outcome = await runtime.reload_policies("api", actor=operator.to_json())
    except PolicyLoadError as exc:
        raise PolicySetRefused(exc.problems, runtime.policies.version) from None
    return outcome.to_json()
