"""Injectable time. Verification code takes a :class:`Clock`; it never calls ``time.time()``."""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["Clock", "FixedClock", "SystemClock"]


class Clock(Protocol):
    """A source of the current time in seconds since the epoch."""

    def now(self) -> float: ...


class SystemClock:
    """The wall clock."""

    def now(self) -> float:
        return time.time()


class FixedClock:
    """A clock for tests: it shows ``t`` until moved with :meth:`advance` or :meth:`set`."""

    def __init__(self, t: float) -> None:
        self._t = float(t)

    def now(self) -> float:
        return self._t

    def advance(self, seconds: float) -> None:
        self._t += seconds

    def set(self, t: float) -> None:
        self._t = float(t)
