"""Event-loop lag: how late the loop wakes a timer, the symptom of anything blocking it.

:class:`LoopLagMonitor` sleeps for a fixed ``interval`` over and over on the loop it watches and
records how much later than asked each wake-up came. A blocking call on the loop (a synchronous
database call, a thread lock, a long computation) shows up as lag of about its duration.

Lag also grows when the machine is short of CPU: the loop's thread is ready but the kernel runs
something else. On Linux the monitor reads the thread's run-queue wait (``/proc/thread-self/schedstat``)
and reports apart the part of the lag that waiting for a CPU does not explain: the time the loop was
really blocked (by this process's code, a lock, a system call, or another thread holding the GIL).
Both go to ``GET /metrics``: ``nhi_broker_event_loop_lag_seconds`` and
``nhi_broker_event_loop_blocked_seconds`` (histograms), with their largest values since the start;
``tests/api/test_loop_lag.py`` holds the blocked part to 50 ms while backends misbehave.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

__all__ = ["LAG_INTERVAL", "LoopLagMonitor", "run_queue_wait"]

#: Seconds between wake-ups: a stall shows within this much of its true length.
LAG_INTERVAL = 0.01


def run_queue_wait(path: str = "/proc/thread-self/schedstat") -> Callable[[], float] | None:
    """A reader of the seconds the calling thread has spent ready to run but waiting for a CPU.

    ``None`` where the kernel does not publish it (not Linux, no schedstats). The file is opened
    once, by the thread it describes, and re-read in place (a few microseconds).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
        os.pread(fd, 128, 0).split()[1]
    except (OSError, IndexError):
        return None

    def read() -> float:
        return int(os.pread(fd, 128, 0).split()[1]) / 1e9

    return read


class LoopLagMonitor:
    """Measures the lag of the running event loop.

    ``record(lag, blocked)`` receives each sample in seconds: the wall-clock lag, and the part of it
    not spent waiting for a CPU (equal to ``lag`` where the run-queue wait is not available).
    """

    def __init__(self, record: Callable[[float, float], None], interval: float = LAG_INTERVAL) -> None:
        self._record = record
        self._interval = interval

    async def run(self) -> None:
        """Measure until cancelled."""
        interval = self._interval
        waited = run_queue_wait()  # opened here: on the loop's own thread
        before = waited() if waited is not None else 0.0
        while True:
            asked = time.perf_counter() + interval
            await asyncio.sleep(interval)
            lag = max(0.0, time.perf_counter() - asked)
            if waited is None:
                self._record(lag, lag)
                continue
            now = waited()
            self._record(lag, max(0.0, lag - (now - before)))
            before = now
