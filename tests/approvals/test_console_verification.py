"""The console's checkpoint status: waits for small ledgers, verifies large ones in the background."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.clock import FixedClock
from broker.console.ledger_view import LedgerBrowser
from broker.ledger import Ledger, NoteSigner, SqliteLedgerStorage
from broker.ledger.merkle import leaf_hash

ORIGIN = "console.test/ledger"


def make_ledger(path: Path) -> tuple[Ledger, str]:
    signer = NoteSigner(ORIGIN, Ed25519PrivateKey.generate())
    return Ledger(SqliteLedgerStorage(path), signer, ORIGIN, FixedClock(1_800_000_000)), str(signer.verifier_key)


def policy_load(n: int) -> dict[str, object]:
    return {"v": 1, "kind": "policy_load", "time": "2026-11-23T12:00:00Z", "request_id": f"start-{n}",
            "policy": {"version": "sha256:" + "a" * 64, "files": {"policy.csv": "sha256:" + "b" * 64},
                       "source": "policies"}}


def test_small_ledgers_are_verified_while_the_page_waits(tmp_path: Path) -> None:
    ledger, key = make_ledger(tmp_path / "ledger.sqlite3")
    with ledger:
        for n in range(3):
            ledger.append(policy_load(n))
        status = LedgerBrowser(ledger, key, ORIGIN, sync_limit=10).checkpoint_status()
        assert (status.verified, status.size, status.pending, status.behind) == (True, 3, False, 0)


def test_large_ledgers_are_verified_in_the_background(tmp_path: Path) -> None:
    ledger, key = make_ledger(tmp_path / "ledger.sqlite3")
    with ledger:
        for n in range(6):
            ledger.append(policy_load(n))
        browser = LedgerBrowser(ledger, key, ORIGIN, sync_limit=5)
        first = browser.checkpoint_status()
        assert first.pending and not first.verified  # the page does not wait for a large ledger
        browser.wait_for_verification(30)
        done = browser.checkpoint_status()
        assert (done.verified, done.size, done.behind) == (True, 6, 0)
        ledger.append(policy_load(6))
        ledger.append(policy_load(7))
        # After one success, only the two new entries are checked: no waiting, at any size.
        grown = browser.checkpoint_status()
        assert (grown.verified, grown.size, grown.behind, grown.pending) == (True, 8, 0, False)


def test_a_tampered_new_entry_is_caught_after_an_incremental_start(tmp_path: Path) -> None:
    ledger, key = make_ledger(tmp_path / "ledger.sqlite3")
    with ledger:
        ledger.append(policy_load(0))
        browser = LedgerBrowser(ledger, key, ORIGIN)
        assert browser.checkpoint_status().verified
        ledger.append(policy_load(1))
        ledger.append(policy_load(2))
        ledger.checkpoint()  # published, then the stored entry is edited behind the broker's back
        conn = sqlite3.connect(tmp_path / "ledger.sqlite3", isolation_level=None)
        conn.execute("DROP TRIGGER IF EXISTS entries_no_update")
        forged = json.dumps(policy_load(99), separators=(",", ":"), sort_keys=True).encode()
        conn.execute("UPDATE entries SET leaf = ?, leaf_hash = ? WHERE idx = 2", (forged, leaf_hash(forged)))
        conn.close()
        ledger.append(policy_load(3))
        status = browser.checkpoint_status()
        assert not status.verified and status.problem


def test_a_wrong_key_is_reported_not_verified(tmp_path: Path) -> None:
    ledger, _ = make_ledger(tmp_path / "ledger.sqlite3")
    other, other_key = make_ledger(tmp_path / "other.sqlite3")
    other.close()
    with ledger:
        ledger.append(policy_load(0))
        status = LedgerBrowser(ledger, other_key, ORIGIN).checkpoint_status()
        assert not status.verified and status.problem
