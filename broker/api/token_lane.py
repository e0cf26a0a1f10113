"""``POST /v1/token`` served without the framework's per-request plumbing.

The token endpoint is the broker's hot path. Through FastAPI every request also crosses Starlette's
error and exception middlewares, the router's match over every route, dependency solving and an
exit stack: about a fifth of the CPU an exchange costs on a 2-core machine, spent before and after
the endpoint (scripts/bench_exchange.py --profile). :class:`BrokerApp` hands exactly
``POST /v1/token`` (no ``root_path``) to a :class:`TokenLane` instead, which runs:

- the same trace and metrics middlewares as every other request (``traceresponse``, the request
  counter and latency under the ``/v1/token`` route template);
- the same endpoint function (:func:`broker.api.routes.token.token`), with the app's runtime;
- the same error mapping as :func:`broker.api.errors.install_error_handlers`: a
  :class:`~broker.errors.BrokerError` becomes its RFC 6749 answer, anything else a bare 500 that is
  logged by type only and re-raised to the server, as Starlette's ``ServerErrorMiddleware`` does.

Every other method and path, and the lifespan, go through FastAPI unchanged; the route stays
registered there for the OpenAPI document.
"""

from __future__ import annotations

import logging
from typing import Any, cast

from fastapi import FastAPI
from starlette.requests import Request
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from broker.api.errors import broker_error_response, count_error, error_response
from broker.api.routes.token import router as token_routes
from broker.api.routes.token import token
from broker.errors import BrokerError
from broker.metrics import MetricsMiddleware
from broker.tracing import TraceContextMiddleware

__all__ = ["TOKEN_PATH", "BrokerApp", "TokenLane"]

log = logging.getLogger("nhi_broker.api")

TOKEN_PATH = "/v1/token"


class TokenLane:
    """The ASGI app for ``POST /v1/token`` inside :class:`BrokerApp` (see the module docstring)."""

    def __init__(self, app: FastAPI, route: BaseRoute) -> None:
        self._app = app
        self._route = route  # what the metrics middleware reads the route template from
        metered = MetricsMiddleware(self._endpoint, metrics=lambda: getattr(app.state, "metrics", None))
        self._asgi = TraceContextMiddleware(cast(ASGIApp, metered))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = self._app
        scope["route"] = self._route
        await self._asgi(scope, receive, send)

    async def _endpoint(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        try:
            response = await token(request, self._app.state.runtime)
        except BrokerError as exc:
            count_error(self._app, exc.code)
            response = broker_error_response(exc)
        except Exception as exc:
            # As the app's handler for unexpected errors: the type only, never the text.
            log.error("unexpected %s on %s %s", type(exc).__name__, scope["method"], scope["path"])
            count_error(self._app, "server_error")
            await error_response(500, "server_error", "internal error; nothing was issued")(scope, receive, send)
            raise
        await response(scope, receive, send)


class BrokerApp(FastAPI):
    """The broker's FastAPI app: ``POST /v1/token`` takes the :class:`TokenLane`, the rest FastAPI."""

    token_lane: TokenLane | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lane = self.token_lane
        if (
            lane is not None
            and scope["type"] == "http"
            and scope["path"] == TOKEN_PATH
            and scope["method"] == "POST"
            and not scope.get("root_path")
            and not self.root_path
        ):
            await lane(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    def add_middleware(self, middleware_class: Any, *args: Any, **kwargs: Any) -> None:
        """As FastAPI's; a middleware added after the lane was enabled must see every request: off."""
        self.token_lane = None
        super().add_middleware(middleware_class, *args, **kwargs)

    def enable_token_lane(self) -> None:
        """Serve ``POST /v1/token`` through the lane (called once its route is registered)."""
        route = next(r for r in token_routes.routes if getattr(r, "path", None) == TOKEN_PATH)
        self.token_lane = TokenLane(self, route)
