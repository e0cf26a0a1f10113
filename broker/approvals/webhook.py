"""Signed webhook notifications of new pending approval requests.

Each new pending request is POSTed as JSON to the configured URL, in the background: the token
endpoint never waits for it. Headers::

    X-NHI-Broker-Event:      approval.pending
    X-NHI-Broker-Delivery:   a random id (the same on every retry of one notification)
    X-NHI-Broker-Timestamp:  Unix seconds when this attempt was signed
    X-NHI-Broker-Signature:  v1=<hex HMAC-SHA256(secret, timestamp || "." || body)>

A receiver recomputes the HMAC over the raw body with the shared secret, compares in constant time
and refuses timestamps more than five minutes away (:func:`verify_signature` does all three). The
body is the approvers' view of the request (workload, owner, audience, intent with its context,
rule, expiry): never a token, a secret or the identity evidence. Failed deliveries are retried
twice (1 s, then 4 s later); a notification is best effort, the console always lists every request.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import uuid
from typing import Any

import httpx

from broker.clock import Clock

__all__ = ["SIGNATURE_TOLERANCE", "WebhookNotifier", "sign", "verify_signature"]

log = logging.getLogger("nhi_broker.approvals.webhook")

SIGNATURE_TOLERANCE = 300
_RETRY_DELAYS = (1.0, 4.0)
#: Deliveries in flight at once. A webhook receiver that hangs holds at most this many connections;
#: events beyond it are dropped with an error log (approvers still see every request in the console).
MAX_IN_FLIGHT = 64


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The ``X-NHI-Broker-Signature`` value for ``body`` signed at ``timestamp``."""
    mac = hmac.new(secret, str(timestamp).encode("ascii") + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def verify_signature(
    secret: bytes, timestamp: str, body: bytes, signature: str, *, now: float, tolerance: int = SIGNATURE_TOLERANCE
) -> None:
    """Raise :class:`ValueError` unless ``signature`` is ours over ``timestamp`` and ``body``, and
    ``timestamp`` is within ``tolerance`` seconds of ``now``."""
    if not timestamp.isdigit() or abs(now - int(timestamp)) > tolerance:
        raise ValueError("webhook timestamp missing or too far from now")
    if not hmac.compare_digest(sign(secret, int(timestamp), body), signature):
        raise ValueError("webhook signature does not verify")


class WebhookNotifier:
    """Delivers ``approval.pending`` events to ``url``, signed with ``secret``, without blocking the caller."""

    def __init__(self, url: str, secret: bytes, clock: Clock, *, console_url: str | None = None,
                 timeout: float = 5.0) -> None:
        self._url = url
        self._secret = secret
        self._clock = clock
        self._console_url = console_url
        self._timeout = timeout
        self._tasks: set[asyncio.Task[None]] = set()
        # Built once, here: loading the CA bundle takes milliseconds, too long for each delivery on the loop.
        self._tls = httpx.create_ssl_context()

    def __call__(self, view: dict[str, Any]) -> None:
        """Schedule the delivery of one pending request's view (call from the event loop)."""
        event = {"type": "approval.pending", "data": view}
        if self._console_url is not None:
            event["console_url"] = f"{self._console_url}/console/approvals/{view['auth_req_id']}"
        body = json.dumps(event, separators=(",", ":"), sort_keys=True).encode("utf-8")
        if len(self._tasks) >= MAX_IN_FLIGHT:
            log.error("webhook delivery dropped: %d deliveries in flight (is the receiver hanging?)", len(self._tasks))
            return
        task = asyncio.get_running_loop().create_task(self._deliver(body, uuid.uuid4().hex))
        self._tasks.add(task)  # keep a reference until done (asyncio holds tasks weakly)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, body: bytes, delivery: str) -> None:
        async with httpx.AsyncClient(timeout=self._timeout, follow_redirects=False, verify=self._tls) as client:
            for attempt, delay in enumerate((0.0, *_RETRY_DELAYS), start=1):
                await asyncio.sleep(delay)
                timestamp = int(self._clock.now())
                headers = {
                    "Content-Type": "application/json",
                    "X-NHI-Broker-Event": "approval.pending",
                    "X-NHI-Broker-Delivery": delivery,
                    "X-NHI-Broker-Timestamp": str(timestamp),
                    "X-NHI-Broker-Signature": sign(self._secret, timestamp, body),
                }
                try:
                    response = await client.post(self._url, content=body, headers=headers)
                except httpx.HTTPError as exc:
                    log.warning("webhook delivery %s attempt %d failed (%s)", delivery[:8], attempt, type(exc).__name__)
                    continue
                if response.status_code < 300:
                    return
                log.warning("webhook delivery %s attempt %d: HTTP %d", delivery[:8], attempt, response.status_code)
        log.error("webhook delivery %s abandoned", delivery[:8])

    async def drain(self) -> None:
        """Wait for deliveries in flight (tests; shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
