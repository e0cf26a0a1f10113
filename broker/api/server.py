"""The HTTP servers ``nhi-broker serve`` runs the app on: uvicorn (default) or granian (``--server granian``).

uvicorn runs :class:`~broker.api.http_server.BoundedHttpToolsProtocol`, which refuses an oversized
request head with a JSON 431. granian parses HTTP and writes responses in Rust, outside the GIL; on
the 2-core development machine it served the token exchange with about 15% less CPU per request
than uvicorn with httptools and uvloop (``scripts/bench_exchange.py --server uvicorn|granian``); it
bounds the request head by its own buffer (about 400 KiB) and answers that with its own error,
not the broker's JSON. Both get the same
app: worker processes build it from ``$NHI_BROKER_SETTINGS_JSON`` (:func:`broker.api.app.app_from_environment`)
and, with several workers, share their metrics through ``<data_dir>/metrics``.

SIGHUP reloads the policies live (:mod:`broker.api.signals`), never restarting a worker: uvicorn's
supervisor would replace every worker on SIGHUP and granian's would respawn them, so the supervisor
here hands the signal to one ready worker instead; that worker leads the reload and the others follow
through the shared state store (:mod:`broker.reload`). In-flight requests are never interrupted.

Neither server names itself in the ``Server`` header: uvicorn is told not to send one, and
:func:`granian_app` sets ``server: nhi-broker`` (granian adds its own name only when the app sends none).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
from typing import Any

from broker.config import Settings
from broker.storaged.processes import StorageProcess

__all__ = ["SERVERS", "granian_app", "run"]

SERVERS = ("uvicorn", "granian")
_SERVER_HEADER = (b"server", b"nhi-broker")


class _ServerHeader:
    """Pure ASGI: every response names the broker, not the HTTP server, in ``Server``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", ()) if h[0].lower() != b"server"]
                message = {**message, "headers": [*headers, _SERVER_HEADER]}
            await send(message)

        await self.app(scope, receive, send_with_header)


def _hand_to_worker(pids: list[int], log: Any) -> None:
    """Send SIGHUP to the first worker that takes it: it leads the reload, the others follow."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGHUP)
        except OSError:
            continue
        log.info("SIGHUP: worker %d reloads the policies; the other workers follow (no restart)", pid)
        return
    log.error("SIGHUP: no worker is ready to reload the policies; nothing changed")


def _live_multiprocess() -> Any:
    """uvicorn's supervisor, with SIGHUP handed to one ready worker instead of restarting them all."""
    import logging

    from uvicorn.supervisors import Multiprocess

    class LiveReloadMultiprocess(Multiprocess):
        def handle_hup(self) -> None:
            # A worker still starting has no handler yet (SIGHUP would end it): only ready ones.
            ready = [p.pid for p in self.processes if p.pid is not None and p.is_ready(timeout=1)]
            _hand_to_worker(ready, logging.getLogger("nhi_broker.reload"))

    return LiveReloadMultiprocess


def granian_app() -> Any:
    """granian's factory in each worker process: the broker's app, with its own ``Server`` header."""
    from broker.api.app import app_from_environment

    return _ServerHeader(app_from_environment())


def run(settings: Settings, server: str, *, access_log: bool = False, sock: socket.socket | None = None) -> bool:
    """Serve until stopped (SIGTERM/SIGINT), with ``settings.workers`` worker processes.

    ``sock`` is the listening socket ``nhi-broker serve`` bound before recording the start (uvicorn
    serves on it; granian binds its own, so it is closed just before). Returns whether it served.
    With several workers on embedded SQLite, the storage process (:mod:`broker.storaged`) starts
    first and stops after the workers.
    """
    if server not in SERVERS:
        raise ValueError(f"unknown HTTP server {server!r}")
    storage = StorageProcess.start(settings)
    try:
        return _serve(settings, server, access_log=access_log, sock=sock)
    finally:
        if storage is not None:
            storage.stop()


def _serve(settings: Settings, server: str, *, access_log: bool, sock: socket.socket | None) -> bool:
    from broker.api.app import SETTINGS_ENV, create_app
    from broker.logs import logging_config
    from broker.metrics import prepare_multiprocess_dir

    log_level = "info" if access_log else "warning"
    # Applied by uvicorn and granian in every worker process: the broker's, the server's and the
    # libraries' records all in settings.log_format.
    log_config = logging_config(settings.log_format)
    os.environ[SETTINGS_ENV] = settings.model_dump_json()
    if settings.workers > 1:
        # Every worker writes its counters here, so any worker's /metrics answers for all of them.
        prepare_multiprocess_dir(settings.data_dir)
    if server == "granian":
        from granian import Granian
        from granian.constants import Interfaces, Loops
        from granian.log import LogLevels

        # Fresh worker interpreters, as uvicorn's: a forked worker would inherit this process's
        # prometheus_client, imported before the multiprocess directory was set.
        multiprocessing.set_start_method("spawn", force=True)
        if sock is not None:
            sock.close()
        supervisor = Granian("broker.api.server:granian_app", factory=True, address=settings.host,
                             port=settings.port, interface=Interfaces.ASGI, workers=settings.workers,
                             loop=Loops.uvloop, log_level=LogLevels(log_level), log_access=access_log,
                             log_dictconfig=log_config, websockets=False)

        def granian_hup(*_: Any) -> None:
            # granian would respawn every worker; one worker leads a live reload instead.
            import logging

            _hand_to_worker([pid for w in list(supervisor.wrks) if (pid := w._id()) is not None],  # type: ignore[no-untyped-call]
                            logging.getLogger("nhi_broker.reload"))

        supervisor.signal_handler_reload = granian_hup  # type: ignore[method-assign]
        supervisor.serve()
        return True
    import uvicorn

    from broker.api.http_server import BoundedHttpToolsProtocol

    # proxy_headers=False: the client address must be the transport's, since it decides whether an
    # x-forwarded-client-cert header is read (X-Forwarded-For must not make a caller a trusted proxy).
    common: dict[str, Any] = {"log_level": log_level, "access_log": access_log, "server_header": False,
                              "http": BoundedHttpToolsProtocol, "proxy_headers": False, "log_config": log_config}
    if sock is None:
        common.update(host=settings.host, port=settings.port)
    if settings.workers == 1:
        one = uvicorn.Server(uvicorn.Config(create_app(settings, serving=True), **common))
        one.run(sockets=[sock] if sock is not None else None)
        return bool(one.started)
    config = uvicorn.Config("broker.api.app:app_from_environment", factory=True, workers=settings.workers, **common)
    _live_multiprocess()(config, sockets=[sock if sock is not None else config.bind_socket()]).run()
    return True
