"""W3C Trace Context (https://www.w3.org/TR/trace-context/): the trace a request belongs to.

A chatbot backend that traces its work sends ``traceparent``; the broker continues that trace, so
prompt -> decision -> credential -> downstream call can be followed from the caller's trace to the
ledger entry (which records ``trace_id``) and back. Without a valid ``traceparent`` the broker
starts a new trace. Every request gets a span id of its own.

Parsing follows Trace Context Level 1 §3.2: ``version-traceid-parentid-flags``, lower-case hex only;
version ``ff`` is invalid; version ``00`` is exactly 55 characters; a later version may append
``-`` fields, which are ignored; an all-zero trace id or parent id is invalid. An invalid or
repeated header is ignored, never an error (§3.2.2.x: "the vendor MUST ignore the traceparent").
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.csprng import random_hex

if TYPE_CHECKING:
    from broker.telemetry import Spans

__all__ = [
    "TraceContext", "TraceContextMiddleware", "current_trace", "current_trace_id", "parse_traceparent"]

_TRACEPARENT_RE = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_MAX_HEADER = 512


@dataclass(frozen=True, slots=True)
class TraceContext:
    """The trace of one request: ``trace_id`` (32 hex), this request's ``span_id`` (16 hex), the
    caller's ``parent_id`` when it sent one, and whether the caller sampled the trace."""

    trace_id: str
    span_id: str
    parent_id: str | None = None
    sampled: bool = False

    @classmethod
    def start(cls, traceparent: list[str] | str | None = None) -> TraceContext:
        """Continue the caller's trace if ``traceparent`` is one valid header, else start a new one."""
        values = [traceparent] if isinstance(traceparent, str) else list(traceparent or [])
        parsed = parse_traceparent(values[0]) if len(values) == 1 else None
        fresh = random_hex(24)  # the span id and, if new, the trace id
        span_id = fresh[:16]
        if parsed is None:
            return cls(trace_id=fresh[16:], span_id=span_id)
        trace_id, parent_id, flags = parsed
        return cls(trace_id=trace_id, span_id=span_id, parent_id=parent_id, sampled=bool(flags & 1))

    @property
    def traceparent(self) -> str:
        """This request's span as a ``traceparent`` value, for calls the broker makes on its behalf."""
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"


def parse_traceparent(value: str) -> tuple[str, str, int] | None:
    """``(trace_id, parent_id, flags)`` of a valid ``traceparent`` header value, else ``None``."""
    if not isinstance(value, str) or len(value) > _MAX_HEADER:
        return None
    match = _TRACEPARENT_RE.fullmatch(value.strip(" \t"))
    if match is None:
        return None
    version, trace_id, parent_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    return trace_id, parent_id, int(flags, 16)


#: The trace of the request being served (set by the API's middleware; ``None`` outside a request).
current_trace: ContextVar[TraceContext | None] = ContextVar("nhi_broker_trace", default=None)


class TraceContextMiddleware:
    """ASGI middleware: every HTTP request runs in its :class:`TraceContext` (``current_trace``).

    The response carries ``traceresponse`` (Trace Context Level 2) naming the broker's span, so a
    caller that sent no ``traceparent`` still learns the trace id its ledger entry records. With
    OpenTelemetry configured (:mod:`broker.telemetry`) the request is a server span and the trace
    context is that span's.
    """

    def __init__(self, app: ASGIApp, spans: Spans | None = None) -> None:
        self.app = app
        self.spans = spans

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        values = [v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"traceparent"]
        # Without spans of its own (a middleware stack built apart from create_app), the app's.
        spans = self.spans if self.spans is not None else getattr(getattr(scope.get("app"), "state", None),
                                                                   "spans", None)
        if spans is None or not spans.enabled:
            await self._serve(TraceContext.start(values), scope, receive, send)
            return
        with spans.request(values, scope.get("method", "")) as span:
            statuses: list[int] = []
            try:
                await self._serve(span.trace, scope, receive, send, statuses.append)
            finally:
                route = getattr(scope.get("route"), "path", None)  # the template, never the ids in the path
                span.finish(statuses[-1] if statuses else 500, route if isinstance(route, str) else None)

    async def _serve(self, trace: TraceContext, scope: Scope, receive: Receive, send: Send,
                     on_status: Callable[[int], None] | None = None) -> None:
        token = current_trace.set(trace)
        header = (b"traceresponse", trace.traceparent.encode("ascii"))

        async def send_with_trace(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), header]}
                if on_status is not None:
                    on_status(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_with_trace)
        finally:
            current_trace.reset(token)


def current_trace_id() -> str | None:
    """The trace id of the request being served (what its ledger entries record), else ``None``."""
    trace = current_trace.get()
    return trace.trace_id if trace is not None else None
