"""Three broker replicas on three hosts, one PostgreSQL ledger and one Redis: the production shape.

Each replica runs in its own network namespace with its own address; PostgreSQL and Redis are private
servers listening on the bridge that joins them (see ``hosts.py``). Under load spread over all three,
one replica is SIGKILLed and restarted and PostgreSQL is restarted; then the test proves that every
acknowledged receipt is in the one verified tree, that every checkpoint any replica served is
consistent with the final one, that no index is missing or duplicated, and that the ledger verifies
with an independent RFC 6962 / C2SP verifier (``independent_tlog``, no broker code). With a real
OpenBao on the bridge: a Vault lease issued through one replica is released through another, and a
suspension made on one replica revokes another replica's lease and takes effect everywhere within a
second.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import hvac.exceptions
import psycopg
import pytest

from broker.attest.dev import DevIssuer
from broker.audit.live import HttpLedgerSource
from broker.audit.monitor import check_consistency, save_state
from broker.clock import SystemClock
from broker.ledger import root_from_leaf_hashes, verify_checkpoint
from broker.operators import hash_secret
from broker.vault.devserver import DevVault
from tests.helpers import POLICIES, SUPPORT, exchange_form, intent
from tests.replicas import independent_tlog
from tests.replicas.hosts import Network, Postgres, Redis, cannot_create_namespaces

REASON = cannot_create_namespaces()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"multi-host test needs network namespaces: {REASON}")

ADMIN = "replicas-admin-token-0123456789"
RS_SECRET = "replicas-orders-secret-0123456789"
RS_AUTH = ("orders-api", RS_SECRET)
ORIGIN = "replicas.example.test/ledger"
PORT = 8080
READ = intent("orders.read", "customers/c-42/orders/ord-1001", customer="c-42")
ORDERS_DB = intent("orders.query", "customers/c-1001/orders", customer="c-1001")
DB_CREDS = "urn:nhi-broker:token-type:vault-db-creds"


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``predicate`` until true; the seconds it took (the test fails after ``timeout``)."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if predicate():
            return time.monotonic() - began
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Replica:
    """``nhi-broker serve`` inside host ``i``'s namespace, on that host's address."""

    def __init__(self, net: Network, i: int, root: Path, config: Path, env: dict[str, str]) -> None:
        self.net, self.i = net, i
        self.data_dir = root / f"replica-{i}"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.url = f"http://{net.address(i)}:{PORT}"
        self.config, self.env = config, env
        self.log_path = root / f"replica-{i}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = str(Path(sys.executable).with_name("nhi-broker"))
        argv = [exe, "serve", "--host", self.net.address(self.i), "--port", str(PORT), "--data-dir",
                str(self.data_dir), "--policies", str(POLICIES), "--config", str(self.config)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.net.exec_argv(self.i, argv), stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=self.env)

    def wait_ready(self, timeout: float = 40) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"replica {self.i} exited: {self.log_path.read_text()[-2000:]}")
            try:
                return httpx.get(self.url + "/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout, f"replica {self.i} to be ready")

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    @property
    def verifier_key(self) -> str:
        for line in self.log_path.read_text().splitlines():
            if "ledger verifier" in line:
                return line.split()[-1]
        raise AssertionError("the replica did not print its verifier key")


@dataclass
class Cluster:
    net: Network
    pg: Postgres
    redis: Redis
    ledger_url: str
    replicas: list[Replica]
    issuer: DevIssuer
    vault: DevVault

    def lease_ttl(self, lease_id: str) -> int | None:
        """What OpenBao says is left of a lease; ``None`` once it no longer knows it (revoked)."""
        try:
            return int(self.vault.client().sys.read_lease(lease_id)["data"]["ttl"])
        except hvac.exceptions.InvalidRequest:
            return None


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    # Not pytest's tmp_path: the postgres user must be able to reach its data directory.
    root = Path(tempfile.mkdtemp(prefix="nhi-replicas-"))
    os.chmod(root, 0o755)  # noqa: S103 -- the postgres user must traverse it
    cleanups: list[Callable[[], None]] = []
    try:
        net = Network(3).__enter__()
        cleanups.append(net.close)
        pg = Postgres(root / "pg", net.gateway, 5432, f"{net.prefix}.0/24")
        cleanups.append(pg.close)
        redis_server = Redis(root, net.gateway, 6379)
        cleanups.append(redis_server.close)
        # A real OpenBao on the bridge, reachable from every host; its database engine manages users of
        # this machine's PostgreSQL (the demo orders database), as in tests/vault.
        vault = DevVault.start(root / "openbao", host=net.gateway)
        cleanups.append(vault.stop)
        ledger_url = pg.create_database("broker")
        upgraded = subprocess.run([str(Path(sys.executable).with_name("nhi-broker")), "db", "upgrade", "--url",
                                   ledger_url], capture_output=True, text=True, timeout=60)
        assert upgraded.returncode == 0, upgraded.stderr
        config = root / "broker.toml"
        config.write_text(
            # One name for the service (a load balancer's), so every replica accepts the others' tokens.
            f'public_url = "https://broker.example.test"\nunsafe_trial_issuers = true\nledger_origin = "{ORIGIN}"\n'
            f'ledger_url = "{ledger_url}"\n'
            f'state_backend = "redis"\nredis_url = "{redis_server.url}"\nredis_prefix = "replicas:"\n'
            f'[[operators]]\nname = "alice"\nrole = "admin"\ntoken_sha256 = "{hash_secret(ADMIN)}"\n'
            f'[[introspection_clients]]\nclient_id = "orders-api"\nsecret_sha256 = "{hash_secret(RS_SECRET)}"\n'
            'audiences = ["orders-api"]\n'
            # One lease book for every replica: in the ledger's PostgreSQL.
            f'[vault]\naddr = "{vault.addr}"\napprole_role_id = "{vault.role_id}"\n'
            f'approle_secret_id_file = "{vault.secret_id_file}"\nsweep_interval = 3600\n'
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("NHI_BROKER_")}
        replicas = [Replica(net, i, root, config, env) for i in range(3)]
        cleanups.extend(r.stop for r in replicas)
        # The first replica creates the keys; the others get copies, as a secret store would hand them out.
        replicas[0].start()
        replicas[0].wait_ready()
        for r in replicas[1:]:
            shutil.copytree(replicas[0].data_dir / "keys", r.data_dir / "keys")
            shutil.copy2(replicas[0].data_dir / "dev-issuer-key.pem", r.data_dir / "dev-issuer-key.pem")
            r.start()
        for r in replicas[1:]:
            r.wait_ready()
        yield Cluster(net, pg, redis_server, ledger_url, replicas, DevIssuer.load_or_create(replicas[0].data_dir),
                      vault)
    finally:
        for cleanup in reversed(cleanups):
            try:
                cleanup()
            except Exception as exc:  # keep tearing down; report at the end
                print(f"cleanup failed: {exc!r}")
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Load:
    """Exchanges spread round robin over every replica, from several threads, until stopped."""

    cluster: Cluster
    acknowledged: list[dict[str, object]] = field(default_factory=list)
    statuses: Counter[tuple[int, int]] = field(default_factory=Counter)  # (replica, status) -> count
    unexpected: list[str] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    log: list[tuple[float, int, int]] = field(default_factory=list)  # (time, replica, status)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self, workers: int) -> None:
        self._threads = [threading.Thread(target=self._work, args=(w,)) for w in range(workers)]
        self._threads.append(threading.Thread(target=self._poll_checkpoints))
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def _work(self, worker: int) -> None:
        replicas = self.cluster.replicas
        n = worker
        with httpx.Client(timeout=10) as http:
            while not self._stop.is_set():
                i = n % len(replicas)
                n += 1
                identity = self.cluster.issuer.mint(SUPPORT, "nhi-broker", ttl=300, clock=SystemClock())
                try:
                    r = http.post(replicas[i].url + "/v1/token", data=exchange_form(identity, "orders-api", READ))
                except httpx.HTTPError:
                    status = 0  # replica down or killed mid-request: nothing acknowledged
                else:
                    status = r.status_code
                with self._lock:
                    self.statuses[(i, status)] += 1
                    self.log.append((time.monotonic(), i, status))
                    if status == 200:
                        self.acknowledged.append(r.json()["receipt"])
                    elif status == 503:
                        if r.json().get("error") != "temporarily_unavailable":
                            self.unexpected.append(r.text)
                    elif status != 0:
                        self.unexpected.append(f"{status} {r.text[:300]}")
                if status in (0, 503):
                    time.sleep(0.05)

    def _poll_checkpoints(self) -> None:
        with httpx.Client(timeout=5) as http:
            while not self._stop.is_set():
                for replica in self.cluster.replicas:
                    try:
                        r = http.get(replica.url + "/v1/ledger/checkpoint")
                    except httpx.HTTPError:
                        continue
                    if r.status_code == 200:
                        with self._lock:
                            self.checkpoints.append(r.text)
                time.sleep(0.2)

    def count(self, replica: int | None = None, status: int = 200, since: float = 0.0) -> int:
        with self._lock:
            return sum(1 for t, i, s in self.log if t >= since and s == status and replica in (None, i))


def test_three_replicas_on_three_hosts(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    a, b, killed = c.replicas
    key = a.verifier_key
    assert b.verifier_key == killed.verifier_key == key  # one ledger key for every replica
    load = Load(c)
    load.start(workers=6)
    try:
        # (1) load on all three, then SIGKILL one mid-load and restart it.
        wait_for(lambda: all(load.count(i) >= 10 for i in range(3)), 30, "load on every replica")
        killed.kill()
        down_at = time.monotonic()
        wait_for(lambda: load.count(since=down_at) >= 30, 20, "the other replicas to carry the load")
        killed.start()
        killed.wait_ready()
        back_at = time.monotonic()
        wait_for(lambda: load.count(2, since=back_at) >= 10, 20, "the restarted replica to serve again")
        # (2) PostgreSQL restarted mid-load: 503 while it is down, then service resumes by itself.
        c.pg.stop()
        pg_down_at = time.monotonic()
        wait_for(lambda: all(load.count(i, 503, since=pg_down_at) >= 2 for i in range(3)), 20,
                 "503 from every replica while PostgreSQL is down")
        c.pg.start()
        pg_up_at = time.monotonic()
        resumed = wait_for(lambda: all(load.count(i, since=pg_up_at) >= 5 for i in range(3)), 30,
                           "every replica to resume by itself after PostgreSQL restarted")
    finally:
        load.stop()
    print(json.dumps({"statuses": {f"{i}:{s}": n for (i, s), n in sorted(load.statuses.items())},
                      "acknowledged": len(load.acknowledged), "checkpoints_served": len(load.checkpoints),
                      "resumed_after_postgres_restart_s": round(resumed, 2)}))
    assert load.unexpected == []  # only 200, 503 (temporarily_unavailable) or no answer at all

    # (3) one tree: the final checkpoint, recomputed from what PostgreSQL holds.
    final_note = httpx.get(a.url + "/v1/ledger/checkpoint", timeout=10).text
    final = verify_checkpoint(final_note, key, expected_origin=ORIGIN)
    with psycopg.connect(c.ledger_url) as conn:
        rows = conn.execute("SELECT idx, leaf_hash FROM ledger_entries ORDER BY idx").fetchall()
    indexes = [int(idx) for idx, _ in rows]
    hashes = [bytes(h) for _, h in rows]
    assert indexes == list(range(final.size))  # no index missing, none twice
    assert root_from_leaf_hashes(hashes) == final.root
    # (4) every acknowledged receipt, from any replica, is in that tree at its index.
    receipts = {(int(r["index"]), str(r["leaf_hash"])) for r in load.acknowledged}  # type: ignore[call-overload]
    assert len(receipts) == len(load.acknowledged) == len({i for i, _ in receipts})
    for index, leaf in receipts:
        assert index < final.size and hashes[index].hex() == leaf
    # (5) every checkpoint any replica served is consistent with the final one (`audit consistency`).
    served = sorted(set(load.checkpoints), key=lambda n: verify_checkpoint(n, key, expected_origin=ORIGIN).size)
    assert len(served) >= 3
    source = HttpLedgerSource(b.url)
    try:
        for note in served:
            state = tmp_path / "monitor.json"
            save_state(state, note)
            consistent = check_consistency(source, key, state, origin=ORIGIN, update=False)
            assert consistent.checkpoint.size == final.size
    finally:
        source.close()
    exe = str(Path(sys.executable).with_name("nhi-broker"))
    state = tmp_path / "cli-monitor.json"
    save_state(state, served[0])
    cli = subprocess.run([exe, "audit", "consistency", "--url", killed.url, "--verifier-key", key, "--state",
                          str(state)], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and f"to {final.size} entries" in cli.stdout, cli.stdout + cli.stderr
    # (6) the ledger written by three replicas verifies with `nhi-broker audit verify`.
    verified = subprocess.run([exe, "audit", "verify", "--url", a.url, "--verifier-key", key, "--origin", ORIGIN],
                              capture_output=True, text=True, timeout=120)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    # (6b) ... and with an independent verifier (RFC 6962/9162 + C2SP, no broker code): the signed
    # checkpoint, the tree recomputed from the leaves any replica serves, inclusion proofs of the
    # acknowledged receipts and consistency proofs of every served checkpoint, from all three replicas.
    independent = verify_independently(c, key, final_note, hashes, receipts, served)
    print(json.dumps({"independently_verified": independent}))

    with httpx.Client(timeout=30) as http:
        # (8) Vault across replicas: a lease issued through A is released through B (one lease book).
        def vault_lease(replica: Replica) -> tuple[dict[str, object], str]:
            identity = c.issuer.mint(SUPPORT, "nhi-broker", ttl=300, clock=SystemClock())
            r = http.post(replica.url + "/v1/token", data=exchange_form(identity, "orders-db", ORDERS_DB,
                                                                          requested_token_type=DB_CREDS))
            assert r.status_code == 200, r.text
            index = r.json()["receipt"]["index"]
            entry = http.get(b.url + "/v1/ledger/entries", params={"start": index, "end": index + 1}).json()
            lease_id = str(entry["entries"][0]["entry"]["credential"]["lease_id"])
            assert c.lease_ttl(lease_id), "OpenBao does not know the lease"
            return r.json(), lease_id

        issued, lease_id = vault_lease(a)
        released = http.post(b.url + "/v1/credentials/release", data={"release_token": issued["release_token"]})
        assert released.status_code == 200 and released.json()["state"] == "revoked", released.text
        assert c.lease_ttl(lease_id) is None  # revoked in OpenBao, through the other replica
        again = http.post(killed.url + "/v1/credentials/release", data={"release_token": issued["release_token"]})
        assert again.status_code == 200 and again.json()["state"] == "revoked", again.text  # idempotent on a third

        # (7) a suspension on B: A's open lease is revoked, and every replica's tokens go inactive
        # within a second.
        _, open_lease = vault_lease(a)
        identity = c.issuer.mint(SUPPORT, "nhi-broker", ttl=300, clock=SystemClock())
        token = http.post(killed.url + "/v1/token", data=exchange_form(identity, "orders-api", READ)).json()
        token = token["access_token"]
        assert http.post(a.url + "/v1/introspect", data={"token": token}, auth=RS_AUTH).json()["active"]
        started = time.monotonic()
        r = http.post(b.url + "/v1/admin/workloads/support-assistant/suspend", json={"reason": "drill"},
                      headers={"Authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 200, r.text
        assert r.json()["vault_leases_revoked"] == 1, r.text  # A's lease, revoked by B's kill switch
        assert c.lease_ttl(open_lease) is None
        elapsed = wait_for(
            lambda: all(not http.post(x.url + "/v1/introspect", data={"token": token}, auth=RS_AUTH).json()["active"]
                        for x in (a, killed)),
            1.0, "the suspension to reach every replica")
        print(json.dumps({"suspension_visible_on_every_replica_s": round(elapsed + 0.0, 3)}))
        identity = c.issuer.mint(SUPPORT, "nhi-broker", ttl=300, clock=SystemClock())
        refused = http.post(a.url + "/v1/token", data=exchange_form(identity, "orders-api", READ))
        assert refused.status_code == 403 and refused.json()["error"] == "workload_suspended"
        assert time.monotonic() - started < 5


def verify_independently(c: Cluster, key: str, final_note: str, stored: list[bytes],
                         receipts: set[tuple[int, str]], served: list[str]) -> dict[str, int]:
    """Step (6b): the whole ledger through ``independent_tlog``; what was checked, counted."""
    final = independent_tlog.verify_checkpoint(final_note, key, ORIGIN)
    replicas = c.replicas
    with httpx.Client(timeout=30) as http:
        leaves: list[bytes] = []
        page = 1000
        for start in range(0, final.size, page):
            replica = replicas[(start // page) % len(replicas)]
            got = http.get(replica.url + "/v1/ledger/entries",
                           params={"start": start, "end": min(start + page, final.size)}).json()["entries"]
            leaves += [independent_tlog.leaf_hash(base64.b64decode(e["leaf"])) for e in got]
        assert leaves == stored  # the leaves served hash to what PostgreSQL stores
        assert independent_tlog.tree_hash(leaves) == final.root
        # Inclusion: every acknowledged receipt when there are few, else an even sample of 200.
        chosen = sorted(receipts)
        chosen = chosen[:: max(1, len(chosen) // 200)]
        for n, (index, leaf) in enumerate(chosen):
            replica = replicas[n % len(replicas)]
            proof = http.get(replica.url + "/v1/ledger/proof/inclusion",
                             params={"leaf_hash": leaf, "tree_size": final.size}).json()
            assert proof["index"] == index
            independent_tlog.verify_inclusion(bytes.fromhex(leaf), index, final.size,
                                              [base64.b64decode(h) for h in proof["audit_path"]], final.root)
        # Consistency: every checkpoint any replica served, signature checked here too.
        for n, note in enumerate(served):
            old = independent_tlog.verify_checkpoint(note, key, ORIGIN)
            if old.size == 0:
                continue
            replica = replicas[n % len(replicas)]
            proof = http.get(replica.url + "/v1/ledger/proof/consistency",
                             params={"first": old.size, "second": final.size}).json()
            independent_tlog.verify_consistency(old.size, final.size, old.root, final.root,
                                                [base64.b64decode(h) for h in proof["proof"]])
    return {"entries": final.size, "inclusion_proofs": len(chosen), "consistency_proofs": len(served)}
