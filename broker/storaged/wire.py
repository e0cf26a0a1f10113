"""Frames between the workers and a storage process: a 4-byte big-endian length, then a ``marshal`` body.

A request frame is a list of calls ``(id, op, args)``; a reply frame a list of ``(id, ok, value)``,
where ``value`` is the call's result, or for ``ok = False`` the message of the error the caller
raises. Both ends are processes of one broker under one user (the socket lives in a directory only
that user can enter, and the server checks the peer's uid), and ``marshal`` carries only plain
values (numbers, strings, bytes, tuples, lists): it is the fastest codec of the standard library
for them. A frame that does not decode ends the connection, never the process.
"""

from __future__ import annotations

import marshal
import struct
from typing import Any

__all__ = ["MAX_FRAME", "FrameReader", "WireError", "encode"]

_HEADER = struct.Struct("!I")
#: Largest frame either side accepts (a batch of a thousand ledger entries is well under 4 MiB).
MAX_FRAME = 64 * 1024 * 1024


class WireError(ValueError):
    """The peer sent something that is not a frame of this protocol."""


def encode(message: Any) -> bytes:
    """One frame carrying ``message``."""
    body = marshal.dumps(message, 4)
    if len(body) > MAX_FRAME:
        raise WireError("frame too large")
    return _HEADER.pack(len(body)) + body


class FrameReader:
    """Reassembles frames from a byte stream."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        """The messages completed by ``data`` (possibly none); :class:`WireError` on a bad frame."""
        buffer = self._buffer
        buffer += data
        messages: list[Any] = []
        start = 0
        size = len(buffer)
        while size - start >= 4:
            (length,) = _HEADER.unpack_from(buffer, start)
            if length > MAX_FRAME:
                raise WireError("frame too large")
            end = start + 4 + length
            if end > size:
                break
            try:
                # Peers are this broker's own processes (see the module docstring).
                messages.append(marshal.loads(bytes(buffer[start + 4:end])))  # noqa: S302
            except (ValueError, EOFError, TypeError) as exc:
                raise WireError(f"undecodable frame ({type(exc).__name__})") from None
            start = end
        if start:
            del buffer[:start]
        return messages
