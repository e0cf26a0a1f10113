"""How much memory an unauthenticated client can make the broker hold with one large request body.

Starts ``nhi-broker serve`` (one worker, embedded defaults, one configured operator) on a free loopback
port, streams ``--requests`` bodies of ``--mib`` MiB without credentials to a JSON endpoint of the admin
API (and, with ``--token``, to ``POST /v1/token``), and prints the broker process's resident set size
(``VmRSS``) and its peak (``VmHWM``) from ``/proc`` before and after, with the answers' statuses.

    python scripts/measure_body_memory.py --mib 60 --requests 3
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHUNK = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _memory_kib(pid: int) -> tuple[int, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def _post(port: int, path: str, mib: int, content_type: str) -> str:
    """Stream ``mib`` MiB of a JSON string body; the status, or why the broker cut the upload short."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Content-Type", content_type)
        conn.putheader("Content-Length", str(mib * CHUNK + 14))
        conn.endheaders()
        chunk = b"x" * CHUNK
        try:
            conn.send(b'{"reason": "')
            for _ in range(mib):
                conn.send(chunk)
            conn.send(b'"}')
        except (BrokenPipeError, ConnectionResetError):
            pass  # the broker answered early and closed: read what it said
        try:
            response = conn.getresponse()
            return f"{response.status} {response.read()[:100].decode(errors='replace')}"
        except (ConnectionResetError, http.client.HTTPException) as exc:
            return f"connection closed by the broker ({type(exc).__name__})"
    finally:
        conn.close()


def _wait_ready(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the broker exited during start")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("the broker did not become ready")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=60, help="body size in MiB (default 60)")
    parser.add_argument("--requests", type=int, default=3, help="how many such requests (default 3)")
    parser.add_argument("--path", default="/v1/admin/workloads/support-assistant/suspend")
    parser.add_argument("--token", action="store_true", help="also send the bodies to POST /v1/token")
    args = parser.parse_args()

    exe = Path(sys.executable).with_name("nhi-broker")
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "broker.toml"
        secret_hash = hashlib.sha256(os.urandom(32)).hexdigest()
        config.write_text(f'[[operators]]\nname = "alice"\nrole = "admin"\ntoken_sha256 = "{secret_hash}"\n')
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("NHI_BROKER_")}
        proc = subprocess.Popen(
            [str(exe), "serve", "--port", str(port), "--data-dir", f"{tmp}/data", "--policies",
             str(REPO / "policies"), "--workers", "1", "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
        )
        try:
            _wait_ready(port, proc)
            time.sleep(1)  # let the start settle
            rss0, hwm0 = _memory_kib(proc.pid)
            print(f"broker pid {proc.pid}: VmRSS {rss0 / 1024:.1f} MiB, VmHWM {hwm0 / 1024:.1f} MiB at start")
            targets = [(args.path, "application/json")]
            if args.token:
                targets.append(("/v1/token", "application/x-www-form-urlencoded"))
            for path, content_type in targets:
                for i in range(args.requests):
                    started = time.monotonic()
                    answer = _post(port, path, args.mib, content_type)
                    rss, hwm = _memory_kib(proc.pid)
                    print(f"{path} #{i + 1} ({args.mib} MiB, no credentials): {answer!r} in "
                          f"{time.monotonic() - started:.2f} s; VmRSS {rss / 1024:.1f} MiB "
                          f"(+{(rss - rss0) / 1024:.1f}), VmHWM {hwm / 1024:.1f} MiB (+{(hwm - hwm0) / 1024:.1f})")
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
