"""Prometheus metrics: request counts and latency by route, errors by RFC 6749 code, ledger size.

One :class:`BrokerMetrics` per app. With several worker processes, ``nhi-broker serve`` points
``PROMETHEUS_MULTIPROC_DIR`` at ``<data_dir>/metrics`` before the workers start; every worker then
writes its counters there and any worker's ``/metrics`` answers the sum over all of them. Values
that every process can read for itself (ledger size, policy version) are computed at scrape time.
Labels never carry request data: routes are path templates, errors are RFC 6749 codes.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from broker import __version__

__all__ = ["CONTENT_TYPE_LATEST", "MULTIPROC_ENV", "BrokerMetrics", "MetricsMiddleware", "prepare_multiprocess_dir"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Exchanges take milliseconds; the tail that matters is the ledger's fsync and backend timeouts.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Event-loop lag: a healthy loop stays in the first buckets; 0.05 s is the bound the tests hold it to.
_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def prepare_multiprocess_dir(data_dir: Path) -> Path:
    """Empty ``<data_dir>/metrics`` and export it for the worker processes about to start.

    Call before the first worker imports :mod:`prometheus_client`: the library picks its value
    store at import time. Files of a previous run are removed, so counters start from zero.
    """
    path = data_dir / "metrics"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, mode=0o700)
    os.environ[MULTIPROC_ENV] = str(path)
    return path


class _LiveValues(Collector):
    """Values read at scrape time: ledger size, the serving policy version, the broker version."""

    def __init__(self, ledger_size: Callable[[], int], policy_version: Callable[[], str]) -> None:
        self._ledger_size = ledger_size
        self._policy_version = policy_version

    def collect(self) -> Iterator[Any]:
        info = InfoMetricFamily("nhi_broker_build", "The running nhi-broker")
        info.add_metric([], {"version": __version__})
        yield info
        policy = InfoMetricFamily("nhi_broker_policy", "The intent-policy set being served")
        policy.add_metric([], {"version": self._policy_version()})
        yield policy
        try:
            size = float(self._ledger_size())
        except Exception:  # an unavailable ledger shows as NaN, readyz says why
            size = float("nan")
        yield GaugeMetricFamily("nhi_broker_ledger_entries", "Durable ledger entries (all processes)", value=size)


class BrokerMetrics:
    """The broker's metrics, and their exposition for ``GET /metrics``."""

    def __init__(self, ledger_size: Callable[[], int], policy_version: Callable[[], str]) -> None:
        self._registry = CollectorRegistry(auto_describe=True)
        self._live = _LiveValues(ledger_size, policy_version)
        self._multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self.requests = Counter(
            "nhi_broker_http_requests", "HTTP requests by route template, method and status",
            ["route", "method", "status"], registry=self._registry,
        )
        self.latency = Histogram(
            "nhi_broker_http_request_duration_seconds", "HTTP request latency by route template",
            ["route"], buckets=_LATENCY_BUCKETS, registry=self._registry,
        )
        self.errors = Counter(
            "nhi_broker_errors", "Error answers by RFC 6749 error code", ["error"], registry=self._registry,
        )
        self.loop_lag = Histogram(
            "nhi_broker_event_loop_lag_seconds", "How late the event loop woke a timer (broker.looplag)",
            buckets=_LAG_BUCKETS, registry=self._registry,
        )
        self.loop_blocked = Histogram(
            "nhi_broker_event_loop_blocked_seconds",
            "Event-loop lag not explained by waiting for a CPU: the loop was blocked (broker.looplag)",
            buckets=_LAG_BUCKETS, registry=self._registry,
        )
        self.loop_lag_max = Gauge(
            "nhi_broker_event_loop_lag_max_seconds", "The largest event-loop lag since the process started",
            registry=self._registry, multiprocess_mode="max",
        )
        self.loop_blocked_max = Gauge(
            "nhi_broker_event_loop_blocked_max_seconds", "The longest event-loop block since the process started",
            registry=self._registry, multiprocess_mode="max",
        )
        self._lag_max = self._blocked_max = 0.0
        # The labelled children of the request metrics, by (route, method, status): a few dozen at
        # most (route templates x standard methods x the statuses the broker answers).
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        if not self._multiprocess:
            self._registry.register(self._live)

    def record_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """One served HTTP request: counted by route template, method and status, timed by route."""
        key = (route, method, status)
        children = self._request_children.get(key)
        if children is None:
            children = (self.requests.labels(route, method, str(status)), self.latency.labels(route))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def record_loop_lag(self, lag: float, blocked: float) -> None:
        """One event-loop lag sample and its blocked part (from :class:`~broker.looplag.LoopLagMonitor`)."""
        self.loop_lag.observe(lag)
        self.loop_blocked.observe(blocked)
        if lag > self._lag_max:
            self._lag_max = lag
            self.loop_lag_max.set(lag)
        if blocked > self._blocked_max:
            self._blocked_max = blocked
            self.loop_blocked_max.set(blocked)

    def exposition(self) -> bytes:
        """The Prometheus text format: this process's metrics, or every worker's in multiprocess mode."""
        if not self._multiprocess:
            return generate_latest(self._registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        registry.register(self._live)
        return generate_latest(registry)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"})


class MetricsMiddleware:
    """Pure ASGI middleware: counts and times every HTTP request by its route template."""

    def __init__(self, app: Any, metrics: Callable[[], BrokerMetrics | None]) -> None:
        self.app = app
        self._metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_and_record_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record_status)
        finally:
            metrics = self._metrics()
            if metrics is not None:
                route = scope.get("route")
                template = getattr(route, "path", None) or "unmatched"
                # The method is the client's text: only the standard ones become label values, so a
                # client inventing methods cannot grow the number of time series.
                method = scope["method"] if scope["method"] in _METHODS else "other"
                metrics.record_request(template, method, status, time.perf_counter() - start)
