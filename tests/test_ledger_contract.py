"""Every kind of entry the broker writes passes the auditors' offline verifier (docs/ledger.md).

One live broker goes through every feature that writes to the ledger — issuance (bearer and
DPoP-bound), policy denial, budget denial, scoped revocation, suspension and its refusal, resume —
and then ``nhi-broker audit verify`` must accept the whole log, entry schemas included.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
from nhi_broker_client import BrokerClient, BrokerResponseError

from broker.attest.dev import DevIssuer
from broker.clock import SystemClock
from tests.helpers import SUPPORT, LiveBroker, exchange_form, form_body, intent

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
ORDER = "customers/c-42/orders/ord-1001"


def test_every_entry_kind_the_broker_writes_verifies(tmp_path: Path) -> None:
    secret = secrets.token_urlsafe(32)
    config = tmp_path / "broker.toml"
    config.write_text(
        f'[[operators]]\nname = "ops-lead"\nrole = "admin"\n'
        f'token_sha256 = "{hashlib.sha256(secret.encode()).hexdigest()}"\n'
    )
    broker = LiveBroker(tmp_path / "data", config=config)
    try:
        issuer = DevIssuer.load_or_create(tmp_path / "data")

        def identity() -> str:
            return issuer.mint(SUPPORT, "nhi-broker", ttl=300, clock=SystemClock())

        admin = {"Authorization": f"Bearer {secret}"}
        with httpx.Client(base_url=broker.url) as http:
            def bearer_exchange(details: str, audience: str) -> httpx.Response:
                return http.post("/v1/token", content=form_body(exchange_form(identity(), audience, details)),
                                 headers=FORM)

            assert bearer_exchange(intent("orders.read", ORDER, customer="c-42"), "orders-api").status_code == 200
            with BrokerClient(broker.url, identity) as client:  # DPoP-bound
                client.get_token("payments-api", "payments.refund", ORDER,
                                 {"customer": "c-42", "amount": 20, "currency": "EUR", "conversation": "conv-1"})
                # The sample budget: 200 EUR of refunds per conversation per day.
                refused = None
                for _ in range(10):
                    try:
                        client.get_token("payments-api", "payments.refund", ORDER,
                                         {"customer": "c-42", "amount": 50, "currency": "EUR",
                                          "conversation": "conv-2"}, fresh=True)
                    except BrokerResponseError as exc:
                        refused = exc
                        break
                assert refused is not None and refused.code == "budget_exceeded"
            over = intent("payments.refund", ORDER, customer="c-42", amount=500, currency="EUR")
            assert bearer_exchange(over, "payments-api").status_code == 403
            r = http.post("/v1/admin/revocations", headers=admin,
                          json={"scope": "conversation", "value": "conv-1", "reason": "contract test"})
            assert r.status_code == 200, r.text
            r = http.post("/v1/admin/workloads/support-assistant/suspend", headers=admin,
                          json={"reason": "contract test"})
            assert r.status_code == 200, r.text
            assert bearer_exchange(intent("orders.read", ORDER, customer="c-42"), "orders-api").status_code == 403
            r = http.post("/v1/admin/workloads/support-assistant/resume", headers=admin,
                          json={"reason": "contract test"})
            assert r.status_code == 200, r.text
            verifier_key = http.get("/.well-known/oauth-authorization-server").json()["ledger_verifier_key"]

        exe = Path(sys.executable).with_name("nhi-broker")
        run = subprocess.run([str(exe), "audit", "verify", "--url", broker.url, "--verifier-key", verifier_key,
                              "--json"], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr
        summary = json.loads(run.stdout)
        kinds = summary["by_kind"]
        for kind in ("issuance", "denial", "revocation", "suspension", "policy_load", "key_rotation"):
            assert kinds.get(kind, 0) >= 1, (kind, kinds)
    finally:
        broker.stop()
