"""A one-line progress bar on stderr, drawn only on a terminal (no dependency needed for this)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["ProgressBar"]


class ProgressBar:
    """``bar(done, total)`` redraws at most ten times a second; :meth:`close` ends the line.

    Off when the stream is not a terminal (logs and pipes stay clean) unless ``force`` is set.
    """

    def __init__(self, label: str, *, stream: TextIO | None = None, force: bool = False, width: int = 30) -> None:
        self._stream = stream or sys.stderr
        self._on = force or self._stream.isatty()
        self._label = label
        self._width = width
        self._started = time.monotonic()
        self._last = 0.0
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        if not self._on:
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        fraction = done / total if total else 1.0
        filled = int(fraction * self._width)
        rate = done / max(now - self._started, 1e-6)
        self._stream.write(
            f"\r{self._label} [{'#' * filled}{'.' * (self._width - filled)}] {fraction:4.0%} "
            f"{done}/{total} {rate:,.0f}/s"
        )
        self._stream.flush()
        self._drawn = True

    def close(self) -> None:
        """Finish the line so later output starts on its own."""
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
