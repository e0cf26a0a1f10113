"""broker.heap: start-up objects frozen out of the collector's walks, released when replaced."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from broker import heap
from broker.api.app import create_app
from broker.config import Settings

POLICIES = Path(__file__).resolve().parents[2] / "policies"


class _Cycle:
    """A container that refers to itself: only the cycle collector reclaims it."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def thawed() -> Iterator[None]:
    """Each test leaves the test process as it found it: nothing frozen, no freeze pending."""
    heap.thaw()
    yield
    heap.thaw()
    gc.collect()
    assert gc.get_freeze_count() == 0


def test_settle_collects_garbage_then_freezes_the_survivors(thawed: None) -> None:
    dead = _Cycle()
    dead_ref = weakref.ref(dead)
    live = _Cycle()
    del dead
    assert heap.settle() > 0
    assert dead_ref() is None  # collected before the freeze, not frozen as garbage
    assert gc.get_freeze_count() > 0
    assert live.me is live


def test_a_frozen_cycle_is_not_collected_until_released(thawed: None) -> None:
    old = _Cycle()
    old_ref = weakref.ref(old)
    heap.settle()
    del old  # replaced, as a reloaded policy set replaces the one frozen at start-up
    gc.collect()
    assert old_ref() is not None  # frozen: invisible to the collector
    heap.release()
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert old_ref() is None  # the next full collection reclaims it...
    assert gc.get_freeze_count() > 0  # ...and freezes the survivors again


def test_thaw_cancels_a_pending_freeze(thawed: None) -> None:
    heap.settle()
    heap.release()
    heap.thaw()
    gc.collect()
    assert gc.get_freeze_count() == 0


def test_release_without_settle_changes_nothing(thawed: None) -> None:
    heap.release()
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert gc.get_freeze_count() == 0


def test_a_young_collection_does_not_refreeze(thawed: None) -> None:
    heap.settle()
    heap.release()
    gc.collect(0)
    assert gc.get_freeze_count() == 0  # only a full collection has walked the released objects
    gc.collect()
    assert gc.get_freeze_count() > 0


def test_a_serving_app_freezes_its_start_up_and_a_reload_releases_it(thawed: None, tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path / "data", policies_dir=POLICIES), serving=True)
    with TestClient(app):
        assert gc.get_freeze_count() > 0
        runtime = app.state.runtime
        runtime.install_policies(runtime.policies)  # as a live reload swaps a set in
        assert gc.get_freeze_count() == 0


def test_an_app_in_a_shared_process_freezes_nothing(thawed: None, tmp_path: Path) -> None:
    with TestClient(create_app(Settings(data_dir=tmp_path / "data", policies_dir=POLICIES))):
        assert gc.get_freeze_count() == 0
