"""The storage process's loop: one thread, one handler, every worker's calls batched together.

``nhi-broker serve`` with several workers starts one storage process for its embedded SQLite files,
the state file and the ledger (:mod:`broker.storaged.processes`); each worker sends its calls over a
Unix socket. The loop waits for readable sockets, reads what every worker sent, hands all of it to
the handler as one batch (one state transaction, one ledger fsync), and writes each worker its
replies of each phase in one frame. While a batch commits, the next one queues in the sockets: group
commit without threads, locks or turn-taking between workers.

The process stops when its control pipe closes (the supervisor exited or is stopping it), after
answering what it already read. SIGINT and SIGTERM are ignored: a terminal's Ctrl-C or a service
manager's stop reaches the workers too, and they may still be finishing requests that need this
process; the supervisor ends it after them.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import selectors
import signal
import socket
import struct
import sys
from collections.abc import Sequence

from broker.storaged.handlers import Call, Reply, StorageHandler
from broker.storaged.wire import FrameReader, WireError, encode

__all__ = ["StorageServer", "main"]

log = logging.getLogger("nhi_broker.storaged")

_READ_CHUNK = 256 * 1024
# A worker that stops reading its replies is cut off once this much is waiting for it.
_MAX_PENDING_OUT = 64 * 1024 * 1024
_PEERCRED = struct.Struct("3i")


class _Peer:
    __slots__ = ("out", "reader", "sock", "writing")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = FrameReader()
        self.out = bytearray()
        self.writing = False  # registered for EVENT_WRITE (replies wait for room in the socket)


class StorageServer:
    """Serves ``handler`` on ``listener`` (a bound, listening Unix socket) until ``control_fd`` closes."""

    def __init__(self, listener: socket.socket, handler: StorageHandler, control_fd: int | None = None) -> None:
        self._listener = listener
        self._handler = handler
        self._control_fd = control_fd
        self._selector = selectors.DefaultSelector()
        self._peers: dict[int, _Peer] = {}
        self._stopping = False

    def serve(self) -> None:
        """Run until the control pipe closes; then answer what was read and return."""
        self._listener.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        if self._control_fd is not None:
            self._selector.register(self._control_fd, selectors.EVENT_READ, "control")
        try:
            while not self._stopping:
                self._turn()
        finally:
            for peer in list(self._peers.values()):
                self._drop(peer)
            self._selector.close()

    def _turn(self) -> None:
        calls: list[tuple[_Peer, Call]] = []
        for key, mask in self._selector.select():
            if key.data is None:
                self._accept()
            elif key.data == "control":
                if not os.read(key.fd, 64):
                    self._stopping = True
            else:
                peer: _Peer = key.data
                if mask & selectors.EVENT_WRITE:
                    self._send(peer)
                if mask & selectors.EVENT_READ:
                    self._receive(peer, calls)
        if calls:
            self._answer(calls)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("storage process cannot accept a worker (%s)", exc.strerror)
                    return
                raise
            # Only processes of this user: the socket's directory already admits no one else.
            _, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
            if uid != os.geteuid():
                sock.close()
                continue
            sock.setblocking(False)
            peer = _Peer(sock)
            self._peers[sock.fileno()] = peer
            self._selector.register(sock, selectors.EVENT_READ, peer)

    def _receive(self, peer: _Peer, calls: list[tuple[_Peer, Call]]) -> None:
        try:
            data = peer.sock.recv(_READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(peer)
            return
        try:
            frames = peer.reader.feed(data)
            for frame in frames:
                for call in frame:
                    call_id, op, args = call
                    if not isinstance(call_id, int) or not isinstance(op, str) or not isinstance(args, tuple):
                        raise WireError("malformed call")
                    calls.append((peer, (call_id, op, args)))
        except (WireError, TypeError, ValueError):
            log.error("storage process dropped a worker that sent a malformed frame")
            self._drop(peer)

    def _answer(self, calls: list[tuple[_Peer, Call]]) -> None:
        # The handler sees one sequence number per call (ids are unique per worker, not across them).
        routes = [(peer, call[0]) for peer, call in calls]
        for replies in self._handler.handle([(seq, op, args) for seq, (_, (_, op, args)) in enumerate(calls)]):
            outgoing: dict[int, tuple[_Peer, list[Reply]]] = {}
            for seq, ok, value in replies:
                peer, call_id = routes[seq]
                outgoing.setdefault(id(peer), (peer, []))[1].append((call_id, ok, value))
            for peer, batch in outgoing.values():
                if peer.sock.fileno() < 0:
                    continue  # the worker went away meanwhile
                peer.out += encode(batch)
                self._send(peer)

    def _send(self, peer: _Peer) -> None:
        if peer.sock.fileno() < 0:
            return
        try:
            sent = peer.sock.send(peer.out) if peer.out else 0
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop(peer)
            return
        del peer.out[:sent]
        if len(peer.out) > _MAX_PENDING_OUT:
            log.error("storage process dropped a worker that stopped reading its replies")
            self._drop(peer)
            return
        if bool(peer.out) != peer.writing:  # one epoll_ctl only when the interest changes
            peer.writing = bool(peer.out)
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if peer.writing else 0)
            self._selector.modify(peer.sock, events, peer)

    def _drop(self, peer: _Peer) -> None:
        fd = peer.sock.fileno()
        if fd < 0:
            return
        self._peers.pop(fd, None)
        try:
            self._selector.unregister(peer.sock)
        except (KeyError, ValueError):
            pass
        peer.sock.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m broker.storaged [--state FILE] [--ledger URL] --listen-fd N --control-fd N --ready-fd N``."""
    parser = argparse.ArgumentParser(prog="python -m broker.storaged")
    parser.add_argument("--state", help="the SQLite state file")
    parser.add_argument("--ledger", help="the ledger storage URL (sqlite:///...)")
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--log-format", default="text")
    args = parser.parse_args(argv)
    if args.state is None and args.ledger is None:
        parser.error("give --state, --ledger or both")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from broker.logs import configure_logging

    configure_logging(args.log_format)
    listener = socket.socket(fileno=args.listen_fd)
    from broker.ledger.engines import open_ledger_storage
    from broker.storaged.handlers import LedgerHandler, StateHandler

    state = StateHandler(args.state) if args.state is not None else None
    try:
        ledger = LedgerHandler(open_ledger_storage(args.ledger)) if args.ledger is not None else None
    except BaseException:
        if state is not None:
            state.close()
        raise
    handler = StorageHandler(state, ledger)
    try:
        os.write(args.ready_fd, b"ready\n")
        os.close(args.ready_fd)
        StorageServer(listener, handler, args.control_fd).serve()
    finally:
        handler.close()
        listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
