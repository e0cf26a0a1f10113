"""The one place where errors become HTTP responses (RFC 6749 §5.2 JSON, never a stack trace)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException

from broker.errors import BrokerError

__all__ = ["NO_STORE", "broker_error_response", "count_error", "error_response", "install_error_handlers"]

log = logging.getLogger("nhi_broker.api")

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "invalid_request", 415: "invalid_request"}


def count_error(app: Starlette, error: str) -> None:
    """Count an error answer by its RFC 6749 code (``nhi_broker_errors``)."""
    metrics = getattr(app.state, "metrics", None)
    if metrics is not None:
        metrics.errors.labels(error).inc()


def _count(request: Request, error: str) -> None:
    count_error(request.app, error)


def error_response(status: int, error: str, description: str) -> JSONResponse:
    """An RFC 6749 §5.2 error body with ``no-store`` caching."""
    return JSONResponse({"error": error, "error_description": description}, status_code=status, headers=NO_STORE)


def broker_error_response(exc: BrokerError) -> JSONResponse:
    """The answer to a :class:`BrokerError`: its JSON, status and headers (503 adds ``Retry-After``)."""
    headers = dict(NO_STORE)
    if exc.status == 503:
        headers["Retry-After"] = "1"
    headers.update(getattr(exc, "http_headers", {}))  # e.g. DPoP-Nonce (RFC 9449 §8)
    challenge = getattr(exc, "www_authenticate", None)
    if challenge is not None:
        headers["WWW-Authenticate"] = challenge
    return JSONResponse(exc.to_json(), status_code=exc.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception to a precise JSON error; unexpected ones to a bare 500."""

    @app.exception_handler(BrokerError)
    async def _broker_error(request: Request, exc: BrokerError) -> JSONResponse:
        _count(request, exc.code)
        return broker_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "body", "path"))
        message = str(first.get("msg", "invalid value"))
        _count(request, "invalid_request")
        return error_response(400, "invalid_request", f"{where}: {message}" if where else message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "invalid_request" if exc.status_code < 500 else "server_error")
        _count(request, code)
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Log the type only: exception text may carry request data.
        log.error("unexpected %s on %s %s", type(exc).__name__, request.method, request.url.path)
        _count(request, "server_error")
        return error_response(500, "server_error", "internal error; nothing was issued")
