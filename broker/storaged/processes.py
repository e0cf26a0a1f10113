"""The storage process of ``nhi-broker serve``: started before the workers, restarted if it dies.

With several worker processes on embedded SQLite, one storage process (:mod:`broker.storaged.server`)
writes the embedded files for all of them: ``state`` (the SQLite state store) and ``ledger`` (the
SQLite ledger's appends), whichever the settings use. Holding both, it can admit an exchange and
record its issuance in one call (``admit_append``). The supervisor binds its Unix socket itself, in a
fresh directory only this user can enter, and hands the child its listening socket: a worker can
connect before the child is ready, and a child that died is replaced on the same socket while the
workers' calls fail closed (503) for the moment it takes. Workers learn the socket of each kind from
``$NHI_STORAGE_SOCKETS`` (:func:`sockets_from_environment`). The child ends when the supervisor
closes its control pipe (:meth:`StorageProcess.stop`, after the workers stopped) or exits, however
it exits.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from broker.config import Settings
from broker.errors import ConfigError
from broker.ledger.engines import is_shared

__all__ = ["SOCKETS_ENV", "StorageProcess", "sockets_from_environment"]

log = logging.getLogger("nhi_broker.storaged")

#: ``{"state": path, "ledger": path}`` (either may be absent; both name the one socket) for the workers.
SOCKETS_ENV = "NHI_STORAGE_SOCKETS"
_READY_TIMEOUT = 60.0
_STOP_TIMEOUT = 30.0


def sockets_from_environment() -> dict[str, str]:
    """The storage sockets ``nhi-broker serve`` gave this worker (empty when it runs none)."""
    raw = os.environ.get(SOCKETS_ENV)
    if not raw:
        return {}
    sockets = json.loads(raw)
    return {kind: str(path) for kind, path in sockets.items() if kind in ("state", "ledger")}


@dataclass
class _Child:
    targets: dict[str, str]
    listener: socket.socket
    process: subprocess.Popen[bytes] | None = None
    control: int | None = None
    started_at: float = field(default_factory=time.monotonic)


class StorageProcess:
    """The running storage process of one ``serve``; :meth:`stop` ends it (idempotent)."""

    def __init__(self, directory: Path, log_format: str = "text") -> None:
        self._child: _Child | None = None
        self._log_format = log_format
        self._directory = directory
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self._exported = False

    @classmethod
    def start(cls, settings: Settings) -> StorageProcess | None:
        """Start the storage process ``settings`` call for; ``None`` when there is none to run
        (one worker, or Redis state with a PostgreSQL ledger). Sets :data:`SOCKETS_ENV`."""
        if settings.workers < 2:
            return None
        targets: dict[str, str] = {}
        if settings.state_backend == "sqlite":
            targets["state"] = str(settings.data_dir.resolve() / "state.sqlite3")
        if not is_shared(settings.ledger_storage_url):
            targets["ledger"] = settings.ledger_storage_url
        if not targets:
            return None
        process = cls.launch(targets, log_format=settings.log_format)
        os.environ[SOCKETS_ENV] = json.dumps(process.sockets)
        process._exported = True
        return process

    @classmethod
    def launch(cls, targets: dict[str, str], *, log_format: str = "text") -> StorageProcess:
        """Start the storage process for ``{kind: file}`` (``state``: a SQLite state file; ``ledger``: a
        ledger storage URL) on one socket (:attr:`sockets`), watched and restarted."""
        if not targets or not set(targets) <= {"state", "ledger"}:
            raise ValueError("storage targets are 'state' and/or 'ledger'")
        process = cls(Path(tempfile.mkdtemp(prefix="nhi-broker-storage-")), log_format)  # mode 0700
        try:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(process._directory / "storage.sock"))
            listener.listen(128)
            process._child = _Child(dict(targets), listener)
            process._spawn(process._child)
        except BaseException:
            process.stop()
            raise
        process._watcher = threading.Thread(target=process._watch, args=(process._child,), name="storaged",
                                            daemon=True)
        process._watcher.start()
        return process

    @property
    def sockets(self) -> dict[str, str]:
        """The socket path serving each kind (``state``, ``ledger``): one socket for both."""
        kinds = self._child.targets if self._child is not None else {}
        return {kind: str(self._directory / "storage.sock") for kind in kinds}

    def _spawn(self, child: _Child) -> None:
        """Start ``child``'s process and wait until it has opened its files (:class:`ConfigError` if not)."""
        control_read, control_write = os.pipe()
        ready_read, ready_write = os.pipe()
        files = [arg for kind, target in child.targets.items() for arg in (f"--{kind}", target)]
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "broker.storaged", *files,
                 "--listen-fd", str(child.listener.fileno()), "--control-fd", str(control_read),
                 "--ready-fd", str(ready_write), "--log-format", self._log_format],
                pass_fds=(child.listener.fileno(), control_read, ready_write), stdin=subprocess.DEVNULL,
            )
        finally:
            os.close(control_read)
            os.close(ready_write)
        try:
            readable, _, _ = select.select([ready_read], [], [], _READY_TIMEOUT)
            ready = os.read(ready_read, 16) if readable else b""
        finally:
            os.close(ready_read)
        if ready != b"ready\n":
            os.close(control_write)
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            raise ConfigError(f"the storage process did not start (exit status {process.returncode})")
        child.process = process
        child.control = control_write
        child.started_at = time.monotonic()

    def _watch(self, child: _Child) -> None:
        """Replace ``child``'s process whenever it ends before :meth:`stop`."""
        delay = 0.2
        while not self._stopping.is_set():
            process = child.process
            if process is None:
                return
            status = process.wait()
            if self._stopping.is_set():
                return
            log.error("the storage process exited (status %s): restarting it; its callers fail closed meanwhile",
                      status)
            if child.control is not None:
                os.close(child.control)
                child.control = None
            if time.monotonic() - child.started_at > 10:
                delay = 0.2
            while not self._stopping.wait(delay):
                try:
                    self._spawn(child)
                    break
                except (ConfigError, OSError) as exc:
                    log.error("the storage process cannot restart (%s): retrying", exc)
                    delay = min(delay * 2, 5.0)

    def stop(self) -> None:
        """End the storage process after what it already read (call it once the workers stopped)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        child = self._child
        if child is not None:
            if child.control is not None:
                os.close(child.control)  # EOF: the child answers what it read and exits
                child.control = None
            if child.process is not None:
                try:
                    child.process.wait(_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    log.error("the storage process did not stop in time: killing it")
                    child.process.kill()
                    child.process.wait()
            child.listener.close()
        if self._exported:
            os.environ.pop(SOCKETS_ENV, None)
        shutil.rmtree(self._directory, ignore_errors=True)

    @property
    def pids(self) -> dict[str, int]:
        """The current process id serving each kind (for tests and operators): one process for both."""
        child = self._child
        if child is None or child.process is None:
            return {}
        return {kind: child.process.pid for kind in child.targets}
