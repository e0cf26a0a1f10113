"""Crash safety: SIGKILL under load loses no acknowledged entry; a damaged ledger stops the start."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.attest.dev import DevIssuer
from broker.audit import HttpLedgerSource, verify_ledger
from broker.clock import SystemClock
from broker.ledger import Ledger, LedgerCorrupt, NoteSigner, SqliteLedgerStorage, verify_checkpoint
from broker.ledger.merkle import leaf_hash
from tests.helpers import POLICIES, SUPPORT, LiveBroker, exchange_form, free_port, intent

READ = intent("orders.read", "customers/c-42/orders/ord-1001", customer="c-42")

NHI = str(Path(sys.executable).with_name("nhi-broker"))


def test_sigkill_under_load_keeps_every_acknowledged_entry(tmp_path: Path) -> None:
    broker = LiveBroker(tmp_path / "data")
    try:
        key = httpx.get(broker.url + "/.well-known/oauth-authorization-server").json()["ledger_verifier_key"]
        issuer = DevIssuer.load_or_create(broker.data_dir)
        receipts: list[tuple[int, str]] = []
        notes: list[str] = []
        cut_off: list[int] = []  # clients whose request the kill interrupted
        stop = threading.Event()
        lock = threading.Lock()

        def client() -> None:
            with httpx.Client(timeout=10) as http:
                while not stop.is_set():
                    subject = issuer.mint(SUPPORT, "nhi-broker", clock=SystemClock())
                    try:
                        # Reads: the sample refund limits (30 a minute) would refuse most of a burst.
                        r = http.post(broker.url + "/v1/token", data=exchange_form(subject, "orders-api", READ))
                    except httpx.HTTPError:
                        with lock:
                            cut_off.append(1)
                        return  # the broker died mid-request: nothing was acknowledged
                    if r.status_code == 200:
                        receipt = r.json()["receipt"]
                        with lock:
                            receipts.append((receipt["index"], receipt["leaf_hash"]))

        def auditor() -> None:
            with httpx.Client(timeout=10) as http:
                while not stop.is_set():
                    try:
                        notes.append(http.get(broker.url + "/v1/ledger/checkpoint").text)
                    except httpx.HTTPError:
                        return
                    time.sleep(0.02)

        threads = [threading.Thread(target=client) for _ in range(8)] + [threading.Thread(target=auditor)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while len(receipts) < 150 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(broker.proc.pid, signal.SIGKILL)  # mid-stream: requests are in flight
        broker.proc.wait()
        stop.set()
        for t in threads:
            t.join()
    finally:
        broker.stop()
    assert len(receipts) >= 150 and len(notes) >= 2
    assert cut_off, "the kill should land while requests are in flight"

    restarted = LiveBroker(tmp_path / "data")
    try:
        verified = verify_ledger(HttpLedgerSource(restarted.url), key)
    finally:
        restarted.stop()
    tree = verified.tree
    for index, digest in receipts:
        assert tree.leaf_hash(index).hex() == digest, f"acknowledged entry {index} is not in the verified tree"
    for note in notes:
        published = verify_checkpoint(note, key)
        assert tree.root(published.size) == published.root, f"not consistent with checkpoint {published.size}"


ORIGIN = "crash.example/ledger"


def _honest(path: Path, n: int = 40) -> Ledger:
    ledger = Ledger(SqliteLedgerStorage(path), NoteSigner(ORIGIN, Ed25519PrivateKey.generate()), ORIGIN, SystemClock())
    for i in range(n):
        ledger.append({"v": 1, "kind": "issuance", "request_id": f"r{i}"})
    ledger.checkpoint()  # published, so recorded
    return ledger


def _db(path: Path, *statements: tuple[str, tuple[object, ...]]) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("DROP TRIGGER IF EXISTS entries_no_update")
        conn.execute("DROP TRIGGER IF EXISTS entries_no_delete")
        for sql, params in statements:
            conn.execute(sql, params)
    finally:
        conn.close()


def _rewrite(idx: int) -> tuple[str, tuple[object, ...]]:
    leaf = b'{"kind":"issuance","request_id":"forged","v":1}'
    return "UPDATE entries SET leaf = ?, leaf_hash = ? WHERE idx = ?", (leaf, leaf_hash(leaf), idx)


DAMAGE: list[tuple[str, Callable[[], list[tuple[str, tuple[object, ...]]]], str]] = [
    (
        "torn-tail",
        lambda: [("UPDATE entries SET leaf = substr(leaf, 1, 10) WHERE idx = 39", ())],
        "ledger entry 39 does not match its recorded leaf hash",
    ),
    (
        "cut-short",
        lambda: [("DELETE FROM entries WHERE idx >= 37", ())],
        "holds 37 entries but a checkpoint of 40 was published: entries from index 37 are missing",
    ),
    ("gap", lambda: [("DELETE FROM entries WHERE idx = 12", ())], "missing entry 12 (a row was deleted)"),
    ("rewritten", lambda: [_rewrite(12)], "no longer matches the checkpoint of 40 entries"),
]


@pytest.mark.parametrize(("name", "damage", "expected"), DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_storage_is_reported_never_truncated(name: str, damage, expected: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "ledger.sqlite3"
    _honest(path).close()
    _db(path, *damage())
    rows_before = sqlite3.connect(path).execute("SELECT COUNT(*) FROM entries").fetchone()[0]
    # Opening the ledger (as every command holding its key does) runs the check and refuses.
    with pytest.raises(LedgerCorrupt) as caught:
        Ledger(SqliteLedgerStorage(path), NoteSigner(ORIGIN, Ed25519PrivateKey.generate()), ORIGIN, SystemClock())
    assert expected in caught.value.description, caught.value.description
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM entries").fetchone()[0] == rows_before


def test_honest_storage_passes(tmp_path: Path) -> None:
    with _honest(tmp_path / "ledger.sqlite3") as ledger:
        assert ledger.check_integrity() == 40


def test_serve_refuses_to_start_on_a_torn_tail(tmp_path: Path) -> None:
    data = tmp_path / "data"
    broker = LiveBroker(data)
    try:
        httpx.get(broker.url + "/v1/ledger/checkpoint")
    finally:
        broker.stop()
    size = sqlite3.connect(data / "ledger.sqlite3").execute("SELECT COUNT(*) FROM entries").fetchone()[0]
    _db(data / "ledger.sqlite3", ("UPDATE entries SET leaf = X'00' WHERE idx = ?", (size - 1,)))
    out = subprocess.run(
        [NHI, "serve", "--port", str(free_port()), "--data-dir", str(data), "--policies", str(POLICIES)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert f"ledger entry {size - 1} does not match its recorded leaf hash" in out.stderr
    assert "Traceback" not in out.stderr
