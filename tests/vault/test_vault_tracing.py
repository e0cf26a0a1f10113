"""A Vault-backed issuance in one trace: the OpenTelemetry spans of the exchange (vault.issue, its
vault.mint and the ledger append) carry the trace id the issuance entry records, and no span
attribute carries the secret, against the real dev OpenBao and PostgreSQL."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from fastapi.testclient import TestClient
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from broker.api.app import create_app
from broker.attest.dev import DevIssuer
from broker.clock import SystemClock
from broker.config import Settings
from broker.runtime import Runtime
from broker.telemetry import OtelSpans
from broker.vault.devserver import DevVault
from tests.helpers import POLICIES, SUPPORT, exchange_form, form_body, intent
from tests.vault.conftest import DB_CREDS, FORM

ORDERS = intent("orders.query", "customers/c-1001/orders", customer="c-1001")


def test_vault_issuance_spans_share_the_ledger_entry_trace(tmp_path: Path, dev_vault: DevVault) -> None:
    exported = InMemorySpanExporter()
    spans = OtelSpans("http://127.0.0.1:9/v1/traces", exporter=exported)
    settings = Settings(data_dir=tmp_path / "data", policies_dir=POLICIES,
                        vault=dev_vault.settings(sweep_interval=3600))
    runtime = Runtime.open(settings, spans=spans)
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    try:
        with TestClient(create_app(settings, runtime=runtime)) as client:
            identity = DevIssuer.load_or_create(settings.data_dir).mint(SUPPORT, "nhi-broker", ttl=300,
                                                                         clock=SystemClock())
            form = exchange_form(identity, "orders-db", ORDERS, requested_token_type=DB_CREDS)
            r = client.post("/v1/token", content=form_body(form),
                            headers={**FORM, "traceparent": f"00-{trace_id}-{parent}-01"})
            assert r.status_code == 200, r.text
            body = r.json()
            client.post("/v1/credentials/release", content=form_body({"release_token": body["release_token"]}),
                        headers=FORM)
            entry = json.loads(runtime.ledger.entries(body["receipt"]["index"], body["receipt"]["index"] + 1)[0])
    finally:
        runtime.close()
        spans.shutdown()
    assert entry["kind"] == "issuance" and entry["trace_id"] == trace_id
    mine = [s for s in exported.get_finished_spans() if f"{s.context.trace_id:032x}" == trace_id]
    by_name = {s.name: s for s in mine}
    assert {"POST /v1/token", "nhi_broker.attest", "nhi_broker.policy", "nhi_broker.vault.issue",
            "nhi_broker.vault.mint", "nhi_broker.ledger.append"} <= set(by_name)
    issue = by_name["nhi_broker.vault.issue"]
    assert by_name["nhi_broker.vault.mint"].parent.span_id == issue.context.span_id
    assert by_name["nhi_broker.ledger.append"].parent.span_id == issue.context.span_id
    assert issue.attributes["nhi.credential.jti"] == body["task_id"]
    assert by_name["nhi_broker.ledger.append"].attributes["nhi.ledger.leaf_hash"] == body["receipt"]["leaf_hash"]
    assert by_name["nhi_broker.policy"].attributes["nhi.credential.kind"] == "vault-db:orders-reader;rows=customer"
    attributes = json.dumps([dict(s.attributes) for s in exported.get_finished_spans()])
    for secret in (body["access_token"], body["release_token"], identity):
        assert secret not in attributes
