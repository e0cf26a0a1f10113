"""Live changes without a restart, on real broker processes: policy reloads (admin API, CLI and SIGHUP)
across two worker processes and a second replica on one shared state store, and key rotations.

The changed rule is a deny of ``orders.read`` for customer c-42: allowed (200) before the reload,
refused (403) after it, on every worker.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from broker.attest.dev import DevIssuer
from broker.clock import SystemClock
from broker.ledger import NoteVerifier, SqliteLedgerStorage
from broker.operators import hash_secret
from tests.helpers import POLICIES, SUPPORT, LiveBroker, exchange_form, intent, wait_until
from tests.state.conftest import SHARED_REDIS, drop_prefix, unique_prefix

NHI = str(Path(sys.executable).with_name("nhi-broker"))
ADMIN = "live-admin-token-0123456789"
AUDITOR = "live-auditor-token-0123456789"
READ_C42 = intent("orders.read", "customers/c-42/orders/ord-1001", customer="c-42")
FREEZE = "p, support-agent, orders-api, orders.read, customers/c-42/orders/*, , deny, reload-freeze-c42, -, -\n"


class Brokers:
    """Broker ``a`` (two workers) and replica ``b`` (one worker) on one data directory, one policy
    directory and one shared state store."""

    def __init__(self, root: Path, backend: str, prefix: str) -> None:
        self.policies = root / "policies"
        shutil.copytree(POLICIES, self.policies, ignore=shutil.ignore_patterns("vault"))
        self.config = root / "broker.toml"
        self.config.write_text(
            'public_url = "https://broker.example.test"\nunsafe_trial_issuers = true\n'
            f'state_backend = "{backend}"\nredis_url = "{SHARED_REDIS}"\nredis_prefix = "{prefix}"\n'
            "live_sync_interval = 0.2\n"
            f'[[operators]]\nname = "alice"\nrole = "admin"\ntoken_sha256 = "{hash_secret(ADMIN)}"\n'
            f'[[operators]]\nname = "aldo"\nrole = "auditor"\ntoken_sha256 = "{hash_secret(AUDITOR)}"\n'
        )
        self.data = root / "data"
        self.a = LiveBroker(self.data, self.policies, workers=2, config=self.config)
        try:
            self.b = LiveBroker(self.data, self.policies, config=self.config)
        except BaseException:
            self.a.stop()
            raise
        self.issuer = DevIssuer.load_or_create(self.data)

    def stop(self) -> None:
        self.a.stop()
        self.b.stop()

    def read_c42(self, url: str, http: httpx.Client) -> httpx.Response:
        identity = self.issuer.mint(SUPPORT, "nhi-broker", ttl=300, clock=SystemClock())
        return http.post(url + "/v1/token", data=exchange_form(identity, "orders-api", READ_C42))

    def reload(self, token: str = ADMIN) -> httpx.Response:
        return httpx.post(self.a.url + "/v1/admin/policies/reload", headers={"Authorization": f"Bearer {token}"},
                          timeout=30)

    def entries(self) -> list[dict]:  # type: ignore[type-arg]
        storage = SqliteLedgerStorage(self.data / "ledger.sqlite3")
        try:
            return [json.loads(e) for e in storage.entries(0, storage.size())]
        finally:
            storage.close()

    def policy_loads(self) -> list[dict]:  # type: ignore[type-arg]
        return [e for e in self.entries() if e["kind"] == "policy_load"]

    def cli(self, *args: str, token: str = ADMIN) -> subprocess.CompletedProcess[str]:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("NHI_BROKER_")},
               "NHI_BROKER_URL": self.a.url, "NHI_BROKER_TOKEN": token}
        return subprocess.run([NHI, *args], capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture(params=["redis", "sqlite"])
def brokers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Brokers]:
    prefix = unique_prefix()
    b = Brokers(tmp_path, str(request.param), prefix)
    try:
        yield b
    finally:
        b.stop()
        drop_prefix(SHARED_REDIS, prefix)


def decisions(brokers: Brokers, url: str, n: int) -> Counter[int]:
    """``n`` exchanges, each on a new connection (so the kernel spreads them over the workers)."""
    codes: Counter[int] = Counter()
    for _ in range(n):
        with httpx.Client(timeout=20) as http:
            codes[brokers.read_c42(url, http).status_code] += 1
    return codes


def worker_pids(pid: int) -> set[int]:
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def test_reload_under_load_loses_no_request_and_records_one_entry(brokers: Brokers) -> None:
    assert decisions(brokers, brokers.a.url, 6) == Counter({200: 6})
    loads_before = len(brokers.policy_loads())
    stop = threading.Event()
    answers: list[int | str] = []
    lock = threading.Lock()

    def load(url: str) -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                try:
                    code: int | str = brokers.read_c42(url, http).status_code
                except httpx.HTTPError as exc:
                    code = type(exc).__name__
                with lock:
                    answers.append(code)

    threads = [threading.Thread(target=load, args=(url,)) for url in (brokers.a.url, brokers.a.url, brokers.b.url)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(answers) >= 30, what="load to run")
        with (brokers.policies / "policy.csv").open("a") as f:
            f.write(FREEZE)
        r = brokers.reload()
        assert r.status_code == 200, r.text
        outcome = r.json()
        assert outcome["changed"] is True and outcome["recorded"] is True
        # The replica follows (it is another process): its answers turn to 403.
        wait_until(lambda: decisions(brokers, brokers.b.url, 1) == Counter({403: 1}), what="the replica to follow")
        # So does broker a's other worker, on its own look at the record (live_sync_interval): its log says
        # when (a new connection lands on either worker, so only the log tells that both have followed).
        wait_until(lambda: "followed policy generation" in brokers.a.output(), what="a's other worker to follow")
        count = len(answers)
        wait_until(lambda: len(answers) >= count + 30, what="load after the reload")
    finally:
        stop.set()
        for t in threads:
            t.join()
    codes = Counter(answers)
    # Every request answered, none with a server error: 200 before the swap, 403 after it.
    assert set(codes) <= {200, 403}, codes
    assert codes[200] >= 30 and codes[403] >= 1, codes
    # Every worker of broker a decides by the new set (new connections land on both workers).
    assert decisions(brokers, brokers.a.url, 16) == Counter({403: 16})
    loads = brokers.policy_loads()
    assert len(loads) == loads_before + 1
    assert loads[-1]["policy"]["version"] == outcome["version"]
    assert loads[-1]["actor"] == {"kind": "operator", "name": "alice", "role": "admin", "auth": "bearer"}
    assert loads[-1]["request_id"].startswith("reload-api-")
    denial = [e for e in brokers.entries() if e["kind"] == "denial"][-1]
    assert denial["decision"]["rule"] == "reload-freeze-c42"
    assert denial["decision"]["policy_version"] == outcome["version"]

    # The same set again: nothing to record, the entry that recorded it is named.
    again = brokers.reload()
    assert again.status_code == 200
    assert again.json()["changed"] is False and again.json()["recorded"] is False
    assert again.json()["receipt"] == outcome["receipt"]
    assert len(brokers.policy_loads()) == loads_before + 1


@pytest.mark.parametrize("brokers", ["sqlite"], indirect=True)
def test_bad_reload_is_refused_precisely_and_the_old_set_keeps_serving(brokers: Brokers) -> None:
    loads_before = len(brokers.policy_loads())
    policy_csv = brokers.policies / "policy.csv"
    lines = policy_csv.read_text().count("\n")
    typo = "p, support-agent, orders-api, orders.read, **, , alow, typo, 60, jwt\n"
    policy_csv.write_text(policy_csv.read_text() + typo)
    r = brokers.reload()
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "invalid_policy"
    assert len(body["problems"]) == 1 and body["problems"][0].startswith(f"policy.csv:{lines + 1}:")
    assert "alow" in body["problems"][0]
    assert body["serving"] == brokers.policy_loads()[-1]["policy"]["version"]

    # The CLI says the same, one problem per line, and exits 1.
    cli = brokers.cli("admin", "policies", "reload")
    assert cli.returncode == 1, cli.stderr
    assert "HTTP 422 invalid_policy: policy set refused, still serving sha256:" in cli.stderr
    assert f"\n  policy.csv:{lines + 1}:" in cli.stderr

    # SIGHUP on the one-worker replica: refused in its log, it keeps serving the old set.
    os.kill(brokers.b.proc.pid, signal.SIGHUP)
    wait_until(lambda: "SIGHUP: policy reload refused" in brokers.b.output(), what="the refusal in the log")
    assert f"policy.csv:{lines + 1}:" in brokers.b.output()
    assert brokers.b.proc.poll() is None
    assert decisions(brokers, brokers.a.url, 6) == Counter({200: 6})
    assert decisions(brokers, brokers.b.url, 2) == Counter({200: 2})
    assert len(brokers.policy_loads()) == loads_before

    # An auditor may not reload; the role is checked before anything is read.
    assert brokers.reload(AUDITOR).status_code == 403
    denied = brokers.cli("admin", "policies", "reload", "--format", "json", token=AUDITOR)
    assert denied.returncode == 4


@pytest.mark.parametrize("brokers", ["redis"], indirect=True)
def test_sighup_reloads_every_worker_without_restarting_them(brokers: Brokers) -> None:
    pids = worker_pids(brokers.a.proc.pid)
    assert len(pids) >= 2  # two workers (and multiprocessing's resource tracker)
    loads_before = len(brokers.policy_loads())
    with (brokers.policies / "policy.csv").open("a") as f:
        f.write(FREEZE)
    os.kill(brokers.a.proc.pid, signal.SIGHUP)
    wait_until(lambda: len(brokers.policy_loads()) == loads_before + 1, what="the policy_load entry")
    wait_until(lambda: decisions(brokers, brokers.a.url, 8) == Counter({403: 8}), what="both workers to follow")
    wait_until(lambda: decisions(brokers, brokers.b.url, 1) == Counter({403: 1}), what="the replica to follow")
    assert worker_pids(brokers.a.proc.pid) == pids  # the same processes: a reload, not a restart
    assert brokers.policy_loads()[-1]["request_id"].startswith("reload-sighup-")
    time.sleep(1)  # several follow intervals: still one entry for the change
    assert len(brokers.policy_loads()) == loads_before + 1

    # The CLI on the set now live: nothing new recorded; JSON for scripts.
    cli = brokers.cli("admin", "policies", "reload", "--format", "json")
    assert cli.returncode == 0, cli.stderr
    answer = json.loads(cli.stdout)
    assert answer["recorded"] is False and answer["changed"] is False
    entries = brokers.entries()
    assert answer["receipt"]["index"] == max(i for i, e in enumerate(entries) if e["kind"] == "policy_load")
    table = brokers.cli("admin", "policies", "reload")
    assert table.returncode == 0 and "already live here" in table.stdout


def test_token_key_rotation_is_published_before_it_signs(tmp_path: Path) -> None:
    broker = LiveBroker(tmp_path / "data", env={"NHI_BROKER_LIVE_SYNC_INTERVAL": "0.2"})
    try:
        issuer = DevIssuer.load_or_create(tmp_path / "data")
        http = httpx.Client(timeout=20)
        old = http.get(broker.url + "/.well-known/jwks.json").json()["keys"][0]["kid"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("NHI_BROKER_")}
        rotated = subprocess.run([NHI, "keys", "rotate", "--data-dir", str(tmp_path / "data"), "--publish-for", "3"],
                                 capture_output=True, text=True, env=env, timeout=60)
        assert rotated.returncode == 0, rotated.stderr
        new = rotated.stdout.split()[3].rstrip(":")
        events: list[tuple[str, object]] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            events.append(("jwks", [k["kid"] for k in http.get(broker.url + "/.well-known/jwks.json").json()["keys"]]))
            identity = issuer.mint(SUPPORT, "nhi-broker", ttl=300, clock=SystemClock())
            r = http.post(broker.url + "/v1/token", data=exchange_form(identity, "orders-api", READ_C42))
            assert r.status_code == 200, r.text
            import jwt

            events.append(("signed", jwt.get_unverified_header(r.json()["access_token"])["kid"]))
            if events[-1][1] == new:
                break
            time.sleep(0.1)
        signed = [kid for what, kid in events if what == "signed"]
        assert signed[-1] == new and signed[0] == old  # the broker took the new key up without a restart
        first_signed = events.index(("signed", new))
        first_published = next(i for i, (what, kids) in enumerate(events) if what == "jwks" and new in kids)
        assert first_published < first_signed
        # Published at least a couple of seconds before it signed, with the old key still in the JWKS.
        assert sum(1 for what, kids in events[first_published:first_signed] if what == "jwks") >= 5
        assert all(old in kids for what, kids in events[first_published:] if what == "jwks")
        listed = subprocess.run([NHI, "keys", "list", "--data-dir", str(tmp_path / "data"), "--format", "json"],
                                capture_output=True, text=True, env=env, timeout=60)
        states = {k["kid"]: k["state"] for k in json.loads(listed.stdout)["keys"]}
        assert states == {new: "active", old: "published"}
        http.close()
    finally:
        broker.stop()


def test_ledger_key_rotation_takes_effect_without_restart(tmp_path: Path) -> None:
    broker = LiveBroker(tmp_path / "data", env={"NHI_BROKER_LIVE_SYNC_INTERVAL": "0.2"})
    try:
        meta = httpx.get(broker.url + "/.well-known/oauth-authorization-server").json()
        old_key = meta["ledger_verifier_key"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("NHI_BROKER_")}
        rotated = subprocess.run([NHI, "ledger", "rotate-key", "--data-dir", str(tmp_path / "data")],
                                 capture_output=True, text=True, env=env, timeout=60)
        assert rotated.returncode == 0, rotated.stderr
        new_key = rotated.stdout.split("new verifier key")[1].split()[0]
        assert new_key != old_key
        wait_until(lambda: httpx.get(broker.url + "/.well-known/oauth-authorization-server").json()[
            "ledger_verifier_key"] == new_key, what="the new ledger key")
        note = httpx.get(broker.url + "/v1/ledger/checkpoint").text
        NoteVerifier.from_verifier_key(new_key).open(note)  # signed by the new key (raises otherwise)
        audit = subprocess.run([NHI, "audit", "verify", "--url", broker.url, "--verifier-key", old_key],
                               capture_output=True, text=True, env=env, timeout=120)
        assert audit.returncode == 0, audit.stdout + audit.stderr
        assert "rotated" in audit.stdout
    finally:
        broker.stop()


def test_sighup_under_granian_reloads_instead_of_respawning(tmp_path: Path) -> None:
    """granian's supervisor respawns every worker on SIGHUP; the broker's hands it to one worker."""
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies, ignore=shutil.ignore_patterns("vault"))
    broker = LiveBroker(tmp_path / "data", policies, workers=2, server="granian",
                        env={"NHI_BROKER_LIVE_SYNC_INTERVAL": "0.2"})
    try:
        issuer = DevIssuer.load_or_create(tmp_path / "data")

        def codes(n: int) -> Counter[int]:
            found: Counter[int] = Counter()
            for _ in range(n):
                identity = issuer.mint(SUPPORT, "nhi-broker", ttl=300, clock=SystemClock())
                with httpx.Client(timeout=20) as http:
                    found[http.post(broker.url + "/v1/token",
                                    data=exchange_form(identity, "orders-api", READ_C42)).status_code] += 1
            return found

        assert codes(4) == Counter({200: 4})
        pids = worker_pids(broker.proc.pid)
        with (policies / "policy.csv").open("a") as f:
            f.write(FREEZE)
        os.kill(broker.proc.pid, signal.SIGHUP)
        wait_until(lambda: codes(8) == Counter({403: 8}), what="both granian workers to decide by the new set")
        assert worker_pids(broker.proc.pid) == pids
        storage = SqliteLedgerStorage(tmp_path / "data" / "ledger.sqlite3")
        try:
            loads = [e for e in (json.loads(x) for x in storage.entries(0, storage.size()))
                     if e["kind"] == "policy_load"]
        finally:
            storage.close()
        assert [e["request_id"].split("-")[0] for e in loads] == ["start", "reload"]
        assert loads[1]["request_id"].startswith("reload-sighup-")
    finally:
        broker.stop()
