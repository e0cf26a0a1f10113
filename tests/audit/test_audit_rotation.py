"""Ledger key rotation: recorded and endorsed in the ledger, old history still verifiable, forgeries refused."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit import AuditFailure, HttpLedgerSource, check_consistency, verify_ledger
from broker.audit.local import LocalLedgerSource
from broker.cli.main import main
from broker.clock import FixedClock
from broker.entries import key_rotation_entry
from broker.ledger import Ledger, NoteSigner, SqliteLedgerStorage, verify_checkpoint
from broker.ledger.rotation import ENDORSEMENT_HEADER
from broker.mint.keys import public_jwk
from tests.audit.conftest import REFUND, exchange
from tests.audit.conftest import Ledger as WrittenLedger
from tests.helpers import SUPPORT, LiveBroker


def test_rotation_keeps_old_history_verifiable(ledger_copy: WrittenLedger, tmp_path: Path) -> None:
    old_key = ledger_copy.verifier_key
    state = tmp_path / "monitor.json"
    broker = LiveBroker(ledger_copy.data_dir)
    try:
        before = check_consistency(HttpLedgerSource(broker.url), old_key, state).note
    finally:
        broker.stop()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["ledger", "rotate-key", "--data-dir", str(ledger_copy.data_dir)]) == 0
    new_key = out.getvalue().split("new verifier key  ")[1].split()[0]
    assert new_key != old_key and new_key.split("+")[0] == old_key.split("+")[0]

    broker = LiveBroker(ledger_copy.data_dir)
    try:
        assert exchange(broker, SUPPORT, REFUND, user="c-42").status_code == 200
        source = HttpLedgerSource(broker.url)
        # The auditor trusts only the old key; the ledger's endorsement carries it to the new one.
        verified = verify_ledger(source, old_key)
        assert verified.signed_by == new_key
        assert verified.summary.by_kind["key_rotation"] == 3
        assert verify_checkpoint(before, old_key).size < verified.checkpoint.size  # old history, old key
        with pytest.raises(AuditFailure, match="not signed by key"):
            verify_checkpoint_or_fail(httpx.get(broker.url + "/v1/ledger/checkpoint").text, old_key)
        # The monitor moves across the rotation when it trusts both keys.
        assert check_consistency(source, [old_key, new_key], state).previous is not None
    finally:
        broker.stop()


def verify_checkpoint_or_fail(note: str, key: str) -> None:
    from broker.audit.verify import verify_note

    verify_note(note, [key], None)


ORIGIN = "rotation.example/ledger"


def _endorse(
    by: Ed25519PrivateKey, new: Ed25519PrivateKey, origin: str = ORIGIN, header: str = ENDORSEMENT_HEADER
) -> str:
    text = f"{header}\n{origin}\n{NoteSigner(ORIGIN, new).verifier_key}\n"
    return NoteSigner(ORIGIN, by).sign(text)


@pytest.mark.parametrize(
    "endorsement",
    [
        lambda old, new, attacker: _endorse(attacker, new),  # signed by a key nobody trusts
        lambda old, new, attacker: _endorse(old, attacker),  # endorses another key than the entry records
        lambda old, new, attacker: _endorse(old, new, origin="other.example/ledger"),  # for another log
        lambda old, new, attacker: _endorse(old, new, header="some other statement"),  # not an endorsement
    ],
    ids=["untrusted-endorser", "other-key", "other-log", "wrong-statement"],
)
def test_forged_rotations_are_refused(endorsement, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    old, new, attacker = (Ed25519PrivateKey.generate() for _ in range(3))
    path = tmp_path / "ledger.sqlite3"
    with Ledger(SqliteLedgerStorage(path), NoteSigner(ORIGIN, old), ORIGIN, FixedClock(1_800_000_000)) as ledger:
        jwk = public_jwk(new)
        entry = key_rotation_entry(
            now=1_800_000_000, request_id="r1", purpose="ledger", kid=jwk["kid"], alg="EdDSA", jwk=jwk
        )
        entry["key"]["endorsement"] = endorsement(old, new, attacker)
        ledger.append(entry)
    # Whoever holds the new key now signs the log; the auditor trusts only the old key.
    with Ledger(SqliteLedgerStorage(path), NoteSigner(ORIGIN, new), ORIGIN, FixedClock(1_800_000_000)) as ledger:
        with pytest.raises(AuditFailure, match="checkpoint does not verify: note is not signed by key") as caught:
            verify_ledger(LocalLedgerSource(ledger), NoteSigner(ORIGIN, old).verifier_key)
        assert caught.value.index is None


def test_rotate_key_needs_a_ledger(tmp_path: Path) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["ledger", "rotate-key", "--data-dir", str(tmp_path)]) == 2  # usage: no ledger there
    assert "no ledger key in" in err.getvalue()
