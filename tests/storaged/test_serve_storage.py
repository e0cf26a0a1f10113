"""`nhi-broker serve --workers 2` on embedded SQLite: its storage process, from start to stop."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import httpx

from broker.attest.dev import DevIssuer
from broker.clock import SystemClock
from broker.ledger import SqliteLedgerStorage, leaf_hash
from tests.helpers import (
    SUPPORT,
    LiveBroker,
    delegated_form,
    dev_user,
    exchange_form,
    form_body,
    intent,
    verified_claims,
    wait_until,
)

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
ORDER = "customers/c-42/orders/ord-1001"


def storage_processes(group: int) -> dict[str, int]:
    """The storage processes in process group ``group``: the pid holding each file (``state``, ``ledger``)."""
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if os.getpgid(int(entry.name)) != group or b"broker.storaged" not in argv:
                continue
            state = (entry / "status").read_text()
        except (OSError, ProcessLookupError):
            continue
        if "zombie" not in state:
            found.update({kind: int(entry.name) for kind in ("state", "ledger") if f"--{kind}".encode() in argv})
    return found



def test_two_workers_write_through_storage_processes_that_end_with_serve(tmp_path: Path) -> None:
    data = tmp_path / "data"
    broker = LiveBroker(data, workers=2)
    try:
        kinds = storage_processes(broker.proc.pid)
        assert set(kinds) == {"state", "ledger"}
        assert kinds["state"] == kinds["ledger"]  # one process holds both: admission and entry in one call
        issuer = DevIssuer.load_or_create(data)
        tokens = [issuer.mint(SUPPORT, "nhi-broker", ttl=300, clock=SystemClock()) for _ in range(40)]
        details = intent("orders.read", ORDER, customer="c-42")

        def post(token: str) -> httpx.Response:
            return httpx.post(broker.url + "/v1/token", headers=FORM,
                              content=form_body(exchange_form(token, "orders-api", details)), timeout=30)

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, tokens))
        assert [a.status_code for a in answers] == [200] * 40
        # A replayed identity token is refused: the single-use record went through the state process.
        replay = post(tokens[0])
        assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant", replay.text
        # The storage process dies: the supervisor replaces it and the broker serves on.
        os.kill(kinds["state"], signal.SIGKILL)
        wait_until(lambda: storage_processes(broker.proc.pid).get("state") not in (None, kinds["state"]))
        fresh = issuer.mint(SUPPORT, "nhi-broker", ttl=300, clock=SystemClock())
        wait_until(lambda: httpx.get(broker.url + "/readyz", timeout=5).status_code == 200)
        assert post(fresh).status_code == 200
        assert post(tokens[1]).status_code == 400  # still remembered after the restart
    finally:
        output = broker.stop()
    # Stopping serve ends its storage process; nothing is left behind.
    assert storage_processes(broker.proc.pid) == {}, output
    assert "Traceback" not in output, output
    storage = SqliteLedgerStorage(data / "ledger.sqlite3")
    try:
        leaves = storage.entries(0, storage.size())
    finally:
        storage.close()
    issued = {a.json()["access_token"] for a in answers}
    assert len(issued) == 40
    assert len({leaf_hash(leaf) for leaf in leaves}) == len(leaves)
    assert sum(b'"kind":"jwt"' in leaf for leaf in leaves) == 41


def test_a_budget_holds_across_workers_when_admission_and_entry_are_one_call(tmp_path: Path) -> None:
    """Eight 50 EUR refunds of one conversation race over both workers against a 200 EUR budget: the
    storage process admits exactly four, each with its issuance entry (and the rule's single use in
    its token); the other four are budget_exceeded denials, and no issuance entry exists for them."""
    data = tmp_path / "data"
    broker = LiveBroker(data, workers=2)
    try:
        issuer = DevIssuer.load_or_create(data)
        details = intent("payments.refund", ORDER, customer="c-42", amount=50, currency="EUR", conversation="conv-9")
        forms = [delegated_form(dev_user(data), issuer.mint(SUPPORT, "nhi-broker", ttl=300, clock=SystemClock()),
                                "payments-api", details) for _ in range(8)]

        def post(form: dict[str, str]) -> httpx.Response:
            return httpx.post(broker.url + "/v1/token", headers=FORM, content=form_body(form), timeout=30)

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, forms))
        jwks = httpx.get(broker.url + "/.well-known/jwks.json", timeout=10).json()
    finally:
        output = broker.stop()
    assert "Traceback" not in output, output
    issued = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code != 200]
    assert len(issued) == 4, [a.text for a in answers]
    assert [(a.status_code, a.json()["error"]) for a in refused] == [(403, "budget_exceeded")] * 4
    claims = [verified_claims(a.json()["access_token"], jwks, "payments-api") for a in issued]
    assert [c["num_uses"] for c in claims] == [1] * 4
    storage = SqliteLedgerStorage(data / "ledger.sqlite3")
    try:
        entries = [json.loads(leaf) for leaf in storage.entries(0, storage.size())]
    finally:
        storage.close()
    refunds = [e for e in entries if e.get("intent", {}).get("action") == "payments.refund"]
    issuances = [e["credential"]["jti"] for e in refunds if e["kind"] == "issuance"]
    assert sorted(issuances) == sorted(c["jti"] for c in claims)
    for claim, answer in zip(claims, issued, strict=True):
        assert claim["txn"] == answer.json()["receipt"]["leaf_hash"]
    assert [e["decision"]["error"] for e in refunds if e["kind"] == "denial"] == ["budget_exceeded"] * 4


def test_a_killed_supervisor_takes_its_storage_processes_along(tmp_path: Path) -> None:
    broker = LiveBroker(tmp_path / "data", workers=2)
    try:
        kinds = storage_processes(broker.proc.pid)
        assert set(kinds) == {"state", "ledger"}
        os.kill(broker.proc.pid, signal.SIGKILL)
        broker.proc.wait()
        # Their control pipe closed with the supervisor: they exit on their own.
        wait_until(lambda: not any(alive(pid) for pid in kinds.values()))
    finally:
        broker.stop()
        try:
            os.killpg(broker.proc.pid, signal.SIGKILL)  # the orphaned HTTP workers
        except ProcessLookupError:
            pass


def alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def test_a_locked_state_file_fails_exchanges_closed_and_never_stalls_the_workers(tmp_path: Path) -> None:
    """Another process holds the state file's write lock: the state process waits (SQLite's 1 s busy
    timeout), exchanges get 503 and cost no credential, and the workers keep answering everything else
    at once; once the lock is gone, exchanges are issued again."""
    from tests.api.test_loop_lag import sqlite_write_lock

    data = tmp_path / "data"
    broker = LiveBroker(data, workers=2)
    try:
        issuer = DevIssuer.load_or_create(data)
        details = intent("orders.read", ORDER, customer="c-42")

        def post(_: int) -> tuple[int, str, float]:
            token = issuer.mint(SUPPORT, "nhi-broker", ttl=300, clock=SystemClock())
            started = time.monotonic()
            answer = httpx.post(broker.url + "/v1/token", headers=FORM, timeout=30,
                                content=form_body(exchange_form(token, "orders-api", details)))
            return answer.status_code, answer.json().get("error", ""), time.monotonic() - started

        with sqlite_write_lock(data / "state.sqlite3"):
            with ThreadPoolExecutor(6) as pool:
                pending = [pool.submit(post, i) for i in range(6)]
                health: list[float] = []
                while not all(p.done() for p in pending):
                    started = time.monotonic()
                    assert httpx.get(broker.url + "/healthz", timeout=10).status_code == 200
                    health.append(time.monotonic() - started)
                    wait(pending, timeout=0.05)  # the next probe once an exchange is answered, or in 50 ms
                refused = [p.result() for p in pending]
        assert [(status, error) for status, error, _ in refused] == [(503, "temporarily_unavailable")] * 6
        assert max(took for _, _, took in refused) < 10
        # A worker blocked on the file would hold /healthz for the busy timeout (1 s) or longer.
        assert health and max(health) < 0.5, health
        assert post(0)[0] == 200
    finally:
        broker.stop()
