"""What every benchmark's Markdown output states: the machine, the load and the command.

The README's performance tables are pasted from the bench scripts' ``--markdown`` output as is; this
module writes the line above each table, so a reader can tell what the numbers were measured on.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from pathlib import Path

__all__ = ["load_average", "machine", "markdown_caption"]


def machine() -> str:
    """One line naming the machine: cores, CPU model, kernel, Python."""
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores ({model}), Linux {platform.release()}, Python {platform.python_version()}"


def load_average() -> str:
    """The 1/5/15-minute load averages, as ``uptime`` prints them."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def markdown_caption(start_load: str) -> str:
    """The caption above a pasted table: the command as run, machine, load before and after, time."""
    command = " ".join([f"scripts/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    return (f"`{command}` — {machine()}; load average {start_load} before, {load_average()} after "
            f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).")
