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


@pytest.mark.parametrize(("target", "logged"), [
    ("/healthz", "/healthz"),
    ("/healthz?access_token=eyJhbGciOi.x.y", "/healthz?access_token="),
    ("/v1/ledger/entries?start=0&end=12", "/v1/ledger/entries?start=0&end=12"),
    ("/p?token=abc&size=5&secret=1e3", "/p?token=&size=5&secret="),
    ("/p?a=%65yJ", "/p?a="),
    ("/p?", "/p"),
    ("/p?n=" + "9" * 21, "/p?n="),  # a number longer than any size or index is not kept
])
def test_query_values_are_cut_from_access_lines(target: str, logged: str) -> None:
    from broker.logs import redact_target

    assert redact_target(target) == logged


def test_access_records_in_json_have_their_fields_and_no_query_values() -> None:
    # The handler is built from the process configuration's own parts and fed uvicorn's access record
    # directly: the process-wide logging state that earlier tests leave behind plays no part (a real
    # two-worker serve is checked end to end in tests/ops/test_observability.py).
    from broker.logs import RedactQueryStrings, logging_config

    config = logging_config("json")
    assert config["formatters"]["broker"] == {"()": "broker.logs.JsonFormatter"}
    assert config["handlers"]["stderr"]["filters"] == ["redact"]
    assert config["filters"]["redact"] == {"()": "broker.logs.RedactQueryStrings"}
    assert config["root"]["handlers"] == ["stderr"]
    assert config["loggers"]["uvicorn.access"] == {"handlers": [], "propagate": True}
    assert config["loggers"]["httpx"] == {"level": "WARNING"}  # its INFO lines carry webhook URLs
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactQueryStrings())
    handler.handle(logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                                     ("127.0.0.1:5", "GET", "/healthz?access_token=SECRET", "1.1", 200), None))
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert "SECRET" not in line and record["url_path"] == "/healthz?access_token="
    assert record["http_method"] == "GET" and record["status"] == 200 and record["client"] == "127.0.0.1:5"


def test_otel_request_span_is_the_trace_context_and_a_child_of_the_caller() -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from broker.telemetry import OtelSpans

    exported = InMemorySpanExporter()
    spans = OtelSpans("http://127.0.0.1:9/v1/traces", exporter=exported)
    app = FastAPI()
    app.state.spans = spans  # the middleware has none of its own: it takes the app's
    app.add_middleware(TraceContextMiddleware)

    @app.get("/t/{item}")
    async def t(item: str) -> dict[str, str | None]:
        with spans.span("policy") as step:
            step.set("nhi.rule", "r1")
        trace = current_trace.get()
        assert trace is not None
        return {"trace_id": trace.trace_id, "span_id": trace.span_id}

    r = TestClient(app).get("/t/secret-looking-id", headers={"traceparent": VALID})
    spans.shutdown()
    server, step = sorted(exported.get_finished_spans(), key=lambda s: s.kind.value, reverse=True)
    assert r.json()["trace_id"] == f"{server.context.trace_id:032x}" == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert r.json()["span_id"] == f"{server.context.span_id:016x}"
    assert r.headers["traceresponse"] == f"00-4bf92f3577b34da6a3ce929d0e0e4736-{r.json()['span_id']}-01"
    assert server.parent is not None and f"{server.parent.span_id:016x}" == "00f067aa0ba902b7"
    assert server.name == "GET /t/{item}" and server.attributes["http.route"] == "/t/{item}"  # never the id
    assert step.name == "nhi_broker.policy" and step.parent.span_id == server.context.span_id
    assert step.attributes["nhi.rule"] == "r1"


def test_no_spans_is_one_shared_no_op() -> None:
    from broker.telemetry import NO_SPANS

    first, second = NO_SPANS.span("attest"), NO_SPANS.span("policy")
    assert first is second and not NO_SPANS.enabled
    with first as span:
        span.set("nhi.rule", "r1")
