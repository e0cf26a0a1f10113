"""W3C Trace Context for the SDK: the ``traceparent`` of an exchange and of a call made with its token.

The chatbot's trace continues through the broker: an exchange carries the ``traceparent`` the
caller gave (a string, or a callable asked per exchange), else the current OpenTelemetry span's
when ``opentelemetry-api`` is installed and a span is active (the SDK does not depend on it). The
broker answers ``traceresponse`` naming its own span in that trace, which :class:`TaskToken` keeps:
the ledger entry of the token records the same trace id.
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = ["TraceparentSource", "current_otel_traceparent", "outgoing_traceparent", "parse_traceresponse"]

TraceparentSource = str | Callable[[], str | None] | None
_TRACEPARENT = re.compile(r"00-(?!0{32})([0-9a-f]{32})-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")


def current_otel_traceparent() -> str | None:
    """The active OpenTelemetry span as a ``traceparent``, or ``None`` (no span, or no opentelemetry)."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def outgoing_traceparent(source: TraceparentSource) -> str | None:
    """The ``traceparent`` to send: ``source`` (or what it returns), else the active OpenTelemetry span's.

    Raises ``ValueError`` for a given value that is not a version-00 ``traceparent``: a typo would
    otherwise be ignored by the receiver and the trace silently broken.
    """
    value = source() if callable(source) else source
    if value is None:
        return current_otel_traceparent()
    if not isinstance(value, str) or _TRACEPARENT.fullmatch(value) is None:
        raise ValueError("traceparent must be a W3C version-00 traceparent: 00-<32 hex>-<16 hex>-<2 hex>")
    return value


def parse_traceresponse(value: str | None) -> str | None:
    """The broker's ``traceresponse`` if it is a valid version-00 value, else ``None``."""
    if value is None or _TRACEPARENT.fullmatch(value) is None:
        return None
    return value
