"""Fixtures for the auditor's tests: a ledger written by a real broker over HTTP, copied per test."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from broker.attest.dev import DevIssuer
from broker.clock import SystemClock
from tests.helpers import SUPPORT, TRIAGE, LiveBroker, delegated_form, dev_user, exchange_form, intent

REFUND = intent("payments.refund", "customers/c-42/orders/ord-1001", customer="c-42", amount=20, currency="EUR")
# Another customer's order: no rule allows it, so the broker records a denial.
FOREIGN = intent("orders.read", "customers/c-99/orders/ord-7", customer="c-42")


@dataclass
class Issued:
    token: str
    index: int
    leaf_hash: str


@dataclass
class Ledger:
    """A stopped broker's data directory, the verifier key it printed, and what it issued."""

    data_dir: Path
    verifier_key: str
    issued: list[Issued] = field(default_factory=list)


def exchange(broker: LiveBroker, spiffe_id: str, details: str, audience: str = "payments-api",
             user: str | None = None) -> httpx.Response:
    """One token exchange with a fresh trial identity (minted in-process from the broker's data dir);
    delegated for the verified end user ``user`` when given (refunds need one)."""
    subject = DevIssuer.load_or_create(broker.data_dir).mint(spiffe_id, "nhi-broker", clock=SystemClock())
    if user is None:
        form = exchange_form(subject, audience, details)
    else:
        form = delegated_form(dev_user(broker.data_dir, user), subject, audience, details)
    return httpx.post(broker.url + "/v1/token", data=form, timeout=30)


def populate(broker: LiveBroker, issued: list[Issued], n: int = 6) -> None:
    for i in range(n):
        r = exchange(broker, SUPPORT, REFUND, user="c-42")
        assert r.status_code == 200, r.text
        body = r.json()
        issued.append(Issued(body["access_token"], body["receipt"]["index"], body["receipt"]["leaf_hash"]))
        if i % 3 == 1:
            assert exchange(broker, TRIAGE, FOREIGN, audience="orders-api").status_code in (400, 403)


@pytest.fixture(scope="session")
def written_ledger(tmp_path_factory: pytest.TempPathFactory) -> Ledger:
    """A ledger of a dozen entries (key rotations, policy load, issuances, denials), broker stopped."""
    data_dir = tmp_path_factory.mktemp("ledger") / "data"
    broker = LiveBroker(data_dir)
    try:
        key = httpx.get(broker.url + "/.well-known/oauth-authorization-server").json()["ledger_verifier_key"]
        ledger = Ledger(data_dir, key)
        populate(broker, ledger.issued)
    finally:
        broker.stop()
    return ledger


@pytest.fixture
def ledger_copy(written_ledger: Ledger, tmp_path: Path) -> Ledger:
    """A private copy of the written ledger, free to tamper with."""
    target = tmp_path / "data"
    shutil.copytree(written_ledger.data_dir, target)
    return Ledger(target, written_ledger.verifier_key, list(written_ledger.issued))


@pytest.fixture
def broker_on_copy(ledger_copy: Ledger) -> Iterator[tuple[LiveBroker, Ledger]]:
    """A live broker serving a private copy of the written ledger."""
    broker = LiveBroker(ledger_copy.data_dir)
    try:
        yield broker, ledger_copy
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def served_ledger(
    written_ledger: Ledger, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LiveBroker, Ledger]]:
    """One live broker on a copy of the written ledger, shared by tests that only read it."""
    target = tmp_path_factory.mktemp("served") / "data"
    shutil.copytree(written_ledger.data_dir, target)
    broker = LiveBroker(target)
    try:
        yield broker, Ledger(target, written_ledger.verifier_key, list(written_ledger.issued))
    finally:
        broker.stop()
