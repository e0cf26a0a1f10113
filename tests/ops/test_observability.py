"""Observability of a real ``nhi-broker serve``: JSON logs, W3C trace context in the ledger, OTLP traces.

- ``--log-format json`` (here through ``NHI_BROKER_LOG_FORMAT``) makes every line of every process
  (the start, each uvicorn worker, access lines) one JSON object; a request's lines carry its trace
  id; and no token or secret the broker was sent or issued appears in any line.
- The trace id of a request is recorded in the ledger entry it writes (issuance, denial, approval,
  revocation), equal to the one the response's ``traceresponse`` names and the caller's
  ``traceparent`` carried; the SDK sends it and keeps it.
- With ``otlp_endpoint``, the broker exports OpenTelemetry spans over OTLP/HTTP to a receiver run
  by the test (decoding ``ExportTraceServiceRequest`` with opentelemetry-proto): the spans' trace id
  is the ledger entry's and the traceresponse's, and no exported byte is a token.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from nhi_broker_client import BrokerClient
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from broker.attest.dev import DevIssuer
from broker.clock import SystemClock
from tests.helpers import SUPPORT, LiveBroker, delegated_form, dev_user, exchange_form, form_body, intent

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
ORDER = "customers/c-42/orders/ord-1001"


def _traceparent() -> tuple[str, str, str]:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{parent_id}-01", trace_id, parent_id


def _trace_of(response: httpx.Response) -> tuple[str, str]:
    """(trace id, broker span id) of a response's ``traceresponse``."""
    version, trace_id, span_id, _flags = response.headers["traceresponse"].split("-")
    assert version == "00"
    return trace_id, span_id


def _entries(url: str) -> list[dict[str, Any]]:
    size = int(httpx.get(url + "/v1/ledger/checkpoint").text.splitlines()[1])
    body = httpx.get(url + "/v1/ledger/entries", params={"start": 0, "end": size}).json()
    return [{**e["entry"], "_index": e["index"], "_leaf_hash": e["leaf_hash"]} for e in body["entries"]]


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def test_json_logs_of_every_process_carry_the_trace_and_never_a_token(tmp_path: Path) -> None:
    admin, approver, rs_secret = (secrets.token_urlsafe(32) for _ in range(3))
    config = tmp_path / "broker.toml"
    config.write_text(
        f'[[operators]]\nname = "ops-lead"\nrole = "admin"\ntoken_sha256 = "{_hash(admin)}"\n'
        f'[[operators]]\nname = "april"\nrole = "approver"\ntoken_sha256 = "{_hash(approver)}"\n'
        'groups = ["refund-approvers"]\n'
        f'[[introspection_clients]]\nclient_id = "orders-api"\nsecret_sha256 = "{_hash(rs_secret)}"\n'
        'audiences = ["orders-api"]\n'
    )
    broker = LiveBroker(tmp_path / "data", workers=2, config=config, env={"NHI_BROKER_LOG_FORMAT": "json"},
                        args=["--access-log"])
    sent: list[str] = [admin, approver, rs_secret]  # every secret and token that crossed the wire
    issuer = DevIssuer.load_or_create(tmp_path / "data")

    def identity(spiffe_id: str = SUPPORT) -> str:
        token = issuer.mint(spiffe_id, "nhi-broker", ttl=300, clock=SystemClock())
        sent.append(token)
        return token

    def customer() -> str:  # the verified end user a refund is for (the sample refund rules need one)
        token = dev_user(tmp_path / "data")
        sent.append(token)
        return token

    try:
        with httpx.Client(base_url=broker.url) as http:
            def exchange(details: str, audience: str, traceparent: str | None = None,
                         spiffe_id: str = SUPPORT) -> httpx.Response:
                headers = {**FORM, **({"traceparent": traceparent} if traceparent else {})}
                form = (delegated_form(customer(), identity(spiffe_id), audience, details)  # refunds: for c-42
                        if audience == "payments-api" else exchange_form(identity(spiffe_id), audience, details))
                return http.post("/v1/token", headers=headers, content=form_body(form))

            # An issuance in the caller's trace: the broker continues it and names its own span.
            tp1, trace1, _ = _traceparent()
            issued = exchange(intent("orders.read", ORDER, customer="c-42"), "orders-api", tp1)
            assert issued.status_code == 200, issued.text
            assert _trace_of(issued)[0] == trace1
            access_token = issued.json()["access_token"]
            sent.append(access_token)
            # Without traceparent the broker starts a trace and still says which.
            started = exchange(intent("orders.read", ORDER, customer="c-42"), "orders-api")
            assert started.status_code == 200
            sent.append(started.json()["access_token"])
            # A denial (500 EUR matches no rule).
            tp2, trace2, _ = _traceparent()
            denied = exchange(intent("payments.refund", ORDER, customer="c-42", amount=500, currency="EUR"),
                              "payments-api", tp2)
            assert denied.status_code == 403 and _trace_of(denied)[0] == trace2
            # Held for review in one trace, approved by a person: the approval entry joins the held trace.
            tp4, trace4, _ = _traceparent()
            held = exchange(intent("payments.refund", ORDER, customer="c-42", amount=120, currency="EUR"),
                            "payments-api", tp4)
            assert held.status_code == 200 and "auth_req_id" in held.json(), held.text
            # (auth_req_id is no credential: a poll needs the workload's own fresh identity. It is in the
            # approvers' URLs, so in access lines.)
            auth_req_id = held.json()["auth_req_id"]
            approved = http.post(f"/v1/admin/approvals/{auth_req_id}/approve", json={"reason": "customer called"},
                                 headers={"Authorization": f"Bearer {approver}"})
            assert approved.status_code == 200, approved.text
            # The SDK: the prompt's traceparent goes to the broker; the token keeps the broker's span.
            tp3, trace3, _ = _traceparent()
            with BrokerClient(broker.url, identity, traceparent=tp3) as client:
                token = client.get_token("orders-api", "orders.read", ORDER, {"customer": "c-42"})
                sent.append(token.access_token)
                assert token.trace_id == trace3
                downstream = token.headers("GET", "https://orders.example/x")
                assert downstream["traceparent"] == token.traceparent and token.traceparent is not None
                sent.append(downstream["DPoP"])
            # Tokens where a careless client puts them: a query string, a wrong admin header.
            assert http.get("/healthz", params={"access_token": access_token}).status_code == 200
            bad_admin = secrets.token_urlsafe(32)
            sent.append(bad_admin)
            assert http.get("/v1/admin/workloads", headers={"Authorization": f"Bearer {bad_admin}"}).status_code == 401
            assert http.get("/v1/admin/workloads", headers={"Authorization": f"Bearer {admin}"}).status_code == 200
            # A resource server introspects, then revokes (RFC 7009): a revocation entry in its trace.
            basic = ("orders-api", rs_secret)
            assert http.post("/v1/introspect", data={"token": access_token}, auth=basic).json()["active"] is True
            tp5, trace5, _ = _traceparent()
            revoked = http.post("/v1/revoke", data={"token": access_token}, auth=basic, headers={"traceparent": tp5})
            assert revoked.status_code == 200
        entries = _entries(broker.url)
    finally:
        output = broker.stop()

    by_trace = {e.get("trace_id"): e for e in entries}
    assert by_trace[trace1]["kind"] == "issuance" and by_trace[trace2]["kind"] == "denial"
    assert by_trace[trace3]["kind"] == "issuance" and by_trace[trace5]["kind"] == "revocation"
    assert by_trace[_trace_of(started)[0]]["kind"] == "issuance"
    approval = [e for e in entries if e["kind"] == "approval"]
    assert len(approval) == 1 and approval[0]["trace_id"] == trace4
    # Entries written outside a request (the start) have no trace id, exactly as before the member.
    assert all("trace_id" not in e for e in entries if e["kind"] in ("policy_load", "key_rotation"))

    lines = output.splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    # Nothing but the start banner is anything else than a JSON object.
    assert all(line.startswith(("{", "nhi-broker ", "  ")) for line in lines), [
        line for line in lines if not line.startswith(("{", "nhi-broker ", "  "))]
    workers = {r["pid"] for r in records if r["logger"] == "uvicorn.error" and
               r["message"].startswith("Started server process")}
    assert len(workers) == 2, workers  # each worker process logs in JSON
    assert any(r["logger"] == "nhi_broker.pipeline" and r.get("trace_id") == trace1 for r in records)
    access = [r for r in records if r["logger"] == "uvicorn.access"]
    assert {r["pid"] for r in access} <= workers
    token_posts = [r for r in access if r["url_path"] == "/v1/token"]
    assert {trace1, trace2, trace3, trace4} <= {r["trace_id"] for r in token_posts}
    assert any(r["url_path"] == "/healthz?access_token=" for r in access)
    # The point of it all: no secret, token or proof in any line, nor a JWT's signature alone.
    for value in sent:
        assert value not in output
        if value.count(".") == 2:
            assert value.rsplit(".", 1)[1] not in output


# -- OpenTelemetry -----------------------------------------------------------------------------------


class _Receiver:
    """An OTLP/HTTP traces receiver (protobuf): keeps each request's raw bytes and its decoded spans."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                with receiver.lock:
                    receiver.bodies.append(body)
                    for resource_spans in request.resource_spans:
                        service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                        for scope_spans in resource_spans.scope_spans:
                            for span in scope_spans.spans:
                                receiver.spans.append(_span_dict(span, service))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, trace_id: str, names: set[str], timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                found = [s for s in self.spans if s["trace_id"] == trace_id]
            if names <= {s["name"] for s in found}:
                return found
            time.sleep(0.1)
        raise AssertionError(f"spans of {trace_id} not exported: {[s['name'] for s in found]}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def _span_dict(span: Any, service: dict[str, str]) -> dict[str, Any]:
    attributes: dict[str, Any] = {}
    for a in span.attributes:
        kind = a.value.WhichOneof("value")
        attributes[a.key] = getattr(a.value, kind) if kind else None
    return {"name": span.name, "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
            "parent": span.parent_span_id.hex(), "kind": span.kind, "attributes": attributes,
            "status": span.status.code, "service": service.get("service.name")}


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    live = _Receiver()
    try:
        yield live
    finally:
        live.close()


def test_otlp_spans_share_the_trace_id_of_the_ledger_entry_and_the_traceresponse(
    tmp_path: Path, receiver: _Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # export within 0.1 s rather than 5 s
    broker = LiveBroker(tmp_path / "data", env={"NHI_BROKER_OTLP_ENDPOINT": receiver.url})
    issuer = DevIssuer.load_or_create(tmp_path / "data")
    sent: list[str] = []

    def identity(spiffe_id: str = SUPPORT) -> str:
        token = issuer.mint(spiffe_id, "nhi-broker", ttl=300, clock=SystemClock())
        sent.append(token)
        return token

    def customer() -> str:  # the verified end user a refund is for (the sample refund rules need one)
        token = dev_user(tmp_path / "data")
        sent.append(token)
        return token

    try:
        with httpx.Client(base_url=broker.url) as http:
            def exchange(details: str, audience: str, traceparent: str | None = None,
                         spiffe_id: str = SUPPORT) -> httpx.Response:
                headers = {**FORM, **({"traceparent": traceparent} if traceparent else {})}
                form = (delegated_form(customer(), identity(spiffe_id), audience, details)  # refunds: for c-42
                        if audience == "payments-api" else exchange_form(identity(spiffe_id), audience, details))
                return http.post("/v1/token", headers=headers, content=form_body(form))

            tp1, trace1, parent1 = _traceparent()
            issued = exchange(intent("orders.read", ORDER, customer="c-42"), "orders-api", tp1)
            assert issued.status_code == 200, issued.text
            sent.append(issued.json()["access_token"])
            receipt = issued.json()["receipt"]
            started = exchange(intent("orders.read", ORDER, customer="c-42"), "orders-api")
            assert started.status_code == 200
            sent.append(started.json()["access_token"])
            tp2, trace2, _ = _traceparent()
            denied = exchange(intent("payments.refund", ORDER, customer="c-42", amount=500, currency="EUR"),
                              "payments-api", tp2)
            assert denied.status_code == 403
            tp3, trace3, _ = _traceparent()
            held = exchange(intent("payments.refund", ORDER, customer="c-42", amount=120, currency="EUR"),
                            "payments-api", tp3)
            assert "auth_req_id" in held.json()
            # The caller decided not to sample: the broker exports nothing of it, yet records the trace id.
            unsampled_trace = secrets.token_hex(16)
            quiet = exchange(intent("orders.read", ORDER, customer="c-42"), "orders-api",
                             f"00-{unsampled_trace}-{secrets.token_hex(8)}-00")
            assert quiet.status_code == 200 and _trace_of(quiet)[0] == unsampled_trace
            sent.append(quiet.json()["access_token"])

            steps = {"POST /v1/token", "nhi_broker.attest", "nhi_broker.policy", "nhi_broker.ledger.append",
                     "nhi_broker.mint"}
            spans = receiver.wait_for(trace1, steps)
            server = next(s for s in spans if s["name"] == "POST /v1/token")
            # The server span continues the caller's span and is the one traceresponse names.
            assert server["parent"] == parent1 and server["span_id"] == _trace_of(issued)[1]
            assert server["kind"] == 2 and server["attributes"]["http.response.status_code"] == 200  # SERVER
            assert server["service"] == "nhi-broker"
            for step in spans:
                if step is not server:
                    assert step["parent"] == server["span_id"], step
            by_name = {s["name"]: s for s in spans}
            assert by_name["nhi_broker.policy"]["attributes"]["nhi.decision"] == "allow"
            assert by_name["nhi_broker.policy"]["attributes"]["nhi.rule"] == "orders-read-own-customer"
            append = by_name["nhi_broker.ledger.append"]["attributes"]
            assert append["nhi.ledger.index"] == receipt["index"]
            assert append["nhi.ledger.leaf_hash"] == receipt["leaf_hash"]

            started_trace = _trace_of(started)[0]
            receiver.wait_for(started_trace, steps)
            denial_spans = receiver.wait_for(trace2, {"POST /v1/token", "nhi_broker.policy",
                                                      "nhi_broker.ledger.append"})
            assert {s["name"] for s in denial_spans}.isdisjoint({"nhi_broker.mint"})
            policy = next(s for s in denial_spans if s["name"] == "nhi_broker.policy")
            assert policy["attributes"]["nhi.decision"] == "deny"
            assert policy["attributes"]["nhi.error"] == "access_denied"
            receiver.wait_for(trace3, {"POST /v1/token", "nhi_broker.policy", "nhi_broker.approval.hold"})
        entries = _entries(broker.url)
    finally:
        broker.stop()

    traced = {e.get("trace_id"): e for e in entries}
    assert traced[trace1]["_leaf_hash"] == receipt["leaf_hash"]
    assert traced[started_trace]["kind"] == "issuance" and traced[trace2]["kind"] == "denial"
    assert traced[unsampled_trace]["kind"] == "issuance"
    assert not [s for s in receiver.spans if s["trace_id"] == unsampled_trace]
    # Nothing exported carries a token or a secret (the raw protobuf bytes, not only the decoded spans).
    exported = b"".join(receiver.bodies)
    assert exported
    for value in sent:
        assert value.encode() not in exported
        if value.count(".") == 2:
            assert value.rsplit(".", 1)[1].encode() not in exported
