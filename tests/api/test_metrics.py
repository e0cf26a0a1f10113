"""GET /metrics: request counts by route and status, errors by code, ledger size; summed over workers."""

from __future__ import annotations

from pathlib import Path

import httpx
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from broker.api.app import create_app
from broker.attest.dev import DevIssuer
from broker.clock import SystemClock
from broker.config import Settings
from tests.helpers import POLICIES, SUPPORT, LiveBroker, exchange_form, form_body, intent

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
READ = intent("orders.read", "customers/c-42/orders/ord-1001", customer="c-42")
REFUND_500 = intent("payments.refund", "customers/c-42/orders/ord-1001", customer="c-42", amount=500, currency="EUR")


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def exchange(post: object, issuer: DevIssuer, details: str, audience: str) -> int:
    token = issuer.mint(SUPPORT, "nhi-broker", ttl=300, clock=SystemClock())
    response = post("/v1/token", content=form_body(exchange_form(token, audience, details)), headers=FORM)  # type: ignore[operator]
    return int(response.status_code)


def test_metrics_count_outcomes_in_process(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", policies_dir=POLICIES)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        issuer = DevIssuer.load_or_create(settings.data_dir)
        assert exchange(client.post, issuer, READ, "orders-api") == 200
        assert exchange(client.post, issuer, READ, "orders-api") == 200
        assert exchange(client.post, issuer, REFUND_500, "payments-api") == 403
        assert client.post("/v1/token", content=b"x", headers={"Content-Type": "text/plain"}).status_code == 415
        assert client.get("/no/such/path").status_code == 404
        size = int(client.get("/v1/ledger/checkpoint").text.splitlines()[1])
        r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    found = samples(r.text)
    route = "/v1/token"
    assert value(found, "nhi_broker_http_requests_total", route=route, method="POST", status="200") == 2
    assert value(found, "nhi_broker_http_requests_total", route=route, method="POST", status="403") == 1
    assert value(found, "nhi_broker_http_requests_total", route=route, method="POST", status="415") == 1
    assert value(found, "nhi_broker_http_requests_total", route="unmatched", method="GET", status="404") == 1
    assert value(found, "nhi_broker_errors_total", error="access_denied") == 1
    assert value(found, "nhi_broker_http_request_duration_seconds_count", route=route) == 4
    assert value(found, "nhi_broker_ledger_entries") == size
    assert value(found, "nhi_broker_policy_info", version=_policy_version(client)) == 1
    # No request data in any label: no token, no path outside the route templates.
    assert "c-42" not in r.text and "eyJ" not in r.text and "/no/such/path" not in r.text


def _policy_version(client: TestClient) -> str:
    return str(client.app.state.runtime.policies.version)  # type: ignore[attr-defined]


def test_metrics_sum_over_worker_processes(tmp_path: Path) -> None:
    broker = LiveBroker(tmp_path / "data", workers=2)
    metrics_dir = tmp_path / "data" / "metrics"

    def workers_that_served() -> set[str]:
        # Each worker writes counter_<pid>.db on its first counted request.
        return {p.stem.split("_")[-1] for p in metrics_dir.glob("counter_*.db")}

    try:
        issuer = DevIssuer.load_or_create(tmp_path / "data")
        # A new connection per request, so the kernel spreads them over both workers; keep going
        # until both have served some (the sums below are then sums over two processes).
        with httpx.Client(base_url=broker.url, limits=httpx.Limits(max_keepalive_connections=0)) as http:
            codes = [exchange(http.post, issuer, REFUND_500, "payments-api") for _ in range(5)]
            while len(workers_that_served()) < 2 and len(codes) < 400:
                codes.append(exchange(http.post, issuer, READ, "orders-api"))
            assert len(workers_that_served()) == 2, "the kernel never handed the second worker a connection"
            assert codes.count(403) == 5 and codes.count(200) == len(codes) - 5
            size = int(http.get("/v1/ledger/checkpoint").text.splitlines()[1])
            # Whichever worker answers, it reports the sum over both.
            for _ in range(4):
                found = samples(http.get("/metrics").text)
                assert value(found, "nhi_broker_http_requests_total", route="/v1/token", method="POST",
                             status="200") == len(codes) - 5
                assert value(found, "nhi_broker_errors_total", error="access_denied") == 5
                assert value(found, "nhi_broker_ledger_entries") == size
    finally:
        broker.stop()
