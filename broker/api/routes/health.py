"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from broker.api.deps import RuntimeDep
from broker.errors import BrokerError

__all__ = ["router"]

router = APIRouter()


@router.get("/healthz", summary="The process answers")
async def healthz() -> dict[str, str]:
    """Liveness: answered on the event loop without touching any backend."""
    return {"status": "ok"}


@router.get("/readyz", summary="Every backend answers: state store and ledger")
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    """Readiness: the state store answers a ping, the ledger its size (and its storage process, if any, a ping)."""
    checks: dict[str, str] = {}
    try:
        await runtime.store.ping()
        checks["state"] = "ok"
    except BrokerError as exc:
        checks["state"] = exc.description
    try:
        await runtime.lanes.ledger.run(runtime.ledger.size)
        await runtime.ledger.ping_writer()
        checks["ledger"] = "ok"
    except BrokerError as exc:
        checks["ledger"] = exc.description
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ready else "unavailable", "checks": checks},
                        status_code=200 if ready else 503)
