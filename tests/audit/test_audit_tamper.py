"""Tampering with the SQLite ledger behind the broker's back: `audit verify` names the index and the reason.

The attacker has write access to ``ledger.sqlite3`` (drops the append-only triggers) but not to the
auditor's key or state. Two settings:

- *running*: the broker keeps serving after the file changed; its signed tree is the honest one,
  so the verifier locates the first altered entry with the broker's own consistency proofs;
- *restart*: the broker restarts on the altered file; the auditor catches the rewrite with the
  checkpoint it verified before (its monitor state).
"""

from __future__ import annotations

import contextlib
import io
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from broker.audit import AuditFailure, ConsistencyViolation, HttpLedgerSource, verify_ledger
from broker.cli.main import main
from broker.ledger.merkle import leaf_hash
from tests.audit.conftest import Ledger
from tests.helpers import LiveBroker

SHIFT = 1_000_000_000  # a temporary index far above the log, to move rows without key collisions


@contextlib.contextmanager
def tamper(data_dir: Path) -> Iterator[sqlite3.Connection]:
    """A writable connection to the ledger file with the append-only triggers removed."""
    conn = sqlite3.connect(data_dir / "ledger.sqlite3", isolation_level=None)
    try:
        conn.execute("DROP TRIGGER IF EXISTS entries_no_update")
        conn.execute("DROP TRIGGER IF EXISTS entries_no_delete")
        conn.execute("BEGIN IMMEDIATE")
        yield conn
        conn.execute("COMMIT")
    finally:
        conn.close()


def _leaf(conn: sqlite3.Connection, idx: int) -> bytes:
    return bytes(conn.execute("SELECT leaf FROM entries WHERE idx = ?", (idx,)).fetchone()[0])


def _put(conn: sqlite3.Connection, idx: int, leaf: bytes) -> None:
    conn.execute("UPDATE entries SET leaf = ?, leaf_hash = ? WHERE idx = ?", (leaf, leaf_hash(leaf), idx))


def _edit_json(idx: int, change: Callable[[dict], None]) -> Callable[[sqlite3.Connection], None]:  # type: ignore[type-arg]
    def run(conn: sqlite3.Connection) -> None:
        import json

        entry = json.loads(_leaf(conn, idx))
        change(entry)
        _put(conn, idx, rfc8785.dumps(entry))

    return run


def _raise_amount(entry: dict) -> None:  # type: ignore[type-arg]
    entry["intent"]["context"]["amount"] = 2000


def _blank_owner(entry: dict) -> None:  # type: ignore[type-arg]
    entry["workload"]["owner"] = ""


def _spaced(conn: sqlite3.Connection) -> None:
    _put(conn, 6, _leaf(conn, 6).replace(b'"kind":', b'"kind": ', 1))


def _delete(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM entries WHERE idx = 6")


def _swap(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE entries SET idx = ? WHERE idx = 4", (SHIFT,))
    conn.execute("UPDATE entries SET idx = 4 WHERE idx = 7")
    conn.execute("UPDATE entries SET idx = 7 WHERE idx = ?", (SHIFT,))


def _insert(conn: sqlite3.Connection) -> None:
    import json

    forged = json.loads(_leaf(conn, 6))
    forged["credential"]["jti"] = "forged-jti-0000000000"
    conn.execute("UPDATE entries SET idx = idx + ? WHERE idx >= 6", (SHIFT,))
    conn.execute("UPDATE entries SET idx = idx - ? + 1 WHERE idx >= ?", (SHIFT, SHIFT))
    leaf = rfc8785.dumps(forged)
    conn.execute("INSERT INTO entries (idx, leaf, leaf_hash) VALUES (6, ?, ?)", (leaf, leaf_hash(leaf)))


@dataclass(frozen=True)
class Case:
    name: str
    attack: Callable[[sqlite3.Connection], None]
    index: int
    reason: str


# Against a running broker. `insert` stays last: it grows the broker's tree for good.
RUNNING = [
    Case("edit", _edit_json(6, _raise_amount), 6, "entry differs from the one the signed checkpoint commits to"),
    Case("edit-breaks-schema", _edit_json(6, _blank_owner), 6, "workload.owner: must not be empty"),
    Case("edit-not-canonical", _spaced, 6, "leaf is not in RFC 8785 canonical form"),
    Case("delete", _delete, 6, "the log does not serve this entry"),
    Case("reorder", _swap, 4, "entry differs from the one the signed checkpoint commits to"),
    Case("insert", _insert, 6, "entry differs from the one the signed checkpoint commits to"),
]


def _cli_verify(url: str, key: str, *extra: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(["audit", "verify", "--url", url, "--verifier-key", key, *extra])
    return code, err.getvalue()


@pytest.fixture(scope="module")
def running(written_ledger: Ledger, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveBroker, Ledger]]:
    target = tmp_path_factory.mktemp("tamper") / "data"
    shutil.copytree(written_ledger.data_dir, target)
    broker = LiveBroker(target)
    try:
        yield broker, Ledger(target, written_ledger.verifier_key)
    finally:
        broker.stop()


@pytest.mark.parametrize("case", RUNNING, ids=[c.name for c in RUNNING])
def test_tampering_under_a_running_broker(case: Case, running: tuple[LiveBroker, Ledger]) -> None:
    broker, ledger = running
    source = HttpLedgerSource(broker.url)
    try:
        verify_ledger(source, ledger.verifier_key)  # honest before the attack
        with tamper(ledger.data_dir) as conn:
            rows = conn.execute("SELECT idx, leaf, leaf_hash FROM entries ORDER BY idx").fetchall()
            case.attack(conn)
        try:
            with pytest.raises(AuditFailure) as caught:
                verify_ledger(source, ledger.verifier_key)
            assert caught.value.index == case.index, str(caught.value)
            assert caught.value.exact
            assert case.reason in caught.value.reason, caught.value.reason
            code, err = _cli_verify(broker.url, ledger.verifier_key)
            assert code == 1
            assert f"index {case.index}: " in err and case.reason in err, err
        finally:
            if case.name != "insert":  # restore the honest rows for the next case
                with tamper(ledger.data_dir) as conn:
                    conn.execute("DELETE FROM entries")
                    conn.executemany("INSERT INTO entries (idx, leaf, leaf_hash) VALUES (?, ?, ?)", rows)
    finally:
        source.close()


def _restart_with(ledger: Ledger, attack: Callable[[Path], None], tmp_path: Path) -> tuple[LiveBroker, Path]:
    """Serve the ledger, keep the auditor's state, stop, attack the files, serve again."""
    broker = LiveBroker(ledger.data_dir)
    state = tmp_path / "monitor.json"
    try:
        assert _cli_verify(broker.url, ledger.verifier_key, "--state", str(state))[0] == 0
    finally:
        broker.stop()
    attack(ledger.data_dir)
    return LiveBroker(ledger.data_dir), state


def test_truncation_is_a_rollback(ledger_copy: Ledger, tmp_path: Path) -> None:
    def truncate(data_dir: Path) -> None:
        with tamper(data_dir) as conn:
            conn.execute("DELETE FROM entries WHERE idx >= 7")
            # The broker would refuse to start below a checkpoint it published (test_ledger_crash.py);
            # a thorough attacker erases that record too. The auditor's own state still catches it.
            conn.execute("DELETE FROM checkpoints")

    broker, state = _restart_with(ledger_copy, truncate, tmp_path)
    try:
        # The restarted broker appends its startup entry at index 7 and signs a tree of 8. The
        # auditor's saved leaf hashes name entry 7 as the first one that is gone or changed.
        code, err = _cli_verify(broker.url, ledger_copy.verifier_key, "--state", str(state))
        assert code == 3, err
        assert "LEDGER CONSISTENCY VIOLATION (rollback)" in err and "index 7: " in err
        assert "--- previously verified checkpoint ---" in err and "--- latest checkpoint ---" in err
        with pytest.raises(ConsistencyViolation) as caught:
            verify_ledger(
                HttpLedgerSource(broker.url),
                ledger_copy.verifier_key,
                trusted_note=_note(state),
            )
        # With only the trusted checkpoint (no saved hashes), the bound is the new size.
        assert caught.value.kind == "rollback" and caught.value.index == 8
    finally:
        broker.stop()


def _note(state: Path) -> str:
    import json

    return str(json.loads(state.read_text())["checkpoint"])


def test_swapped_checkpoint_key_is_refused(ledger_copy: Ledger, tmp_path: Path) -> None:
    def swap_key(data_dir: Path) -> None:
        path = data_dir / "keys" / "ledger-key.pem"
        pem = Ed25519PrivateKey.generate().private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        path.write_bytes(pem)
        path.chmod(0o600)

    broker, state = _restart_with(ledger_copy, swap_key, tmp_path)
    try:
        code, err = _cli_verify(broker.url, ledger_copy.verifier_key, "--state", str(state))
        assert code == 1
        assert "checkpoint does not verify: note is not signed by key" in err, err
        with pytest.raises(AuditFailure) as caught:
            verify_ledger(HttpLedgerSource(broker.url), ledger_copy.verifier_key)
        assert caught.value.index is None
    finally:
        broker.stop()


def test_edited_bundle_line(served_ledger: tuple[LiveBroker, Ledger], tmp_path: Path) -> None:
    import base64

    from broker.audit import BundleLedgerSource

    broker, ledger = served_ledger
    bundle = tmp_path / "b.bundle"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["ledger", "export", str(bundle), "--url", broker.url]) == 0
    lines = bundle.read_bytes().split(b"\n")
    index, recorded, encoded = lines[1 + 6].split(b" ")
    leaf = base64.b64decode(encoded).replace(b'"amount":20', b'"amount":99')
    lines[1 + 6] = b" ".join([index, recorded, base64.b64encode(leaf)])
    bundle.write_bytes(b"\n".join(lines))
    with pytest.raises(AuditFailure) as caught:
        verify_ledger(BundleLedgerSource(bundle), ledger.verifier_key)
    assert caught.value.index == 6
    assert "leaf hash the source states does not match" in caught.value.reason


def test_rewrite_behind_a_restarted_broker_is_located_by_saved_hashes(ledger_copy: Ledger, tmp_path: Path) -> None:
    def rewrite(data_dir: Path) -> None:
        with tamper(data_dir) as conn:
            _edit_json(6, _raise_amount)(conn)
            conn.execute("DELETE FROM checkpoints")  # or the broker itself would refuse to start

    broker, state = _restart_with(ledger_copy, rewrite, tmp_path)
    try:
        # The restarted broker signs the rewritten history with the real key: only the auditor's
        # memory of what it verified can name the entry.
        code, err = _cli_verify(broker.url, ledger_copy.verifier_key, "--state", str(state))
        assert code == 3, err
        assert "LEDGER CONSISTENCY VIOLATION (fork)" in err
        assert "index 6: entry differs from the one verified at the trusted checkpoint" in err
    finally:
        broker.stop()
