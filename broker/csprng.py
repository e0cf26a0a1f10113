"""Random bytes for identifiers from the OS CSPRNG, read ahead in one call per 4 KiB.

Every exchange needs fresh random identifiers: the task token's ``jti``, the request id, the trace
and span ids. ``os.urandom`` releases the GIL on each call, and on a busy event loop every release is
a hand-off to another thread of the worker; :func:`random_bytes` reads ahead so that happens once per
4 KiB. The bytes are the kernel's, unchanged, and never handed out twice; a forked child forgets the
parent's (two processes must never share an identifier).
"""

from __future__ import annotations

import os
import threading

__all__ = ["RandomPool", "random_bytes", "random_hex"]


class RandomPool:
    """Random bytes from the OS CSPRNG, read 4 KiB at a time and never handed out twice (a forked
    child forgets what its parent read). The lock is held only to hand out a slice."""

    _SIZE = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer = b""
        self._at = 0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._buffer, self._at = b"", 0

    def take(self, n: int) -> bytes:
        """The next ``n`` bytes."""
        with self._lock:
            at = self._at
            if at + n > len(self._buffer):
                self._buffer, at = os.urandom(max(self._SIZE, n)), 0
            self._at = at + n
            return self._buffer[at : at + n]


_POOL = RandomPool()


def random_bytes(n: int) -> bytes:
    """``n`` bytes from the OS CSPRNG (through the process's read-ahead pool)."""
    return _POOL.take(n)


def random_hex(n: int) -> str:
    """``n`` random bytes as ``2n`` lower-case hex digits (as :func:`secrets.token_hex`)."""
    return _POOL.take(n).hex()
