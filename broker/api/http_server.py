"""The HTTP/1.1 protocol ``nhi-broker serve`` runs: uvicorn's httptools protocol, with a bounded head.

uvicorn bounds nothing about the request head when it parses with httptools: one header value of
64 MiB from an unauthenticated client grew a worker by 129 MiB (measured with
``scripts/measure_body_memory.py``'s approach), because the parser buffers a header until it ends.
:class:`BoundedHttpToolsProtocol` counts the bytes of each request line and header block as they
arrive and answers ``431 Request Header Fields Too Large`` (RFC 6585 §5) with an RFC 6749-style
JSON body as soon as they pass :data:`MAX_REQUEST_HEAD`, before the parser sees more. Bodies are
bounded by the routes themselves (``broker.api.forms.read_body``).
"""

from __future__ import annotations

import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["MAX_REQUEST_HEAD", "BoundedHttpToolsProtocol"]

#: The most bytes a request line plus its headers may take (nginx's default allows 32 KiB; identity
#: tokens and DPoP proofs are at most 8 KiB each).
MAX_REQUEST_HEAD = 64 * 1024

_BODY = json.dumps({"error": "invalid_request",
                    "error_description": f"the request line and headers exceed {MAX_REQUEST_HEAD} bytes"}).encode()
_REFUSAL = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
    b"cache-control: no-store\r\ncontent-length: " + str(len(_BODY)).encode() + b"\r\nconnection: close\r\n\r\n" + _BODY
)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol that refuses a request head over :data:`MAX_REQUEST_HEAD` bytes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._in_head = True
        self._messages = 0

    def data_received(self, data: bytes) -> None:
        while data:
            if not self._in_head:
                super().data_received(data)
                return
            room = MAX_REQUEST_HEAD - self._head_bytes
            if len(data) <= room:
                self._head_bytes += len(data)
                super().data_received(data)
                return
            # Feed what fits: the head may end inside it, and then the rest is body or the next request.
            messages, self._head_bytes = self._messages, MAX_REQUEST_HEAD
            super().data_received(data[:room])
            if self.transport.is_closing():
                return
            if self._in_head and self._messages == messages:
                self.transport.write(_REFUSAL)
                self.transport.close()
                return
            data = data[room:]

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # The next request on this connection starts its own count.
        self._in_head, self._head_bytes, self._messages = True, 0, self._messages + 1
