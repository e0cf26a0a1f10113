"""Test hosts in network namespaces, and the PostgreSQL and Redis servers they share.

:class:`Network` creates, as root, one Linux bridge in the test's own namespace and N network
namespaces ("hosts"), each joined to the bridge by a veth pair and given its own address; the
bridge's address is where the shared servers listen. Everything is torn down on exit, also after a
failure. Only addresses in one private /24 chosen not to overlap any route of this machine are used.

:class:`Postgres` is a throw-away PostgreSQL cluster (``initdb`` + ``pg_ctl`` as the ``postgres``
user, trust auth on the bridge subnet only) that the test can stop and start; :class:`Redis` a
throw-away ``redis-server``.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import psycopg

__all__ = ["Network", "Postgres", "Redis", "cannot_create_namespaces"]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def cannot_create_namespaces() -> str | None:
    """Why this machine cannot run the multi-host test, or ``None`` if it can."""
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    for tool in ("initdb", "pg_ctl", "redis-server", "runuser"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH"
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        return "there is no `postgres` user to run a private PostgreSQL as"
    probe = f"nhi-probe-{uuid.uuid4().hex[:6]}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _free_subnet() -> str:
    routes = _ip("-4", "route", "show", "table", "all").stdout + _ip("-4", "addr").stdout
    for _ in range(100):
        prefix = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"
        if prefix + "." not in routes:
            return prefix
    raise RuntimeError("no free private /24 found")


class Network:
    """A bridge plus ``hosts`` namespaces; ``address(i)`` is host i's address, ``gateway`` the bridge's."""

    def __init__(self, hosts: int) -> None:
        tag = uuid.uuid4().hex[:6]
        self.prefix = _free_subnet()
        self.gateway = f"{self.prefix}.1"
        self.bridge = f"nhib{tag}"
        self.namespaces = [f"nhi-{tag}-{i}" for i in range(hosts)]
        self._veths = [f"nhiv{tag}{i}" for i in range(hosts)]
        self._up = False

    def address(self, i: int) -> str:
        return f"{self.prefix}.{11 + i}"

    def __enter__(self) -> Network:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i, (ns, veth) in enumerate(zip(self.namespaces, self._veths, strict=True)):
                _ip("netns", "add", ns)
                _ip("link", "add", veth, "type", "veth", "peer", "name", veth + "p")
                _ip("link", "set", veth, "master", self.bridge)
                _ip("link", "set", veth, "up")
                _ip("link", "set", veth + "p", "netns", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", veth + "p")
                _ip("-n", ns, "link", "set", veth + "p", "up")
            self._up = True
        except BaseException:
            self.close()
            raise
        return self

    def exec_argv(self, i: int, argv: list[str]) -> list[str]:
        """``argv`` run inside host ``i``'s namespace."""
        return ["ip", "netns", "exec", self.namespaces[i], *argv]

    def close(self) -> None:
        for ns in self.namespaces:
            _ip("netns", "del", ns, check=False)
        for veth in self._veths:
            _ip("link", "del", veth, check=False)
        _ip("link", "del", self.bridge, check=False)

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


class Postgres:
    """A private PostgreSQL cluster on ``host:port`` (trust auth from ``subnet``), run as user postgres."""

    def __init__(self, root: Path, host: str, port: int, subnet: str) -> None:
        self.dir = root / "pgdata"
        self.host, self.port = host, port
        self.socket_dir = root / "pgsock"
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o755)  # noqa: S103 -- the postgres user must traverse it
        self.socket_dir.mkdir()
        shutil.chown(self.socket_dir, "postgres")
        self.dir.mkdir()
        shutil.chown(self.dir, "postgres")
        self.log = root / "postgres.log"
        self.log.touch()
        shutil.chown(self.log, "postgres")
        self._as_postgres(["initdb", "-D", str(self.dir), "-A", "trust", "-U", "postgres", "--no-sync",
                           "--no-instructions"])
        with (self.dir / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {subnet} trust\n")
        with (self.dir / "postgresql.conf").open("a") as conf:
            conf.write(f"listen_addresses = '{host}'\nport = {port}\nunix_socket_directories = '{self.socket_dir}'\n"
                       "fsync = on\nsynchronous_commit = on\nmax_connections = 60\nshared_buffers = 64MB\n")
        self.start()

    def _as_postgres(self, argv: list[str]) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True, capture_output=True, timeout=120)

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    def start(self) -> None:
        self._as_postgres(["pg_ctl", "-D", str(self.dir), "-l", str(self.log), "-w", "-t", "60", "start"])

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(["pg_ctl", "-D", str(self.dir), "-m", mode, "-w", "-t", "60", "stop"])

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@{self.host}:{self.port}/{name}"

    def close(self) -> None:
        if (self.dir / "postmaster.pid").exists():
            try:
                self.stop("immediate")
            except subprocess.SubprocessError:
                pass


class Redis:
    """A private ``redis-server`` on ``host:port`` (no persistence), stopped by :meth:`close`."""

    def __init__(self, root: Path, host: str, port: int) -> None:
        self.url = f"redis://{host}:{port}/0"
        self.log = (root / "redis.log").open("wb")
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", host, "--port", str(port), "--save", "", "--appendonly", "no",
             "--protected-mode", "no", "--dir", str(root)],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        import redis

        client = redis.Redis.from_url(self.url)

        def ready() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        try:
            _wait(ready, 20, "redis-server")
        finally:
            client.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
