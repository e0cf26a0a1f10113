"""``GET /metrics``: Prometheus text exposition (see :mod:`broker.metrics`)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from broker.api.deps import RuntimeDep
from broker.metrics import CONTENT_TYPE_LATEST

__all__ = ["router"]

router = APIRouter()


@router.get("/metrics", summary="Prometheus metrics: requests, latency, errors by code, ledger size",
            response_class=Response)
async def metrics(request: Request, runtime: RuntimeDep) -> Response:
    # Off the loop: reads every worker's metric files and catches the ledger's tree up (its size).
    body = await runtime.lanes.ledger.run(request.app.state.metrics.exposition)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
