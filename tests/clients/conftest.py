"""One live broker for the SDK tests (a real `nhi-broker serve` over HTTP)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from broker.attest.dev import DevIssuer, DevUserIssuer
from broker.clock import SystemClock
from tests.helpers import POLICIES, SUPPORT, LiveBroker


@pytest.fixture(scope="package")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveBroker]:
    """One broker for the SDK tests, on the sample policies without their rates and budgets.

    The SDK tests make many refunds against one broker; the sample limits (30 refunds a minute,
    200 EUR per conversation a day) would refuse the later ones. tests/state tests the limits.
    """
    root = Path(tmp_path_factory.mktemp("sdk"))
    policies = root / "policies"
    shutil.copytree(POLICIES, policies)
    (policies / "limits.toml").unlink()
    live = LiveBroker(root / "data", policies=policies)
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="package")
def identity(broker: LiveBroker) -> Callable[[], str]:
    """A fresh single-use workload identity JWT of the support assistant per call (the trial issuer)."""
    issuer = DevIssuer.load_or_create(broker.data_dir)
    return lambda: issuer.mint(SUPPORT, "nhi-broker", clock=SystemClock())


@pytest.fixture(scope="package")
def customer(broker: LiveBroker) -> Callable[[], str]:
    """A fresh token of the signed-in customer c-42 per call (the trial user issuer): refunds are
    delegated (``BrokerClient(actor=identity, user_token=customer)``), the sample policy needs it."""
    users = DevUserIssuer.load_or_create(broker.data_dir)
    return lambda: users.mint_user("c-42", "nhi-broker", clock=SystemClock())
