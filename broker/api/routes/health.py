"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from broker.api.deps import RuntimeDep
from broker.errors import BrokerError

__all__ = ["router"]

router = APIRouter()


@router.get("/healthz", summary="The process answers")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Every backend answers: state store and ledger")
def readyz(runtime: RuntimeDep) -> JSONResponse:
    checks: dict[str, str] = {}
    for name, probe in (("state", runtime.store.ping), ("ledger", runtime.ledger.size)):
        try:
            probe()
            checks[name] = "ok"
        except BrokerError as exc:
            checks[name] = exc.description
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ready else "unavailable", "checks": checks},
                        status_code=200 if ready else 503)
