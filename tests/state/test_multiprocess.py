"""Several real broker processes on one shared state: single use, budgets and the kill switch hold
across processes, on SQLite (one data directory) and on Redis."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from broker.attest.dev import DevIssuer, DevUserIssuer
from broker.clock import SystemClock
from broker.operators import hash_secret
from tests.helpers import POLICIES, SUPPORT, LiveBroker, delegated_form, exchange_form, intent
from tests.state.conftest import SHARED_REDIS, drop_prefix, unique_prefix

ADMIN = "mp-admin-token-0123456789"
RS_SECRET = "mp-payments-secret-0123456789"
RS_AUTH = ("payments-api", RS_SECRET)

# The sample refund rule, with a rate high enough for a burst: single use, 200 EUR per conversation per day.
LIMITS = """
[[limit]]
rule = "refund-small-eur"
uses = 1
rate = "100000/minute"
[limit.budget]
key = "amount"
currency = "EUR"
max = "200.00"
per = "conversation"
period = "day"
"""


def refund(amount: float, conversation: str) -> str:
    return intent("payments.refund", "customers/c-42/orders/ord-1001", customer="c-42", amount=amount,
                  currency="EUR", conversation=conversation)


class Pair:
    """Two broker processes (the first with two workers) on one data directory and one state store."""

    def __init__(self, root: Path, backend: str, prefix: str) -> None:
        policies = root / "policies"
        policies.mkdir(parents=True)
        for name in ("model.conf", "policy.csv", "workloads.toml", "approvals.toml"):
            shutil.copy(POLICIES / name, policies / name)
        (policies / "limits.toml").write_text(LIMITS)
        config = root / "broker.toml"
        config.write_text(
            # Replicas behind one name share the issuer URL, so each verifies the other's tokens.
            'public_url = "https://broker.example.test"\nunsafe_trial_issuers = true\n'
            f'state_backend = "{backend}"\nredis_url = "{SHARED_REDIS}"\nredis_prefix = "{prefix}"\n'
            f'[[operators]]\nname = "alice"\nrole = "admin"\ntoken_sha256 = "{hash_secret(ADMIN)}"\n'
            f'[[introspection_clients]]\nclient_id = "payments-api"\nsecret_sha256 = "{hash_secret(RS_SECRET)}"\n'
            'audiences = ["payments-api", "orders-api"]\n'
        )
        data = root / "data"
        self.a = LiveBroker(data, policies, workers=2, config=config)
        try:
            self.b = LiveBroker(data, policies, config=config)
        except BaseException:
            self.a.stop()
            raise
        self.issuer = DevIssuer.load_or_create(data)
        self.users = DevUserIssuer.load_or_create(data)
        self.http = httpx.Client(timeout=20)

    def stop(self) -> None:
        self.http.close()
        self.a.stop()
        self.b.stop()

    def exchange(self, url: str, details: str) -> httpx.Response:
        """A refund, delegated for the verified customer c-42 (the sample refund rules need one)."""
        identity = self.issuer.mint(SUPPORT, "nhi-broker", ttl=300, clock=SystemClock())
        user = self.users.mint_user("c-42", "nhi-broker", clock=SystemClock())
        return self.http.post(url + "/v1/token", data=delegated_form(user, identity, "payments-api", details))

    def active(self, url: str, token: str) -> bool:
        r = self.http.post(url + "/v1/introspect", data={"token": token}, auth=RS_AUTH)
        assert r.status_code == 200, r.text
        return bool(r.json()["active"])


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    prefix = unique_prefix()
    p = Pair(tmp_path_factory.mktemp(f"pair-{request.param}"), str(request.param), prefix)
    try:
        yield p
    finally:
        p.stop()
        drop_prefix(SHARED_REDIS, prefix)


def test_single_use_tokens_are_used_once_across_processes(pair: Pair) -> None:
    tokens = []
    for i in range(12):
        r = pair.exchange(pair.a.url if i % 2 else pair.b.url, refund(1, f"su-{i}"))
        assert r.status_code == 200, r.text
        tokens.append(r.json()["access_token"])
    barrier = threading.Barrier(16)

    def hammer(worker: int) -> list[bool]:
        url = pair.a.url if worker % 2 else pair.b.url
        with httpx.Client(timeout=20) as http:
            barrier.wait()
            return [
                http.post(url + "/v1/introspect", data={"token": t}, auth=RS_AUTH).json()["active"] for t in tokens
            ]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(hammer, range(16)))
    per_token = [sum(answer[i] for answer in answers) for i in range(len(tokens))]
    assert per_token == [1] * len(tokens)


def test_budget_is_never_exceeded_across_processes(pair: Pair) -> None:
    barrier = threading.Barrier(12)

    def spend(worker: int) -> list[int]:
        url = pair.a.url if worker % 2 else pair.b.url
        barrier.wait()
        return [pair.exchange(url, refund(33.34, "budget-race")).status_code for _ in range(2)]

    with ThreadPoolExecutor(12) as pool:
        codes = [c for chunk in pool.map(spend, range(12)) for c in chunk]
    # 5 x 33.34 = 166.70; a sixth would make 200.04: over by four cents.
    assert codes.count(200) == 5
    assert codes.count(403) == len(codes) - 5
    r = pair.exchange(pair.a.url, refund(33.30, "budget-race"))  # 166.70 + 33.30 = 200.00 exactly
    assert r.status_code == 200, r.text
    r = pair.exchange(pair.b.url, refund(0.01, "budget-race"))
    assert r.json()["error"] == "budget_exceeded"


def test_suspension_reaches_the_other_process_within_one_second(pair: Pair) -> None:
    # An unlimited token, so polling it never uses it up: only the suspension can make it inactive.
    identity = pair.issuer.mint(SUPPORT, "nhi-broker", ttl=300, clock=SystemClock())
    read = intent("orders.read", "customers/c-42/orders/ord-1001", customer="c-42")
    r = pair.http.post(pair.b.url + "/v1/token", data=exchange_form(identity, "orders-api", read))
    token = r.json()["access_token"]
    assert pair.active(pair.b.url, token) and pair.active(pair.a.url, token)
    started = time.monotonic()
    r = pair.http.post(pair.a.url + "/v1/admin/workloads/support-assistant/suspend", json={"reason": "drill"},
                       headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200, r.text
    inactive_at = None
    while time.monotonic() - started < 1.0:
        if not pair.active(pair.b.url, token):
            inactive_at = time.monotonic()
            break
        time.sleep(0.01)
    refused = pair.exchange(pair.b.url, refund(1, "kill-switch-2"))
    elapsed = (inactive_at or time.monotonic()) - started
    print(json.dumps({"suspension_visible_on_second_process_s": round(elapsed, 4)}))
    assert inactive_at is not None and elapsed < 1.0
    assert refused.status_code == 403 and refused.json()["error"] == "workload_suspended"
    pair.http.post(pair.a.url + "/v1/admin/workloads/support-assistant/resume", json={"reason": "drill over"},
                   headers={"Authorization": f"Bearer {ADMIN}"})
