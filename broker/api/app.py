"""The HTTP service: ``create_app(settings)`` builds a FastAPI app around a :class:`Runtime`."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from broker import __version__, heap
from broker.affinity import claim_cpu
from broker.api.errors import install_error_handlers
from broker.api.routes import admin, approvals, health, introspect, ledger, metrics, token, wellknown
from broker.api.routes.credentials import router as credentials_router
from broker.api.signals import install_sighup
from broker.api.token_lane import BrokerApp
from broker.clock import Clock
from broker.config import Settings
from broker.console import router as console_router
from broker.looplag import LoopLagMonitor
from broker.metrics import BrokerMetrics, MetricsMiddleware
from broker.runtime import Runtime
from broker.telemetry import spans_from_settings
from broker.tls import ServerTls
from broker.tracing import TraceContextMiddleware

__all__ = ["SETTINGS_ENV", "app_from_environment", "create_app"]

# `nhi-broker serve` hands the exact settings to every uvicorn worker process through this variable.
SETTINGS_ENV = "NHI_BROKER_SETTINGS_JSON"


def create_app(
    settings: Settings, *, runtime: Runtime | None = None, clock: Clock | None = None, tls: ServerTls | None = None,
    serving: bool = False,
) -> FastAPI:
    """A FastAPI app for ``settings``; the runtime is opened in the lifespan unless given.

    ``tls`` is the SSL context of a broker that terminates mutual TLS itself: rotated trust bundles'
    new roots are added to it. With ``otlp_endpoint`` set, requests and the exchange's steps are
    OpenTelemetry spans (:mod:`broker.telemetry`), exported until the app shuts down.

    ``serving``: this app is the process's one app (``nhi-broker serve``): once started, what start-up
    built is frozen out of the cycle collector's walks (:mod:`broker.heap`).
    """
    spans = runtime.spans if runtime is not None else spans_from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = runtime is None
        app.state.runtime = runtime if runtime is not None else Runtime.open(settings, clock=clock, spans=spans)
        live = app.state.runtime
        app.state.metrics = BrokerMetrics(live.ledger.size, lambda: live.policies.version)
        # The loop's own health: a blocking call anywhere shows as lag in /metrics.
        lag = asyncio.create_task(LoopLagMonitor(app.state.metrics.record_loop_lag).run())
        # Requests held for review expire (and are recorded) even when nobody looks at them again.
        sweeper = None
        if live.approvals is not None:
            sweeper = asyncio.create_task(live.approvals.run_sweeper(live.settings.approvals.sweep_interval))
        # X.509 bundles follow their files without a restart (read in a worker thread).
        refresher = None
        if live.x509 is not None and live.settings.x509 is not None:
            refresher = asyncio.create_task(live.x509.run_refresher(
                live.settings.x509.refresh_interval, tls.add_roots if tls is not None else None))
        # Live changes: follow reloads led by other workers and replicas, take up rotated keys;
        # SIGHUP reloads the policy directory here (the supervisor hands it to one worker).
        syncer = asyncio.create_task(live.run_live_sync(live.settings.live_sync_interval))
        remove_sighup = install_sighup(live)
        if serving:
            heap.settle()
        try:
            yield
        finally:
            remove_sighup()
            syncer.cancel()
            lag.cancel()
            if sweeper is not None:
                sweeper.cancel()
            if refresher is not None:
                refresher.cancel()
            if owned:
                await app.state.runtime.aclose()
                # Export what is still batched (a thread join, off the loop).
                await asyncio.to_thread(spans.shutdown)

    app = BrokerApp(
        title="nhi-broker",
        version=__version__,
        summary="Workload identity and ephemeral credential broker for AI assistants",
        lifespan=lifespan,
    )
    app.state.spans = spans
    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=lambda: getattr(app.state, "metrics", None))
    # Outermost: logs, errors and ledger entries of a request all see its trace.
    app.add_middleware(TraceContextMiddleware, spans=spans)
    app.include_router(token.router)
    app.include_router(wellknown.router)
    app.include_router(credentials_router)
    app.include_router(ledger.router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(introspect.router)
    app.include_router(admin.router)
    app.include_router(approvals.router)
    app.include_router(console_router)
    app.enable_token_lane()
    return app


def app_from_environment() -> FastAPI:
    """uvicorn factory for worker processes: settings come from ``$NHI_BROKER_SETTINGS_JSON``."""
    settings = Settings.model_validate_json(os.environ[SETTINGS_ENV])
    if settings.worker_cpu_affinity == "on":  # before the app starts its storage threads
        claim_cpu(settings.data_dir, settings.workers)
    return create_app(settings, serving=True)
