"""Lanes (broker.isolation) and the event-loop lag monitor (broker.looplag): real threads, real time."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from broker.errors import TemporarilyUnavailable
from broker.isolation import Lane, LaneUnavailable
from broker.looplag import LoopLagMonitor, run_queue_wait


def test_a_hanging_call_fails_closed_at_the_deadline_and_keeps_its_slot() -> None:
    release = threading.Event()
    lane = Lane("test backend", 1, 0.2, queue_factor=1)

    async def scenario() -> None:
        started = time.perf_counter()
        with pytest.raises(LaneUnavailable, match=r"did not answer within 0\.2 s") as caught:
            await lane.run(release.wait)
        assert 0.15 < time.perf_counter() - started < 2.0
        assert isinstance(caught.value, TemporarilyUnavailable)  # answered as 503 temporarily_unavailable
        # The thread is still blocked in the backend, so the slot is still taken.
        assert lane.pending == 1
        release.set()
        deadline = time.monotonic() + 5
        while lane.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert lane.pending == 0
        assert await lane.run(lambda: 42) == 42

    try:
        asyncio.run(scenario())
    finally:
        release.set()
        lane.close()


def test_a_call_whose_caller_gave_up_never_starts() -> None:
    release = threading.Event()
    ran: list[str] = []
    lane = Lane("test backend", 1, 0.2, queue_factor=1)

    async def scenario() -> None:
        blocker = asyncio.ensure_future(lane.run(release.wait))
        await asyncio.sleep(0.05)
        with pytest.raises(LaneUnavailable):
            await lane.run(ran.append, "queued")  # waits behind the blocker, gives up at 0.2 s
        release.set()
        with pytest.raises(LaneUnavailable):
            await blocker
        await lane.run(ran.append, "later")

    try:
        asyncio.run(scenario())
    finally:
        release.set()
        lane.close()
    assert ran == ["later"]


def test_a_full_lane_refuses_at_once() -> None:
    release = threading.Event()
    lane = Lane("test backend", 1, 5.0, queue_factor=1)  # one running, one waiting

    async def scenario() -> None:
        held = [asyncio.ensure_future(lane.run(release.wait)) for _ in range(2)]
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        with pytest.raises(LaneUnavailable, match="too many calls waiting"):
            await lane.run(lambda: None)
        assert time.perf_counter() - started < 0.1
        release.set()
        await asyncio.gather(*held)

    try:
        asyncio.run(scenario())
    finally:
        release.set()
        lane.close()


def test_lanes_do_not_share_threads() -> None:
    # One backend hanging with its lane full leaves another backend's lane free.
    release = threading.Event()
    hanging, healthy = Lane("hanging", 2, 5.0), Lane("healthy", 2, 5.0)

    async def scenario() -> None:
        held = [asyncio.ensure_future(hanging.run(release.wait)) for _ in range(10)]
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        assert await healthy.run(lambda: "ok") == "ok"
        assert time.perf_counter() - started < 0.5
        release.set()
        await asyncio.gather(*held)

    try:
        asyncio.run(scenario())
    finally:
        release.set()
        hanging.close()
        healthy.close()


@pytest.mark.parametrize("block", [
    pytest.param(lambda: time.sleep(0.12), id="sleeping-call"),
    pytest.param(lambda: sum(range(6_000_000)), id="cpu-bound-call"),
])
def test_the_monitor_sees_a_blocked_loop(block: object) -> None:
    samples: list[tuple[float, float]] = []

    async def scenario() -> None:
        monitor = asyncio.ensure_future(LoopLagMonitor(lambda lag, blocked: samples.append((lag, blocked))).run())
        await asyncio.sleep(0.05)
        waited = run_queue_wait()
        assert waited is not None
        started, waited_before = time.perf_counter(), waited()
        block()  # type: ignore[operator]
        # The loop's thread was blocked for this long; on a busy machine it also waited for a CPU.
        took = time.perf_counter() - started - (waited() - waited_before)
        await asyncio.sleep(0.05)
        monitor.cancel()
        largest = max(blocked for _, blocked in samples)
        # The block shows (less at most one interval of 10 ms, plus scheduling noise).
        assert largest >= took - 0.03, (largest, took)
        assert took >= 0.05

    asyncio.run(scenario())


def test_run_queue_wait_reads_this_threads_schedstat() -> None:
    read = run_queue_wait()
    assert read is not None  # Linux publishes it; elsewhere the monitor reports blocked = lag
    first = read()
    assert first >= 0.0 and read() >= first
