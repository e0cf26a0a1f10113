"""Issue 13, fixes 1-7: each failure an auditor found, reproduced against the real SQLite store and bundles.

1. every command that opens the ledger with its signing key runs `serve`'s integrity check and
   refuses the same way (no signed fork from `ledger export`, `ledger rotate-key`, `keys rotate`);
2. every refusal names the first bad index (or the checkpoint it contradicts);
3. a bundle holding the same leaf twice does not verify;
4. `audit consistency` and `audit verify --state` name the same index for the same rollback;
5. a bundle with a row removed (and the rest renumbered) names the removed row; rows after the
   signed size are an error;
6. `audit prove`, `consistency` and `witness` follow a key rotation as `verify` does;
7. exit codes: 0 verified, 1 integrity failure, 2 usage, 3 rollback/fork, 4 source unreachable / I/O.
"""

from __future__ import annotations

import base64
import json
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit import AuditFailure, BundleLedgerSource, verify_ledger
from broker.audit.bundle import write_bundle
from broker.clock import SystemClock
from broker.ledger import Ledger, NoteSigner, SqliteLedgerStorage
from broker.ledger.checkpoint import sign_checkpoint
from broker.ledger.merkle import MerkleTree, leaf_hash
from broker.ledger.storage import LedgerCorrupt
from broker.mint.keys import _load
from tests.audit.conftest import REFUND, exchange
from tests.audit.conftest import Ledger as WrittenLedger
from tests.audit.test_audit_cli import nhi
from tests.audit.test_audit_tamper import _edit_json, _raise_amount, _swap, tamper
from tests.helpers import SUPPORT, LiveBroker

EXIT_OK, EXIT_INTEGRITY, EXIT_USAGE, EXIT_FORK, EXIT_IO = 0, 1, 2, 3, 4


def _checkpoints(data_dir: Path) -> list[tuple[int, bytes]]:
    conn = sqlite3.connect(data_dir / "ledger.sqlite3")
    try:
        return [(int(s), bytes(r)) for s, r in conn.execute("SELECT size, root FROM checkpoints ORDER BY size")]
    finally:
        conn.close()


def _size(data_dir: Path) -> int:
    conn = sqlite3.connect(data_dir / "ledger.sqlite3")
    try:
        return int(conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0])
    finally:
        conn.close()


def _truncate(at: int) -> Callable[[sqlite3.Connection], None]:
    def run(conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM entries WHERE idx >= ?", (at,))

    return run


def _delete(idx: int) -> Callable[[sqlite3.Connection], None]:
    def run(conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM entries WHERE idx = ?", (idx,))

    return run


# (name, attack, exit code, what the refusal names). The data dir first published a checkpoint of
# all N entries (by an honest export), then its storage was rewritten.
ALTERED = [
    ("swap", _swap, EXIT_FORK, "no longer matches the checkpoint of {n} entries"),
    ("rewrite-with-hash", _edit_json(6, _raise_amount), EXIT_FORK, "no longer matches the checkpoint of {n} entries"),
    ("truncate", _truncate(7), EXIT_FORK, "entries from index 7 are missing"),
    ("delete-row", _delete(6), EXIT_INTEGRITY, "missing entry 6 (a row was deleted)"),
]


@pytest.mark.parametrize(("name", "attack", "code", "names"), ALTERED, ids=[a[0] for a in ALTERED])
def test_every_signing_command_refuses_an_altered_ledger(  # type: ignore[no-untyped-def]
    name: str, attack, code: int, names: str, ledger_copy: WrittenLedger, tmp_path: Path
) -> None:
    data = ledger_copy.data_dir
    honest = nhi("ledger", "export", str(tmp_path / "honest.bundle"), "--data-dir", str(data))
    assert honest.returncode == 0, honest.stderr
    n = _size(data)
    with tamper(data) as conn:
        attack(conn)
    published = _checkpoints(data)
    ledger_key = (data / "keys" / "ledger-key.pem").read_bytes()
    expected = names.format(n=n)
    for command in (
        ["ledger", "export", str(tmp_path / "fork.bundle"), "--data-dir", str(data)],
        ["ledger", "rotate-key", "--data-dir", str(data)],
        ["keys", "rotate", "--data-dir", str(data)],
    ):
        r = nhi(*command)
        assert r.returncode == code, (command, r.stderr)
        assert expected in r.stderr and "refusing" in r.stderr, (command, r.stderr)
        assert "Traceback" not in r.stderr
    # Nothing was signed or recorded: no second root for a published size, no smaller size.
    assert _checkpoints(data) == published
    assert not (tmp_path / "fork.bundle").exists()
    assert (data / "keys" / "ledger-key.pem").read_bytes() == ledger_key  # rotate-key rotated nothing
    with pytest.raises(RuntimeError) as caught:  # and `serve` says the same
        LiveBroker(data)
    assert expected in str(caught.value)


def test_refusal_names_the_range_between_published_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    signer = NoteSigner("refuse.example/log", Ed25519PrivateKey.generate())
    with Ledger(SqliteLedgerStorage(path), signer, "refuse.example/log", SystemClock()) as ledger:
        for i in range(30):
            ledger.append({"v": 1, "kind": "issuance", "request_id": f"r{i}"})
            if i in (9, 19, 29):
                ledger.checkpoint()  # checkpoints of 10, 20 and 30 entries
    leaf = b'{"kind":"issuance","request_id":"forged","v":1}'
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("DROP TRIGGER entries_no_update")
    conn.execute("UPDATE entries SET leaf = ?, leaf_hash = ? WHERE idx = 14", (leaf, leaf_hash(leaf)))
    conn.close()
    with pytest.raises(LedgerCorrupt) as caught:
        Ledger(SqliteLedgerStorage(path), signer, "refuse.example/log", SystemClock())
    # The checkpoint of 10 still matches, the one of 20 does not: the first altered entry is in [10, 20).
    assert caught.value.kind == "fork" and caught.value.index == 10
    assert "no longer matches the checkpoint of 20 entries" in caught.value.description
    assert "first altered entry is at or after index 10" in caught.value.description


def _signed_bundle(data: Path, leaves: list[bytes], out: Path, origin: str, key_name: str) -> str:
    """A bundle over ``leaves`` signed with the ledger's own key: only the leaves are wrong."""
    signer = NoteSigner(key_name, _load(data / "keys" / "ledger-key.pem", "EdDSA"))  # type: ignore[arg-type]
    root = MerkleTree(leaf_hash(leaf) for leaf in leaves).root()
    note = sign_checkpoint(signer, origin, len(leaves), root)
    write_bundle(out, origin=origin, checkpoint=note, size=len(leaves), verifier_key=signer.verifier_key,
                 leaves=iter(leaves))
    return str(signer.verifier_key)


def _bundle_leaves(bundle: Path) -> tuple[dict[str, object], list[bytes]]:
    lines = bundle.read_bytes().split(b"\n")
    header = json.loads(lines[0])
    return header, [base64.b64decode(line.split(b" ")[2]) for line in lines[1:] if line]


def _export(ledger: WrittenLedger, out: Path) -> tuple[dict[str, object], list[bytes]]:
    r = nhi("ledger", "export", str(out), "--data-dir", str(ledger.data_dir))
    assert r.returncode == 0, r.stderr
    return _bundle_leaves(out)


def test_bundle_with_a_duplicated_leaf_is_refused(ledger_copy: WrittenLedger, tmp_path: Path) -> None:
    header, leaves = _export(ledger_copy, tmp_path / "honest.bundle")
    doubled = [*leaves, leaves[6]]  # an exact copy of entry 6, appended and signed
    bad = tmp_path / "doubled.bundle"
    key = _signed_bundle(ledger_copy.data_dir, doubled, bad, str(header["origin"]),
                         ledger_copy.verifier_key.split("+")[0])
    assert key == ledger_copy.verifier_key
    with pytest.raises(AuditFailure) as caught:
        verify_ledger(BundleLedgerSource(bad), key)
    assert caught.value.index == len(leaves)
    assert "the same leaf as entry 6" in caught.value.reason
    r = nhi("audit", "verify", "--bundle", str(bad), "--verifier-key", key)
    assert r.returncode == EXIT_INTEGRITY and f"index {len(leaves)}: " in r.stderr, r.stderr


def test_consistency_and_verify_state_name_the_same_index(ledger_copy: WrittenLedger, tmp_path: Path) -> None:
    data = ledger_copy.data_dir
    broker = LiveBroker(data)
    verify_state, monitor_state = tmp_path / "verify.json", tmp_path / "monitor.json"
    try:
        args = ["--url", broker.url, "--verifier-key", ledger_copy.verifier_key]
        assert nhi("audit", "verify", *args, "--state", str(verify_state)).returncode == 0
        # A monitor that started from the same state, and one that only ever ran `consistency`.
        shutil.copy(verify_state, monitor_state)
        shutil.copy(verify_state.with_name("verify.json.leaves"), monitor_state.with_name("monitor.json.leaves"))
        first = nhi("audit", "consistency", *args, "--state", str(tmp_path / "plain.json"))
        assert first.returncode == 0, first.stderr
        n = _size(data)
    finally:
        broker.stop()
    with tamper(data) as conn:
        conn.execute("DELETE FROM entries WHERE idx >= 7")
        conn.execute("DELETE FROM checkpoints")  # so the broker itself does not refuse to start
    broker = LiveBroker(data)  # appends its start-up entry at index 7
    try:
        args = ["--url", broker.url, "--verifier-key", ledger_copy.verifier_key]
        v = nhi("audit", "verify", *args, "--state", str(verify_state))
        c = nhi("audit", "consistency", *args, "--state", str(monitor_state))
        for r in (v, c):
            assert r.returncode == EXIT_FORK, r.stderr
            assert "LEDGER CONSISTENCY VIOLATION (rollback)" in r.stderr
            assert f"index 7: the log has 8 entries but a trusted checkpoint covered {n}" in r.stderr, r.stderr
        # Without saved leaf hashes neither can tell which entries before 8 changed; both say so alike.
        plain = nhi("audit", "consistency", *args, "--state", str(tmp_path / "plain.json"))
        assert plain.returncode == EXIT_FORK
        expected = f"index 8: the log has 8 entries but a trusted checkpoint covered {n}; entries from here on are gone"
        assert expected + ", and earlier ones may have changed too" in plain.stderr, plain.stderr
    finally:
        broker.stop()


def test_bundle_with_a_removed_row_names_it(ledger_copy: WrittenLedger, tmp_path: Path) -> None:
    honest = tmp_path / "honest.bundle"
    _export(ledger_copy, honest)
    state = tmp_path / "state.json"
    args = ["--verifier-key", ledger_copy.verifier_key, "--state", str(state)]
    assert nhi("audit", "verify", "--bundle", str(honest), *args).returncode == 0
    # Row 5 removed, the rest renumbered; the header (and its signed checkpoint) left as it was.
    lines = honest.read_bytes().split(b"\n")
    body = [line for line in lines[1:] if line]
    del body[5]
    renumbered = [b" ".join([str(i).encode(), *line.split(b" ")[1:]]) for i, line in enumerate(body)]
    cut = tmp_path / "cut.bundle"
    cut.write_bytes(b"\n".join([lines[0], *renumbered]) + b"\n")
    r = nhi("audit", "verify", "--bundle", str(cut), *args)
    assert r.returncode == EXIT_FORK, r.stderr
    assert "index 5: " in r.stderr and "differs from the one verified" in r.stderr, r.stderr


def test_rows_after_the_signed_size_are_an_error(ledger_copy: WrittenLedger, tmp_path: Path) -> None:
    honest = tmp_path / "honest.bundle"
    _, leaves = _export(ledger_copy, honest)
    extra = leaves[3].replace(b'"v":1', b'"v":1 ')
    padded = tmp_path / "padded.bundle"
    padded.write_bytes(honest.read_bytes()
                       + b"%d %s %s\n" % (len(leaves), leaf_hash(extra).hex().encode(), base64.b64encode(extra)))
    with pytest.raises(AuditFailure) as caught:
        verify_ledger(BundleLedgerSource(padded), ledger_copy.verifier_key)
    assert caught.value.index == len(leaves) and "after the signed size" in caught.value.reason
    r = nhi("audit", "verify", "--bundle", str(padded), "--verifier-key", ledger_copy.verifier_key)
    assert r.returncode == EXIT_INTEGRITY and f"index {len(leaves)}: " in r.stderr, r.stderr


def test_prove_consistency_and_witness_follow_a_rotation(ledger_copy: WrittenLedger, tmp_path: Path) -> None:
    old_key = ledger_copy.verifier_key
    broker = LiveBroker(ledger_copy.data_dir)
    try:
        first = nhi("audit", "consistency", "--url", broker.url, "--verifier-key", old_key,
                    "--state", str(tmp_path / "monitor.json"))
        assert first.returncode == 0, first.stderr
        wit_args = ["--state", str(tmp_path / "witness.json"), "--witness-key", str(tmp_path / "w.pem"),
                    "--name", "witness.example/w1"]
        assert nhi("audit", "witness", "--url", broker.url, "--verifier-key", old_key, *wit_args).returncode == 0
    finally:
        broker.stop()
    rotated = nhi("ledger", "rotate-key", "--data-dir", str(ledger_copy.data_dir))
    assert rotated.returncode == 0, rotated.stderr
    new_key = rotated.stdout.split("new verifier key  ")[1].split()[0]
    broker = LiveBroker(ledger_copy.data_dir)
    try:
        r = exchange(broker, SUPPORT, REFUND, user="c-42")
        assert r.status_code == 200
        token = r.json()["access_token"]
        args = ["--url", broker.url, "--verifier-key", old_key]
        runs = {
            "prove": nhi("audit", "prove", *args, "--token", token),
            "consistency": nhi("audit", "consistency", *args, "--state", str(tmp_path / "monitor.json")),
            "witness": nhi("audit", "witness", *args, *wit_args),
        }
        for name, run in runs.items():
            assert run.returncode == EXIT_OK, (name, run.stderr)
            said = run.stdout + run.stderr
            assert "ledger key was rotated" in said and new_key in said, (name, said)
        # The monitor's next run starts from a checkpoint signed by the new key and still verifies.
        again = nhi("audit", "consistency", *args, "--state", str(tmp_path / "monitor.json"))
        assert again.returncode == EXIT_OK, again.stderr
    finally:
        broker.stop()


def test_exit_codes_are_distinct(served_ledger: tuple[LiveBroker, WrittenLedger], tmp_path: Path) -> None:
    broker, ledger = served_ledger
    key = ledger.verifier_key
    name = key.split("+")[0]
    cases = [
        (["audit", "verify", "--url", broker.url, "--verifier-key", key], EXIT_OK, "verified"),
        (["audit", "verify", "--url", broker.url, "--verifier-key", "not-a-key"], EXIT_USAGE,
         "malformed verifier key"),
        (["audit", "verify", "--url", broker.url, "--verifier-key", name + "+00000000+" + key.split("+", 2)[2]],
         EXIT_USAGE, "key ID of the verifier key does not match"),
        (["audit", "prove", "--url", broker.url, "--verifier-key", key, "--token", ""], EXIT_USAGE,
         "--token is empty"),
        (["audit", "verify", "--url", "http://127.0.0.1:9", "--verifier-key", key], EXIT_IO,
         "cannot read the ledger"),
        (["audit", "verify", "--bundle", str(tmp_path / "missing.bundle"), "--verifier-key", key], EXIT_IO,
         "cannot read bundle"),
        (["audit", "verify", "--url", "ftp://x", "--verifier-key", key], EXIT_USAGE, "http"),
    ]
    for argv, code, said in cases:
        r = nhi(*argv)
        assert r.returncode == code, (argv, r.returncode, r.stderr)
        assert said in r.stdout + r.stderr, (argv, r.stderr)
        if code in (EXIT_USAGE, EXIT_IO):
            assert "does NOT verify" not in r.stderr, (argv, r.stderr)
    # A genuinely altered entry is an integrity failure (1), not a usage or I/O error.
    _export_url(broker.url, tmp_path / "b.bundle")
    body = (tmp_path / "b.bundle").read_bytes().split(b"\n")
    idx, recorded, encoded = body[1 + 6].split(b" ")
    body[1 + 6] = b" ".join([idx, recorded, base64.b64encode(base64.b64decode(encoded).replace(b"20", b"99", 1))])
    (tmp_path / "b.bundle").write_bytes(b"\n".join(body))
    r = nhi("audit", "verify", "--bundle", str(tmp_path / "b.bundle"), "--verifier-key", key)
    assert r.returncode == EXIT_INTEGRITY and "index 6: " in r.stderr and "does NOT verify" in r.stderr, r.stderr


def _export_url(url: str, out: Path) -> tuple[dict[str, object], list[bytes]]:
    r = nhi("ledger", "export", str(out), "--url", url)
    assert r.returncode == 0, r.stderr
    return _bundle_leaves(out)
