"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import LiveBroker


@pytest.fixture
def live_broker(tmp_path: Path) -> Iterator[LiveBroker]:
    broker = LiveBroker(tmp_path / "data")
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def anyio_backend() -> str:
    """Async tests (``pytest.mark.anyio``) run on asyncio, the loop the broker serves on."""
    return "asyncio"
