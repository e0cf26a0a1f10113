"""Fixtures for shared state: both real backends, and a Redis server of the test's own."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from broker.clock import SystemClock
from broker.state.redis import RedisStateStore
from broker.state.remote import RemoteStateStore
from broker.state.sqlite import SqliteStateStore
from broker.state.store import StateStore
from broker.storaged.processes import StorageProcess
from tests.helpers import free_port, storage_processes_by_dir

#: The shared development Redis; every test uses its own key prefix and deletes its keys.
SHARED_REDIS = "redis://127.0.0.1:6379/0"
BACKENDS = ["sqlite", "redis"]
#: Store-level suites also run "storaged": the SQLite file served by a real storage process
#: (broker.storaged), as each worker of `serve --workers 2` uses it.
STORE_BACKENDS = [*BACKENDS, "storaged"]
# The storage process each "storaged" test runs, by the test's tmp_path (started and stopped by `backend`);
# kept in tests.helpers because pytest may import this conftest twice (as a conftest and as a module).
_STORAGE_PROCESSES: dict[Path, StorageProcess] = storage_processes_by_dir()


def unique_prefix() -> str:
    return f"nhi-test-{uuid.uuid4().hex[:12]}:"


def drop_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A fresh key prefix on the shared Redis, cleaned up afterwards. Fails (never skips) without Redis."""
    client = redis.Redis.from_url(SHARED_REDIS)
    client.ping()
    client.close()
    prefix = unique_prefix()
    yield prefix
    drop_prefix(SHARED_REDIS, prefix)


def make_store(backend: str, tmp_path: Path, prefix: str) -> StateStore:
    if backend == "redis":
        # A roomier timeout than the broker's 0.5 s: racing tests open many connections at once on a
        # shared, busy machine; what they check is atomicity, not the fail-fast window.
        return RedisStateStore(SHARED_REDIS, prefix=prefix, clock=SystemClock(), timeout=3.0)
    if backend == "storaged":
        return RemoteStateStore(_STORAGE_PROCESSES[tmp_path].sockets["state"], clock=SystemClock(), timeout=3.0)
    return SqliteStateStore(tmp_path / "state.sqlite3", clock=SystemClock())


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def store_backend(name: str, tmp_path: Path) -> Iterator[str]:
    """Body of a ``backend`` fixture over :data:`STORE_BACKENDS`: runs the storage process "storaged" needs."""
    if name != "storaged":
        yield name
        return
    processes = StorageProcess.launch({"state": str(tmp_path / "state.sqlite3")})
    _STORAGE_PROCESSES[tmp_path] = processes
    try:
        yield name
    finally:
        del _STORAGE_PROCESSES[tmp_path]
        processes.stop()


@pytest.fixture
async def store(backend: str, tmp_path: Path, redis_prefix: str) -> AsyncIterator[StateStore]:
    s = make_store(backend, tmp_path, redis_prefix)
    yield s
    await s.close()


class OwnRedis:
    """A redis-server on a free loopback port, without persistence, that a test may stop and restart."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        assert exe, "redis-server is required for the fail-closed tests"
        self.exe = exe
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
                client.ping()
                client.close()
                return
            except redis.ConnectionError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    server = OwnRedis()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def black_hole() -> Iterator[str]:
    """A URL whose server accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()
