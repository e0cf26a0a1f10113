"""OpenTelemetry traces of the exchange, exported over OTLP/HTTP (optional: the ``[otel]`` extra).

With ``otlp_endpoint`` set, every HTTP request is a server span (a child of the caller's
``traceparent`` when it sent one) and the exchange's steps are its children: ``attest``,
``policy``, ``approval.hold``, ``mint``, ``vault.issue`` and ``ledger.append``. The trace id of
those spans is the one the response's ``traceresponse`` names and the ledger entry records
(:mod:`broker.tracing`), so a trace leads to its entry and an entry to its trace.

Span attributes are identifiers and decisions, what the ledger itself records (workload name,
action, audience, rule, effect, error code, credential kind and ``jti``, ledger index and leaf
hash): never a token, a secret, an identity token's claims or an error's free text.

Without ``otlp_endpoint`` nothing of OpenTelemetry is imported and :data:`NO_SPANS` is used: each
step costs one call returning a shared no-op context manager.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, Protocol

from broker import __version__
from broker.errors import BrokerError, ConfigError
from broker.tracing import TraceContext, parse_traceparent

if TYPE_CHECKING:
    from broker.config import Settings

__all__ = ["NO_SPANS", "OTEL_EXTRA", "Span", "Spans", "require_exporter", "spans_from_settings"]

OTEL_EXTRA = "pip install 'nhi-broker[otel]'"
AttributeValue = str | int | bool


class Span(Protocol):
    """One step being traced: attributes may be added while it runs."""

    def set(self, key: str, value: AttributeValue) -> None: ...


class Spans(Protocol):
    """Where the broker's steps are traced (:data:`NO_SPANS`, or OpenTelemetry)."""

    enabled: bool

    def span(self, name: str) -> AbstractContextManager[Span]: ...

    def request(self, traceparent: Sequence[str], method: str) -> AbstractContextManager[RequestSpan]: ...

    def shutdown(self) -> None: ...


class RequestSpan(Protocol):
    """The server span of one HTTP request: its :class:`TraceContext` and its outcome."""

    trace: TraceContext

    def set(self, key: str, value: AttributeValue) -> None: ...

    def finish(self, status: int, route: str | None) -> None: ...


class _NoSpan:
    __slots__ = ()

    def set(self, key: str, value: AttributeValue) -> None:
        pass

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class _NoSpans:
    """Tracing off: a shared no-op span, and a request's trace from :meth:`TraceContext.start`."""

    enabled = False
    _span = _NoSpan()

    def span(self, name: str) -> _NoSpan:
        return self._span

    @contextmanager
    def request(self, traceparent: Sequence[str], method: str) -> Iterator[RequestSpan]:
        yield _PlainRequest(TraceContext.start(list(traceparent)))

    def shutdown(self) -> None:
        pass


class _PlainRequest:
    __slots__ = ("trace",)

    def __init__(self, trace: TraceContext) -> None:
        self.trace = trace

    def set(self, key: str, value: AttributeValue) -> None:
        pass

    def finish(self, status: int, route: str | None) -> None:
        pass


#: Tracing off (no ``otlp_endpoint``).
NO_SPANS: Spans = _NoSpans()


class _OtelSpan:
    __slots__ = ("_span",)

    def __init__(self, span: Any) -> None:
        self._span = span

    def set(self, key: str, value: AttributeValue) -> None:
        self._span.set_attribute(key, value)


class _OtelRequest:
    __slots__ = ("_span", "trace")

    def __init__(self, span: Any, trace: TraceContext) -> None:
        self._span = span
        self.trace = trace

    def set(self, key: str, value: AttributeValue) -> None:
        self._span.set_attribute(key, value)

    def finish(self, status: int, route: str | None) -> None:
        from opentelemetry.trace import Status, StatusCode

        self._span.set_attribute("http.response.status_code", status)
        if route is not None:
            self._span.set_attribute("http.route", route)
            self._span.update_name(f"{self._span.name} {route}")
        if status >= 500:
            self._span.set_status(Status(StatusCode.ERROR))


class OtelSpans:
    """OpenTelemetry spans, batched to an OTLP/HTTP endpoint (the exporter honours the standard
    ``OTEL_EXPORTER_OTLP_TRACES_HEADERS`` / ``OTEL_BSP_*`` environment variables)."""

    enabled = True

    def __init__(self, endpoint: str, *, exporter: Any = None) -> None:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            raise ConfigError(f"otlp_endpoint needs the OpenTelemetry SDK and OTLP exporter: {OTEL_EXTRA}") from None
        resource = Resource.create({"service.name": "nhi-broker", "service.version": __version__})
        # Not the global provider: the broker's spans go where its settings say, whatever else the
        # process (a test, an embedding application) configured.
        self._provider = TracerProvider(resource=resource)
        self._provider.add_span_processor(BatchSpanProcessor(exporter or OTLPSpanExporter(endpoint=endpoint)))
        self._tracer = self._provider.get_tracer("nhi_broker", __version__)

    @contextmanager
    def span(self, name: str) -> Iterator[Span]:
        with self._tracer.start_as_current_span(
            f"nhi_broker.{name}", record_exception=False, set_status_on_exception=False
        ) as span:
            try:
                yield _OtelSpan(span)
            except BrokerError as exc:
                _failed(span, exc.code)
                raise
            except BaseException as exc:
                _failed(span, type(exc).__name__)
                raise

    @contextmanager
    def request(self, traceparent: Sequence[str], method: str) -> Iterator[RequestSpan]:
        from opentelemetry import trace
        from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

        parsed = parse_traceparent(traceparent[0]) if len(traceparent) == 1 else None
        parent_ctx = None
        if parsed is not None:
            trace_id, parent_id, flags = parsed
            remote = SpanContext(trace_id=int(trace_id, 16), span_id=int(parent_id, 16), is_remote=True,
                                 trace_flags=TraceFlags(flags & 0xFF))
            parent_ctx = trace.set_span_in_context(NonRecordingSpan(remote))
        with self._tracer.start_as_current_span(
            method, context=parent_ctx, kind=SpanKind.SERVER, record_exception=False,
            attributes={"http.request.method": method},
        ) as span:
            ctx = span.get_span_context()
            current = TraceContext(trace_id=format(ctx.trace_id, "032x"), span_id=format(ctx.span_id, "016x"),
                                   parent_id=parsed[1] if parsed else None, sampled=ctx.trace_flags.sampled)
            yield _OtelRequest(span, current)

    def shutdown(self) -> None:
        """Export what is still batched, then stop."""
        self._provider.shutdown()


def _failed(span: Any, code: str) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("nhi.error", code)
    span.set_status(Status(StatusCode.ERROR, code))


def require_exporter(settings: Settings) -> None:
    """Raise :class:`ConfigError` when ``otlp_endpoint`` is set but the ``[otel]`` extra is missing
    (``serve`` checks before it binds, ``config check`` reports it)."""
    if settings.otlp_endpoint is None:
        return
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        raise ConfigError(f"otlp_endpoint needs the OpenTelemetry SDK and OTLP exporter: {OTEL_EXTRA}") from None


def spans_from_settings(settings: Settings) -> Spans:
    """OpenTelemetry spans when ``otlp_endpoint`` is set, else :data:`NO_SPANS`."""
    if settings.otlp_endpoint is None:
        return NO_SPANS
    return OtelSpans(settings.otlp_endpoint)
