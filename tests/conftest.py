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


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A uniquely named PostgreSQL database for this test session, dropped after it."""
    from tests.pg import create_database, drop_database

    url = create_database()
    try:
        yield url
    finally:
        drop_database(url)


@pytest.fixture
def pg_url(pg_database: str) -> str:
    """A fresh, migrated schema in the session database: a clean shared ledger."""
    from tests.pg import new_schema

    return new_schema(pg_database)
