"""One live broker for the SDK tests (a real `nhi-broker serve` over HTTP)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from broker.attest.dev import DevIssuer
from broker.clock import SystemClock
from tests.helpers import SUPPORT, LiveBroker


@pytest.fixture(scope="package")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveBroker]:
    live = LiveBroker(Path(tmp_path_factory.mktemp("sdk")) / "data")
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="package")
def identity(broker: LiveBroker) -> Callable[[], str]:
    """A fresh single-use workload identity JWT of the support assistant per call (the trial issuer)."""
    issuer = DevIssuer.load_or_create(broker.data_dir)
    return lambda: issuer.mint(SUPPORT, "nhi-broker", clock=SystemClock())
