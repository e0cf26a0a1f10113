"""One CPU per worker process: keep a worker's event loop and its storage threads on one core.

Every exchange hands work between a worker's event-loop thread and its storage threads (the SQLite
state store's thread, the ledger's writer) and back. When the kernel spreads those threads over
different CPUs, each hand-off wakes a sleeping CPU and the GIL changes hands across cores; on a
2-core virtual machine under ``scripts/bench_exchange.py`` that cost more than the work handed over.
With ``worker_cpu_affinity = "on"`` and at least as many usable CPUs as workers, each worker takes
one CPU of the set it may run on (:func:`os.sched_getaffinity`) and keeps to it, with every thread it
starts afterwards.

It is off by default, because a pinned worker cannot move away from a CPU that another program keeps
busy: measured on the 2-core machine with ``scripts/bench_exchange.py --compare-openbao`` (OpenBao's
server still working in the background after its own run), p99 at 32 connections was 515 and 861 ms
pinned against 44 ms unpinned (probably a preempted worker holding the ledger's cross-process
append turn). On a host that runs nothing else busy, pinning saves the cross-core hand-offs (see
docs/decisions.md for both measurements).

A worker claims its CPU by holding an exclusive ``flock`` on ``<data_dir>/workers/cpu-<n>.lock`` for
its whole life: the kernel drops the lock when the process ends, so a worker that replaces a dead one
takes the CPU it left. If every CPU is held (more workers than CPUs, or another server on the same
data dir), the worker runs unpinned, as with ``"off"``.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

__all__ = ["claim_cpu"]

log = logging.getLogger("nhi_broker.affinity")

#: File descriptors of the locks this process holds (one at most): open until the process ends.
_held: list[int] = []


def claim_cpu(data_dir: Path, workers: int) -> int | None:
    """Pin the calling process to a CPU no other worker of ``data_dir`` holds; that CPU, or ``None``.

    ``None`` (nothing changed) when pinning cannot help or cannot be done: one worker, fewer usable
    CPUs than workers, a platform without CPU affinity, or every CPU already claimed. Call it before
    the process starts the threads that should share its CPU.
    """
    if _held:
        return os.sched_getaffinity(0).pop()
    if workers < 2 or not hasattr(os, "sched_setaffinity") or not hasattr(os, "sched_getaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < workers:
        return None
    locks = data_dir / "workers"
    locks.mkdir(mode=0o700, parents=True, exist_ok=True)
    for cpu in allowed:
        fd = os.open(locks / f"cpu-{cpu}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _held.append(fd)
        os.sched_setaffinity(0, {cpu})
        log.info("worker %d keeps to CPU %d (worker_cpu_affinity)", os.getpid(), cpu)
        return cpu
    return None
