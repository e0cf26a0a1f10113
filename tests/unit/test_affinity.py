"""broker.affinity: each worker of a data dir claims a CPU of its own, held for its life."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []

# A worker: claims, prints what it got and the affinity it now has, then waits until told to end.
_WORKER = """
import os, sys
from pathlib import Path
from broker.affinity import claim_cpu
cpu = claim_cpu(Path(sys.argv[1]), int(sys.argv[2]))
print(cpu, sorted(os.sched_getaffinity(0)), flush=True)
sys.stdin.read()
"""


def _start(data_dir: Path, workers: int) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(data_dir), str(workers)], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def _stop(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=30)


def test_each_worker_takes_a_cpu_of_its_own_and_keeps_to_it(tmp_path: Path) -> None:
    assert len(CPUS) >= 2, "this test needs a machine with at least 2 usable CPUs (CI has 2)"
    workers = [_start(tmp_path, len(CPUS)) for _ in CPUS]
    try:
        claimed = [line.split(" ", 1) for _, line in workers]
        cpus = [int(cpu) for cpu, _ in claimed]
        assert sorted(cpus) == CPUS  # one each, all different
        for cpu, affinity in claimed:
            assert affinity == f"[{cpu}]"
        # One more worker than CPUs: nothing left to claim, it runs unpinned.
        extra, line = _start(tmp_path, len(CPUS))
        assert line == f"None {CPUS}"
        _stop(extra)
    finally:
        for proc, _ in workers:
            _stop(proc)


def test_a_replacement_worker_takes_the_cpu_its_predecessor_left(tmp_path: Path) -> None:
    first, line = _start(tmp_path, 2)
    cpu = line.split(" ", 1)[0]
    _stop(first)  # it has exited: the kernel dropped its lock with it
    second, line = _start(tmp_path, 2)
    _stop(second)
    assert line.split(" ", 1)[0] == cpu


@pytest.mark.parametrize("workers", [1, len(CPUS) + 1])
def test_no_pinning_where_it_cannot_help(tmp_path: Path, workers: int) -> None:
    proc, line = _start(tmp_path, workers)
    _stop(proc)
    assert line == f"None {CPUS}"
