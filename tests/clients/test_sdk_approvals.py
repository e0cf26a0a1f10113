"""The SDK and intents held for human review (OpenID CIBA poll mode), against a live broker."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from nhi_broker_client import (
    AccessDeniedError,
    ApprovalPending,
    AsyncBrokerClient,
    BrokerClient,
)

from broker.attest.dev import DevIssuer, DevUserIssuer
from broker.clock import SystemClock
from tests.helpers import SUPPORT, LiveBroker, verified_claims

ORDER = "customers/c-42/orders/ord-1001"
APPROVER = secrets.token_urlsafe(32)


def refund(amount: int) -> dict[str, Any]:
    return {"customer": "c-42", "amount": amount, "currency": "EUR", "conversation": secrets.token_hex(8)}


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveBroker]:
    root = Path(tmp_path_factory.mktemp("sdk-approvals"))
    config = root / "broker.toml"
    config.write_text(
        "[approvals]\npoll_interval = 1\n\n"
        f'[[operators]]\nname = "april"\nrole = "approver"\ngroups = ["refund-approvers"]\n'
        f'token_sha256 = "{hashlib.sha256(APPROVER.encode()).hexdigest()}"\n'
    )
    live = LiveBroker(root / "data", config=config)
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="module")
def identity(broker: LiveBroker) -> Callable[[], str]:
    issuer = DevIssuer.load_or_create(broker.data_dir)
    return lambda: issuer.mint(SUPPORT, "nhi-broker", clock=SystemClock())


@pytest.fixture(scope="module")
def customer(broker: LiveBroker) -> Callable[[], str]:
    """A fresh token of the signed-in customer c-42 (trial user issuer): refunds are delegated."""
    users = DevUserIssuer.load_or_create(broker.data_dir)
    return lambda: users.mint_user("c-42", "nhi-broker", clock=SystemClock())


def decide(broker: LiveBroker, auth_req_id: str, verb: str) -> None:
    r = httpx.post(f"{broker.url}/v1/admin/approvals/{auth_req_id}/{verb}", json={"reason": "checked the order"},
                   headers={"Authorization": f"Bearer {APPROVER}"})
    assert r.status_code == 200, r.text


def test_held_intent_is_collected_after_approval(
    broker: LiveBroker, identity: Callable[[], str], customer: Callable[[], str]
) -> None:
    with BrokerClient(broker.url, actor=identity, user_token=customer) as client:
        with pytest.raises(ApprovalPending) as held:
            client.get_token("payments-api", "payments.refund", ORDER, refund(120))
        pending = held.value
        assert pending.rule_id == "refund-review-eur" and pending.interval >= 1
        with pytest.raises(ApprovalPending):
            client.collect(pending)  # nobody decided yet
        decide(broker, pending.auth_req_id, "approve")
        time.sleep(pending.interval)
        token = client.collect(pending)
    assert token.token_type == "DPoP" and token.intent.context["amount"] == 120
    jwks = httpx.get(broker.url + "/.well-known/jwks.json").json()
    claims = verified_claims(token.access_token, jwks, "payments-api")
    assert claims["approval"]["approvers"] == ["april"]
    assert claims["cnf"]["jkt"] == client.dpop_key.jkt  # type: ignore[union-attr]


def test_denied_intent_raises_access_denied(
    broker: LiveBroker, identity: Callable[[], str], customer: Callable[[], str]
) -> None:
    with BrokerClient(broker.url, actor=identity, user_token=customer) as client:
        with pytest.raises(ApprovalPending) as held:
            client.get_token("payments-api", "payments.refund", ORDER, refund(130))
        decide(broker, held.value.auth_req_id, "deny")
        time.sleep(held.value.interval)
        with pytest.raises(AccessDeniedError):
            client.collect(held.value)


def approve_when_held(broker: LiveBroker, amount: int) -> threading.Thread:
    """An approver who approves the pending refund of ``amount`` as soon as it shows up."""

    def run() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            listing = httpx.get(f"{broker.url}/v1/admin/approvals",
                                headers={"Authorization": f"Bearer {APPROVER}"}).json()["requests"]
            pending = [r for r in listing
                       if r["status"] == "pending" and r["intent"]["context"]["amount"] == amount]
            if pending:
                decide(broker, pending[0]["auth_req_id"], "approve")
                return
            time.sleep(0.1)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_wait_for_approval_polls_until_approved(
    broker: LiveBroker, identity: Callable[[], str], customer: Callable[[], str]
) -> None:
    approver = approve_when_held(broker, 140)
    with BrokerClient(broker.url, actor=identity, user_token=customer) as client:
        token = client.get_token("payments-api", "payments.refund", ORDER, refund(140), wait_for_approval=30)
    approver.join()
    jwks = httpx.get(broker.url + "/.well-known/jwks.json").json()
    assert verified_claims(token.access_token, jwks, "payments-api")["approval"]["approvers"] == ["april"]


def test_async_wait_for_approval(
    broker: LiveBroker, identity: Callable[[], str], customer: Callable[[], str]
) -> None:
    async def main() -> Any:
        async with AsyncBrokerClient(broker.url, actor=identity, user_token=customer) as client:
            return await client.get_token("payments-api", "payments.refund", ORDER, refund(150),
                                          wait_for_approval=True)

    approver = approve_when_held(broker, 150)
    token = asyncio.run(main())
    approver.join()
    assert token.intent.context["amount"] == 150


def test_wait_gives_up_after_its_timeout(
    broker: LiveBroker, identity: Callable[[], str], customer: Callable[[], str]
) -> None:
    with BrokerClient(broker.url, actor=identity, user_token=customer) as client:
        started = time.monotonic()
        with pytest.raises(ApprovalPending):
            client.get_token("payments-api", "payments.refund", ORDER, refund(160), wait_for_approval=1.5)
        assert time.monotonic() - started < 6
