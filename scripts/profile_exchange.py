#!/usr/bin/env python3
"""CPU per token exchange inside one process: the broker's ASGI app driven without HTTP or wrk.

    .venv/bin/python scripts/profile_exchange.py [--exchanges 4000] [--callers 16] [--state sqlite|redis]
                                                 [--storaged] [--profile cprofile|none] [--sort tottime]

Builds the app as ``nhi-broker serve`` does (embedded defaults in a temporary directory, the repository's
policies), pre-mints one identity token per exchange and sends ``POST /v1/token`` straight into the app
from ``--callers`` concurrent coroutines. Prints exchanges/s and the process CPU (all threads: the
ledger writer and the state store's thread included) per exchange. CPU per exchange moves far less with
the machine's load than a wrk rate does, so it is the figure to compare before and after a change on a
busy machine; ``scripts/bench_exchange.py`` remains the measurement that counts (HTTP, 2 workers,
OpenBao side by side). With ``--profile cprofile`` the event-loop thread is profiled deterministically
(inflates small functions; use it to find calls, not to weigh them). With ``--storaged`` the app
writes through the storage process (:mod:`broker.storaged`) as each worker of ``serve --workers 2``
does; their CPU is counted too, and printed apart.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import os
import pstats
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.api.app import create_app  # noqa: E402
from broker.attest.dev import DevIssuer  # noqa: E402
from broker.clock import SystemClock  # noqa: E402
from broker.config import Settings  # noqa: E402
from broker.storaged.processes import SOCKETS_ENV, StorageProcess  # noqa: E402

WORKLOAD = "spiffe://example.org/ns/support/sa/support-assistant"
INTENT = [{"type": "intent", "action": "orders.read", "resource": "customers/c-42/orders/ord-1001",
           "context": {"customer": "c-42"}}]


def bodies(data_dir: Path, count: int) -> list[bytes]:
    """``count`` RFC 8693 forms, each with its own single-use identity token (as bench_exchange.py)."""
    issuer = DevIssuer.load_or_create(data_dir)
    clock = SystemClock()
    details = json.dumps(INTENT, separators=(",", ":"))
    return [urllib.parse.urlencode({
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token": issuer.mint(WORKLOAD, "nhi-broker", ttl=600, clock=clock),
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "audience": "orders-api",
        "authorization_details": details,
    }).encode() for _ in range(count)]


async def post(app: Any, body: bytes) -> int:
    """One ``POST /v1/token`` into the ASGI app; its status."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/token", "raw_path": b"/v1/token", "root_path": "", "query_string": b"",
        "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/x-www-form-urlencoded"),
                    (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 80),
    }
    delivered = False
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    return status[0]


async def run(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="nhi-profile-"))
    settings = Settings(data_dir=work, policies_dir=ROOT / "policies", state_backend=args.state,
                        redis_url=args.redis_url, redis_prefix=f"nhi-profile-{time.time_ns()}:")
    per_caller = args.exchanges // args.callers
    warm = 200
    pool = iter(bodies(work, per_caller * args.callers + warm))
    storage = None
    if args.storaged:
        targets = {"ledger": settings.ledger_storage_url}
        if args.state == "sqlite":
            targets["state"] = str(work / "state.sqlite3")
        storage = StorageProcess.launch(targets)
        os.environ[SOCKETS_ENV] = json.dumps(storage.sockets)
    app = create_app(settings)
    try:
        await drive(app, args, pool, per_caller, warm, storage)
    finally:
        if storage is not None:
            storage.stop()


def children_cpu(storage: Any) -> float:
    """CPU seconds the storage process used so far (0 without it)."""
    if storage is None:
        return 0.0
    total = 0.0
    for pid in set(storage.pids.values()):  # one process serves both kinds
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def drive(app: Any, args: argparse.Namespace, pool: Any, per_caller: int, warm: int, storage: Any) -> None:
    async with app.router.lifespan_context(app):
        async def caller(n: int) -> int:
            refused = 0
            for _ in range(n):
                refused += await post(app, next(pool)) != 200
            return refused

        await caller(warm)
        gc.collect()
        profiler = cProfile.Profile() if args.profile == "cprofile" else None
        wall0, cpu0, side0 = time.perf_counter(), time.process_time(), children_cpu(storage)
        if profiler is not None:
            profiler.enable()
        refused = sum(await asyncio.gather(*(caller(per_caller) for _ in range(args.callers))))
        if profiler is not None:
            profiler.disable()
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        side = children_cpu(storage) - side0
    n = per_caller * args.callers
    apart = f" (storage process {side * 1e6 / n:,.0f})" if storage is not None else ""
    print(f"{n} exchanges ({args.state} state{', storage process' if storage else ''}, {args.callers} callers): "
          f"{n / wall:,.0f}/s, CPU {(cpu + side) * 1e6 / n:,.0f} µs per exchange{apart}, non-200 {refused}")
    if profiler is not None:
        pstats.Stats(profiler).sort_stats(args.sort).print_stats(args.top)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exchanges", type=int, default=4000)
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--state", choices=["sqlite", "redis"], default="sqlite")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--storaged", action="store_true", help="write through the storage process (serve's workers)")
    parser.add_argument("--profile", choices=["cprofile", "none"], default="none")
    parser.add_argument("--sort", default="tottime", help="pstats order (tottime, cumtime)")
    parser.add_argument("--top", type=int, default=40)
    asyncio.run(run(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
