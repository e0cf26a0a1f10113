"""W3C Trace Context parsing (vectors from the spec's examples and its invalid cases) and JSON logs."""

from __future__ import annotations

import io
import json
import logging

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from broker.logs import JsonFormatter, configure_logging
from broker.tracing import TraceContext, TraceContextMiddleware, current_trace, parse_traceparent

# Trace Context Level 1 §3.2.2.x examples.
VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(("value", "expected"), [
    (VALID, ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", 1)),
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", ("4bf92f3577b34da6a3ce929d0e0e4736",
                                                                  "00f067aa0ba902b7", 0)),
    # A later version: extra fields are ignored, the first four are read (§4.3).
    ("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future",
     ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", 1)),
    ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None),  # version ff is invalid
    ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),  # all-zero trace id
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", None),  # all-zero parent id
    ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", None),  # upper-case hex
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", None),  # version 00 is exactly 55
    ("00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", None),  # short trace id
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", None),  # no flags
    ("", None),
    ("00-" + "a" * 600, None),
])
def test_parse_traceparent(value: str, expected: tuple[str, str, int] | None) -> None:
    assert parse_traceparent(value) == expected


def test_start_continues_or_begins_a_trace() -> None:
    continued = TraceContext.start([VALID])
    assert (continued.trace_id, continued.parent_id, continued.sampled) == (
        "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", True)
    assert continued.span_id != "00f067aa0ba902b7" and len(continued.span_id) == 16
    assert continued.traceparent == f"00-4bf92f3577b34da6a3ce929d0e0e4736-{continued.span_id}-01"
    for ignored in ([], ["garbage"], [VALID, VALID]):  # absent, invalid, or repeated: a new trace
        fresh = TraceContext.start(ignored)
        assert fresh.parent_id is None and fresh.trace_id != continued.trace_id and len(fresh.trace_id) == 32


def test_middleware_sets_the_trace_for_the_request_and_answers_traceresponse() -> None:
    app = FastAPI()
    app.add_middleware(TraceContextMiddleware)

    @app.get("/t")
    async def t() -> dict[str, str | None]:
        trace = current_trace.get()
        assert trace is not None
        return {"trace_id": trace.trace_id, "parent": trace.parent_id}

    client = TestClient(app)
    r = client.get("/t", headers={"traceparent": VALID})
    assert r.json() == {"trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "parent": "00f067aa0ba902b7"}
    assert r.headers["traceresponse"].startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")
    own = client.get("/t").json()
    assert own["parent"] is None and own["trace_id"] != "4bf92f3577b34da6a3ce929d0e0e4736"
    assert current_trace.get() is None  # nothing leaks out of the request


def test_json_log_lines_carry_the_trace() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("nhi_broker.test_json")
    logger.addHandler(handler)
    logger.propagate = False
    token = current_trace.set(TraceContext.start([VALID]))
    try:
        logger.warning("denied %s", "refund", extra={"rule": "refund-eur"})
    finally:
        current_trace.reset(token)
    logger.warning("outside")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "denied refund" and first["level"] == "warning" and first["rule"] == "refund-eur"
    assert first["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736" and len(first["span_id"]) == 16
    assert first["time"].endswith("+00:00") and first["logger"] == "nhi_broker.test_json"
    assert "trace_id" not in second


def test_configure_logging_refuses_unknown_formats() -> None:
    with pytest.raises(ValueError, match="not one of text, json"):
        configure_logging("yaml")
