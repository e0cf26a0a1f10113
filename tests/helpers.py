"""Test helpers: constants, form builders and a live broker process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
import jwt

REPO = Path(__file__).resolve().parent.parent
POLICIES = REPO / "policies"
SUPPORT = "spiffe://example.org/ns/support/sa/support-assistant"
TRIAGE = "spiffe://example.org/ns/helpdesk/sa/ticket-triage"
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"

_T = TypeVar("_T")


def run(awaitable: Coroutine[Any, Any, _T]) -> _T:
    """Run one coroutine of the broker from synchronous test code, on a fresh event loop.

    For stores that are not tied to one loop (SQLite, whose calls go to the store's own thread).
    """
    return asyncio.run(awaitable)


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def intent(action: str, resource: str, **context: Any) -> str:
    """``authorization_details`` with one intent."""
    return json.dumps([{"type": "intent", "action": action, "resource": resource, "context": context}])


def exchange_form(subject_token: str, audience: str, details: str, **extra: str) -> dict[str, str]:
    """A complete RFC 8693 form."""
    return {
        "grant_type": EXCHANGE,
        "subject_token": subject_token,
        "subject_token_type": JWT_TYPE,
        "audience": audience,
        "authorization_details": details,
        **extra,
    }


def delegated_form(user_token: str, actor_token: str, audience: str, details: str, **extra: str) -> dict[str, str]:
    """An RFC 8693 delegated exchange (§2.1): the verified end user's token as ``subject_token``, the
    workload's identity as ``actor_token``. The sample refund rules issue only on such a request."""
    return exchange_form(user_token, audience, details, actor_token=actor_token, actor_token_type=JWT_TYPE, **extra)


def dev_user(data_dir: Path, subject: str = "c-42", **kw: Any) -> str:
    """A token of end user ``subject`` from the trial user issuer of the broker with this data dir."""
    from broker.attest.dev import DevUserIssuer
    from broker.clock import SystemClock

    return DevUserIssuer.load_or_create(data_dir).mint_user(subject, "nhi-broker", clock=SystemClock(), **kw)


def form_body(form: dict[str, str]) -> bytes:
    return urllib.parse.urlencode(form).encode()


class LiveBroker:
    """A ``nhi-broker serve`` process on a free loopback port, stopped by its fixture.

    ``env`` adds ``NHI_BROKER_*`` settings (the caller's own are never inherited); ``server`` picks
    the HTTP server (``serve --server``); ``args`` are more ``serve`` flags.
    """

    def __init__(
        self, data_dir: Path, policies: Path = POLICIES, workers: int = 1, config: Path | None = None,
        env: dict[str, str] | None = None, server: str | None = None, tls_verify: Any = None,
        args: Sequence[str] = (),
    ) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        # tls_verify: the CA (an ssl.SSLContext or a PEM path) a broker serving HTTPS ([tls]) is checked with.
        self.tls_verify = tls_verify
        self.url = f"{'https' if tls_verify is not None else 'http'}://127.0.0.1:{self.port}"
        exe = Path(sys.executable).with_name("nhi-broker")
        # Output goes to a file, never an unread pipe: a full pipe would stall the broker under load.
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = data_dir.parent / f"broker-{self.port}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(exe), "serve", "--port", str(self.port), "--data-dir", str(data_dir), "--policies", str(policies),
             "--workers", str(workers), *(["--config", str(config)] if config else []),
             *(["--server", server] if server else []), *args],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**{k: v for k, v in os.environ.items() if not k.startswith("NHI_BROKER_")}, **(env or {})},
        )
        self._wait_ready()

    def output(self) -> str:
        """Everything the broker printed so far."""
        return self.log_path.read_text(errors="replace")

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited: {self.output()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1, verify=self.tls_verify or True).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("broker did not become ready")

    def stop(self) -> str:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.output()


def verified_claims(token: str, jwks: dict[str, Any], audience: str) -> dict[str, Any]:
    """The claims of a task token the broker issued, once pyjwt has verified it against the broker's JWKS:
    signature, ``exp``/``iat``/``nbf`` on the real clock, and ``audience``."""
    kid = jwt.get_unverified_header(token)["kid"]
    key = jwt.PyJWK(next(k for k in jwks["keys"] if k["kid"] == kid))
    claims: dict[str, Any] = jwt.decode(token, key, algorithms=[key.algorithm_name], audience=audience,
                                        options={"require": ["exp", "iat", "jti"]})
    return claims


def wait_until(condition: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``condition`` until it holds; :class:`AssertionError` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


_STORAGE_PROCESSES: dict[Path, Any] = {}


def storage_processes_by_dir() -> dict[Path, Any]:
    """One registry per test session of the storage processes fixtures started, by directory."""
    return _STORAGE_PROCESSES
