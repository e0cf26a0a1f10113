"""The signed webhook: a local receiver gets every new pending request, verifies it, sees no secret."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from broker.api.app import create_app
from broker.approvals import sign, verify_signature
from broker.clock import FixedClock
from tests.approvals.harness import Harness, approval_settings
from tests.helpers import free_port

SECRET = "whsec-4f9c1d7e2b8a6039f5e1c7d2a4b8e6f0"


class Receiver:
    """An HTTP server on loopback recording (headers, body) of every POST; ``fail_first`` answers 503 once."""

    def __init__(self, fail_first: bool = False) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.failed = not fail_first
        self.arrived = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if not receiver.failed:
                    receiver.failed = True
                    self.send_response(503)
                    self.end_headers()
                    return
                receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                receiver.arrived.set()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/approvals"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail_first=True)
    yield r
    r.close()


def test_every_pending_request_is_notified_signed_and_without_secrets(
    tmp_path: Path, receiver: Receiver, redis_prefix: str
) -> None:
    settings = approval_settings(tmp_path / "data", "sqlite", redis_prefix, webhook_url=receiver.url,
                                 webhook_secret=SECRET)
    clock = FixedClock(time.time())
    with TestClient(create_app(settings, clock=clock), raise_server_exceptions=False) as client:
        h = Harness(client, settings, clock)
        started = time.monotonic()
        rid = h.hold(120)
        # The token endpoint answered without waiting for the (failing, then retried) delivery.
        assert time.monotonic() - started < 0.9
        assert receiver.arrived.wait(10), "the webhook never arrived"
    headers, body = receiver.received[0]
    assert headers["x-nhi-broker-event"] == "approval.pending"
    verify_signature(SECRET.encode(), headers["x-nhi-broker-timestamp"], body, headers["x-nhi-broker-signature"],
                     now=clock.now())
    event = json.loads(body)
    assert event["type"] == "approval.pending" and event["data"]["auth_req_id"] == rid
    assert event["data"]["intent"]["context"]["amount"] == 120
    assert event["console_url"].endswith(f"/console/approvals/{rid}")
    text = body.decode()
    for secret_like in (SECRET, "evidence_digest", "access_token", "subject_token", "token_sha256"):
        assert secret_like not in text
    # A tampered body, a wrong secret or a stale timestamp do not verify.
    ts, sig = headers["x-nhi-broker-timestamp"], headers["x-nhi-broker-signature"]
    bad = [
        (SECRET.encode(), ts, body.replace(b"120", b"121"), sig, clock.now()),
        (b"another-secret-entirely-0123456789", ts, body, sig, clock.now()),
        (SECRET.encode(), ts, body, sig, clock.now() + 301),
        (SECRET.encode(), "", body, sign(SECRET.encode(), 0, body), clock.now()),
    ]
    for args in bad:
        with pytest.raises(ValueError, match="webhook"):
            verify_signature(args[0], args[1], args[2], args[3], now=args[4])


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ({"webhook_url": "http://127.0.0.1:9/x"}, "go together"),
        ({"webhook_url": "http://127.0.0.1:9/x", "webhook_secret": "short"}, "at least 32"),
        ({"webhook_url": "http://127.0.0.1:9/x", "webhook_secret": "a" * 40}, "placeholder"),
        ({"webhook_url": "ftp://example.org/x", "webhook_secret": SECRET}, "webhook_url"),
        ({"poll_interval": 0}, "poll_interval"),
    ],
)
def test_bad_approval_settings_are_refused(tmp_path: Path, extra: dict[str, Any], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        approval_settings(tmp_path, "sqlite", "p:", **extra)
