#!/usr/bin/env python3
"""Token-exchange throughput of a live ``nhi-broker serve`` over loopback, driven by ``wrk``.

A Python load client saturates near 500 requests/s on a 2-core machine, so the load comes from wrk
(Debian package ``wrk``). Each identity ``jti`` is single-use, so this script pre-mints a pool of
dev-issuer identity tokens and a Lua script hands each request its own body. Every run is bounded
in time; the broker is stopped at the end.

    python scripts/bench_exchange.py [--workers 2] [--duration 8] [--connections 4,16,64]
                                     [--state sqlite|redis] [--redis-url URL] [--introspect]
    python scripts/bench_exchange.py --vault [--vault-requests 200]
    python scripts/bench_exchange.py --replicas 1,2,3 [--pg-url postgresql://...] [--connections 16]

Prints exchanges/s, p50 and p99 latency and non-200 answers for each concurrency level; with
``--state redis`` the shared state (replay, limits, suspension checks) lives in Redis instead of the
embedded SQLite file; with ``--introspect`` it also measures RFC 7662 introspections/s of one token.
``--vault`` measures Vault-backed intents instead (latency, not throughput: the broker's p50 and p99
added over a direct hvac call to the same local OpenBao; see scripts/bench_vault.py).
``--replicas`` runs 1, 2, ... broker replicas (``--workers`` each) on one PostgreSQL ledger (a temporary
schema in ``--pg-url``) and a private Redis it starts, one wrk per replica splitting the connections, and
prints the combined exchanges/s and Redis commands per exchange by replica count (:func:`bench_replicas`).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.attest.dev import DevIssuer  # noqa: E402
from broker.clock import SystemClock  # noqa: E402

WORKLOAD = "spiffe://example.org/ns/support/sa/support-assistant"
INTENT = [{"type": "intent", "action": "orders.read", "resource": "customers/c-42/orders/ord-1001",
           "context": {"customer": "c-42"}}]
AUDIENCE = "orders-api"

LUA = r"""
local bodies = {}
local counter = 0
errors = 0
local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  local n = tonumber(args[2])
  local f = assert(io.open(args[1], "r"))
  local i = 0
  for line in f:lines() do
    if i % n == id then table.insert(bodies, line) end
    i = i + 1
  end
  f:close()
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
end

function request()
  counter = counter + 1
  if counter > #bodies then counter = 1 end
  return wrk.format(nil, "/v1/token", nil, bodies[counter])
end

function response(status, headers, body)
  if status ~= 200 then errors = errors + 1 end
end

function done(summary, latency, requests)
  local errs = 0
  for _, t in ipairs(threads) do errs = errs + t:get("errors") end
  io.write(string.format(
    "JSON {\"requests\": %d, \"duration_us\": %d, \"p50_us\": %d, \"p99_us\": %d, "
    .. "\"non200\": %d, \"socket_errors\": %d}\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), errs,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1) as r:  # noqa: S310 - loopback
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("broker did not become ready")


def make_bodies(data_dir: Path, count: int, path: Path) -> None:
    issuer = DevIssuer.load_or_create(data_dir)
    clock = SystemClock()
    details = json.dumps(INTENT, separators=(",", ":"))
    with path.open("w") as out:
        for _ in range(count):
            token = issuer.mint(WORKLOAD, "nhi-broker", ttl=600, clock=clock)
            out.write(urllib.parse.urlencode({
                "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                "subject_token": token,
                "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                "audience": AUDIENCE,
                "authorization_details": details,
            }) + "\n")


def run_wrk(url: str, lua: Path, bodies: Path, connections: int, duration: int, threads: int) -> dict:
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(lua),
           url, "--", str(bodies), str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"wrk failed: {proc.stderr.strip() or proc.stdout.strip()}")
    out = proc.stdout
    line = next(line for line in out.splitlines() if line.startswith("JSON "))
    return json.loads(line[5:])


INTROSPECT_LUA = r"""
errors = 0
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  wrk.method = "POST"
  wrk.body = args[1]
  wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
  wrk.headers["Authorization"] = args[2]
end
function request() return wrk.format(nil, "/v1/introspect") end
function response(status, headers, body)
  if status ~= 200 or not string.find(body, '"active":true', 1, true) then errors = errors + 1 end
end
function done(summary, latency, requests)
  local errs = 0
  for _, t in ipairs(threads) do errs = errs + t:get("errors") end
  io.write(string.format(
    "JSON {\"requests\": %d, \"duration_us\": %d, \"p50_us\": %d, \"p99_us\": %d, \"non200\": %d, "
    .. "\"socket_errors\": %d}\n", summary.requests, summary.duration, latency:percentile(50),
    latency:percentile(99), errs, summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout))
end
"""


def bench_introspection(url: str, work: Path, token_body: str, secret: str, levels: list[int], args: argparse.Namespace
                        ) -> None:
    """Introspections/s of one live task token by an authenticated resource server (no use limit)."""
    request = urllib.request.Request(url + "/v1/token", data=token_body.encode(), method="POST",  # noqa: S310
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    with urllib.request.urlopen(request, timeout=10) as r:  # noqa: S310 - loopback
        token = json.load(r)["access_token"]
    lua = work / "introspect.lua"
    lua.write_text(INTROSPECT_LUA)
    auth = "Basic " + base64.b64encode(f"bench-rs:{secret}".encode()).decode()
    body = urllib.parse.urlencode({"token": token})
    print(f"{'connections':>11} {'introspect/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'inactive':>8}")
    for c in levels:
        cmd = ["wrk", f"-t{min(args.threads, c)}", f"-c{c}", f"-d{args.duration}s", "--latency", "-s", str(lua),
               url, "--", body, auth]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 60, check=False)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("JSON ")), None)
        if proc.returncode != 0 or line is None:
            raise SystemExit(f"wrk failed: {proc.stderr.strip() or proc.stdout.strip()}")
        r = json.loads(line[5:])
        rate = r["requests"] / (r["duration_us"] / 1e6)
        bad = r["non200"] + r["socket_errors"]
        print(f"{c:>11} {rate:>12.0f} {r['p50_us'] / 1000:>8.2f} {r['p99_us'] / 1000:>8.2f} {bad:>8}")


def bench_replicas(args: argparse.Namespace) -> int:
    """Exchanges/s of 1, 2, ... replicas behind one PostgreSQL ledger and one Redis, all on this host.

    Each replica count gets fresh replicas and a fresh ledger schema; replicas share the keys of the
    first (as deployments share them through a secret store). On one machine the replicas compete for
    the same cores as PostgreSQL, Redis and wrk, so this shows the cost of sharing, not a speed-up.
    """
    import psycopg

    counts = [int(n) for n in str(args.replicas).split(",")]
    connections = int(args.connections.split(",")[0])
    work = Path(tempfile.mkdtemp(prefix="nhi-bench-replicas-"))
    schema = f"bench_{secrets.token_hex(5)}"
    prefix = f"nhi-bench-{secrets.token_hex(4)}:"
    exe = Path(sys.executable).with_name("nhi-broker")
    lua = work / "exchange.lua"
    lua.write_text(LUA)
    sep = "&" if "?" in args.pg_url else "?"
    schemas: list[str] = []
    servers: list[tuple[subprocess.Popen[bytes], BinaryIO]] = []
    # A private Redis, so its command counter measures the brokers alone (commands per exchange).
    redis_port = free_port()
    redis_proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(redis_port), "--save", "",
                                   "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    args.redis_url = f"redis://127.0.0.1:{redis_port}/0"
    import redis

    counter = redis.Redis.from_url(args.redis_url)
    for _ in range(100):
        try:
            counter.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    print(f"replicas of {args.workers} worker(s) each; ledger: PostgreSQL (synchronous_commit=on), state: Redis; "
          f"{connections} connections in all; {os.cpu_count()} cores shared by everything")
    print(f"{'replicas':>8} {'exchanges/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'non-200':>8} {'redis cmds/exch':>14}")
    try:
        for n in counts:
            # A fresh ledger per replica count (its first replica creates the ledger key).
            schemas.append(f"{schema}_{n}")
            with psycopg.connect(args.pg_url, autocommit=True) as conn:
                conn.execute(f'CREATE SCHEMA "{schemas[-1]}"')
            ledger_url = f"{args.pg_url}{sep}options=" + urllib.parse.quote(f"-c search_path={schemas[-1]}")
            subprocess.run([str(exe), "db", "upgrade", "--url", ledger_url], check=True, capture_output=True)
            run_dir = work / f"n{n}"
            config = run_dir / "broker.toml"
            run_dir.mkdir()
            config.write_text(
                f'ledger_url = "{ledger_url}"\npublic_url = "https://broker.bench.test"\n'
                f'state_backend = "redis"\nredis_url = "{args.redis_url}"\nredis_prefix = "{prefix}{n}:"\n'
            )
            urls = []
            for i in range(n):
                data_dir = run_dir / f"replica-{i}"
                if i > 0:  # one ledger key, one token key, one dev issuer for every replica
                    shutil.copytree(run_dir / "replica-0" / "keys", data_dir / "keys")
                    shutil.copy2(run_dir / "replica-0" / "dev-issuer-key.pem", data_dir / "dev-issuer-key.pem")
                port = free_port()
                log = (run_dir / f"replica-{i}.log").open("wb")
                servers.append((subprocess.Popen(
                    [str(exe), "serve", "--port", str(port), "--data-dir", str(data_dir), "--workers",
                     str(args.workers), "--policies", str(ROOT / "policies"), "--config", str(config)],
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log))
                urls.append(f"http://127.0.0.1:{port}")
                wait_ready(urls[-1], timeout=60)
            per = max(1, connections // n)
            pools = []
            for i in range(n):
                pools.append(run_dir / f"bodies-{i}.txt")
                make_bodies(run_dir / "replica-0", args.tokens or 3000 * args.duration // n, pools[-1])
            commands_before = int(counter.info("stats")["total_commands_processed"])
            procs = []
            for url, bodies in zip(urls, pools, strict=True):
                cmd = ["wrk", f"-t{min(args.threads, per)}", f"-c{per}", f"-d{args.duration}s", "--latency", "-s",
                       str(lua), url, "--", str(bodies), str(min(args.threads, per))]
                procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            results = []
            for proc in procs:
                out, err = proc.communicate(timeout=args.duration + 60)
                line = next((ln for ln in out.splitlines() if ln.startswith("JSON ")), None)
                if proc.returncode != 0 or line is None:
                    raise SystemExit(f"wrk failed: {err.strip() or out.strip()}")
                results.append(json.loads(line[5:]))
            commands = int(counter.info("stats")["total_commands_processed"]) - commands_before
            rate = sum(r["requests"] / (r["duration_us"] / 1e6) for r in results)
            p50 = max(r["p50_us"] for r in results) / 1000
            p99 = max(r["p99_us"] for r in results) / 1000
            bad = sum(r["non200"] + r["socket_errors"] for r in results)
            done = sum(r["requests"] for r in results)
            print(f"{n:>8} {rate:>12.0f} {p50:>8.2f} {p99:>8.2f} {bad:>8} {commands / max(1, done):>14.1f}")
            for server, log in servers:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(timeout=30)
                log.close()
            servers.clear()
    finally:
        for server, log in servers:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
            log.close()
        with psycopg.connect(args.pg_url, autocommit=True) as conn:
            for name in schemas:
                conn.execute(f'DROP SCHEMA "{name}" CASCADE')
        counter.close()
        redis_proc.terminate()
        redis_proc.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--duration", type=int, default=8, help="seconds per level")
    parser.add_argument("--connections", default="4,16,64")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--tokens", type=int, default=0, help="identity tokens to pre-mint (default: sized to the run)")
    parser.add_argument("--state", choices=["sqlite", "redis"], default="sqlite", help="shared-state backend")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="Redis for --state redis")
    parser.add_argument("--introspect", action="store_true", help="also measure introspection requests/s")
    parser.add_argument("--vault", action="store_true",
                        help="measure Vault-backed intents instead: the broker's added latency over a direct "
                             "hvac call to the same OpenBao (runs scripts/bench_vault.py)")
    parser.add_argument("--vault-requests", type=int, default=200, help="with --vault: requests per measurement")
    parser.add_argument("--replicas", help="replica counts to compare, e.g. 1,2,3 (one PostgreSQL ledger, Redis state)")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test",
                        help="with --replicas: the PostgreSQL database (a temporary schema is used and dropped)")
    args = parser.parse_args()
    if args.replicas:
        if shutil.which("wrk") is None:
            print("wrk is required: apt-get install wrk", file=sys.stderr)
            return 2
        return bench_replicas(args)
    if args.vault:
        sys.path.insert(0, str(ROOT / "scripts"))
        import bench_vault

        return bench_vault.main(["--requests", str(args.vault_requests)])
    if shutil.which("wrk") is None:
        print("wrk is required: apt-get install wrk", file=sys.stderr)
        return 2
    levels = [int(c) for c in args.connections.split(",")]
    work = Path(tempfile.mkdtemp(prefix="nhi-bench-"))
    data_dir = work / "data"
    lua = work / "exchange.lua"
    lua.write_text(LUA)
    # One file per level: every identity jti is used once; wrk wraps around only if the pool runs dry,
    # and those replays show up as non-200 answers.
    count = args.tokens or 3000 * args.duration
    secret = secrets.token_urlsafe(24)
    prefix = f"nhi-bench-{secrets.token_hex(4)}:"
    config = work / "broker.toml"
    config.write_text(
        f'state_backend = "{args.state}"\nredis_url = "{args.redis_url}"\nredis_prefix = "{prefix}"\n'
        f'[[introspection_clients]]\nclient_id = "bench-rs"\naudiences = ["{AUDIENCE}"]\n'
        f'secret_sha256 = "{hashlib.sha256(secret.encode()).hexdigest()}"\n'
    )
    t0 = time.monotonic()
    pools = []
    for c in levels:
        pools.append(work / f"bodies-{c}.txt")
        make_bodies(data_dir, count, pools[-1])
    print(f"pre-minted {count * len(levels)} identity tokens in {time.monotonic() - t0:.1f}s")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    exe = Path(sys.executable).with_name("nhi-broker")
    # The server's log goes to a file: an unread pipe fills up and stalls the server mid-run.
    server_log = (work / "server.log").open("wb")
    server = subprocess.Popen(
        [str(exe), "serve", "--port", str(port), "--data-dir", str(data_dir), "--workers", str(args.workers),
         "--policies", str(ROOT / "policies"), "--config", str(config)],
        stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_ready(url)
        print(f"broker: {args.workers} worker(s), durable SQLite ledger (synchronous=FULL), {args.state} state store")
        print(f"{'connections':>11} {'exchanges/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'non-200':>8}")
        for c, bodies in zip(levels, pools, strict=True):
            r = run_wrk(url, lua, bodies, c, args.duration, min(args.threads, c))
            rate = r["requests"] / (r["duration_us"] / 1e6)
            print(f"{c:>11} {rate:>12.0f} {r['p50_us'] / 1000:>8.2f} {r['p99_us'] / 1000:>8.2f} "
                  f"{r['non200'] + r['socket_errors']:>8}")
        if args.introspect:
            make_bodies(data_dir, 1, work / "one.txt")
            bench_introspection(url, work, (work / "one.txt").read_text().strip(), secret, levels, args)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        server_log.close()
        if server.returncode not in (0, -signal.SIGTERM):
            sys.stderr.write((work / "server.log").read_text(errors="replace")[-4000:])
        shutil.rmtree(work, ignore_errors=True)
        if args.state == "redis":
            import redis

            client = redis.Redis.from_url(args.redis_url)
            keys = list(client.scan_iter(match=prefix + "*", count=1000))
            for i in range(0, len(keys), 1000):
                client.delete(*keys[i:i + 1000])
            client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
