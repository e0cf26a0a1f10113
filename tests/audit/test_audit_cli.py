"""`nhi-broker audit ...` and `nhi-broker ledger export` end to end, against a live broker and a bundle."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from broker.audit import BundleLedgerSource, HttpLedgerSource, prove_attribution, verify_ledger
from broker.cli.main import main
from tests.audit.conftest import FOREIGN, REFUND, Ledger, exchange
from tests.helpers import SUPPORT, TRIAGE, LiveBroker

NHI = str(Path(sys.executable).with_name("nhi-broker"))


def nhi_process(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed ``nhi-broker`` executable in its own process."""
    return subprocess.run([NHI, *args], capture_output=True, text=True, timeout=120)


def nhi(*args: str) -> subprocess.CompletedProcess[str]:
    """The same CLI entry point in this process (saves an interpreter start per call)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def test_verify_live_export_and_verify_bundle(served_ledger: tuple[LiveBroker, Ledger], tmp_path: Path) -> None:
    broker, ledger = served_ledger
    live = nhi_process("audit", "verify", "--url", broker.url, "--verifier-key", ledger.verifier_key, "--json")
    assert live.returncode == 0, live.stderr
    summary = json.loads(live.stdout)
    assert summary["verified"] is True
    assert summary["by_kind"]["issuance"] == 6
    assert summary["by_kind"]["denial"] == 2
    assert summary["by_workload"]["support-assistant"] == 6
    assert summary["by_owner"]["Dana Reyes <dana.reyes@example.com>"] == 6
    assert summary["first_time"] <= summary["last_time"]

    bundle = tmp_path / "ledger.bundle"
    exported = nhi("ledger", "export", str(bundle), "--url", broker.url)
    assert exported.returncode == 0, exported.stderr
    offline = nhi("audit", "verify", "--bundle", str(bundle), "--verifier-key", ledger.verifier_key, "--json")
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout)["root"] == summary["root"]

    text = nhi("audit", "verify", "--bundle", str(bundle), "--verifier-key", ledger.verifier_key)
    assert "verified: " in text.stdout and "by kind" in text.stdout and "Dana Reyes" in text.stdout


def test_export_from_data_dir_while_stopped(ledger_copy: Ledger, tmp_path: Path) -> None:
    bundle = tmp_path / "local.bundle"
    exported = nhi("ledger", "export", str(bundle), "--data-dir", str(ledger_copy.data_dir))
    assert exported.returncode == 0, exported.stderr
    verified = verify_ledger(BundleLedgerSource(bundle), ledger_copy.verifier_key)
    assert verified.summary.by_kind["issuance"] == 6
    assert BundleLedgerSource(bundle).stated_verifier_key == ledger_copy.verifier_key


def test_prove_by_token_jti_and_leaf_hash(served_ledger: tuple[LiveBroker, Ledger], tmp_path: Path) -> None:
    broker, ledger = served_ledger
    issued = ledger.issued[3]
    by_token = nhi_process(
        "audit", "prove", "--url", broker.url, "--verifier-key", ledger.verifier_key, "--token", issued.token
    )
    assert by_token.returncode == 0, by_token.stderr
    out = by_token.stdout
    for expected in (
        f"entry            {issued.index} (issuance)",
        "support-assistant",
        SUPPORT,
        "Dana Reyes",
        "attestation      dev",
        "evidence digest  sha256:",
        "payments.refund",
        "rule refund-small-eur",
        "policy sha256:",
        "approval         none required",
        "issued / expires",
        "token            matches this entry",
    ):
        assert expected in out, (expected, out)

    source = HttpLedgerSource(broker.url)
    try:
        jti = prove_attribution(source, ledger.verifier_key, leaf_hash_hex=issued.leaf_hash).entry.jti
        assert jti is not None
        assert prove_attribution(source, ledger.verifier_key, jti=jti).index == issued.index
    finally:
        source.close()

    bundle = tmp_path / "b.bundle"
    assert nhi("ledger", "export", str(bundle), "--url", broker.url).returncode == 0
    offline = nhi(
        "audit",
        "prove",
        "--bundle",
        str(bundle),
        "--verifier-key",
        ledger.verifier_key,
        "--leaf-hash",
        issued.leaf_hash,
    )
    assert offline.returncode == 0, offline.stderr
    assert f"entry            {issued.index} (issuance)" in offline.stdout


def _forge_claim(token: str) -> str:
    import base64

    header, payload, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["aud"] = "refunds-admin-api"  # a broader audience than was ever issued
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return f"{header}.{forged}.{sig}"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (lambda led: ["--leaf-hash", "ab" * 32], "no entry with leaf hash"),
        (lambda led: ["--leaf-hash", "XYZ"], "a leaf hash is 64 lower-case hex digits"),
        (lambda led: ["--jti", "never-issued"], "no issuance entry in the verified tree"),
        (lambda led: ["--token", "not.a.jwt.at.all"], "not a compact JWT"),
        (lambda led: ["--token", _forge_claim(led.issued[0].token)], "claims differ from those the entry committed"),
    ],
    ids=["unknown-hash", "malformed-hash", "unknown-jti", "not-a-jwt", "altered-claims"],
)
def test_prove_refuses(served_ledger: tuple[LiveBroker, Ledger], query, expected: str) -> None:  # type: ignore[no-untyped-def]
    broker, ledger = served_ledger
    r = nhi("audit", "prove", "--url", broker.url, "--verifier-key", ledger.verifier_key, *query(ledger))
    assert r.returncode == 1
    assert expected in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--url", "ftp://example.org"], "http(s) URL"),
        (["--url", "http://127.0.0.1:9"], "cannot read the ledger"),
        (["--bundle", "/nonexistent/bundle"], "cannot read bundle"),
        (["--bundle", __file__], "is not a ledger bundle"),
    ],
    ids=["bad-scheme", "unreachable", "missing-bundle", "not-a-bundle"],
)
def test_verify_bad_sources(args: list[str], expected: str, written_ledger: Ledger) -> None:
    r = nhi("audit", "verify", *args, "--verifier-key", written_ledger.verifier_key)
    assert r.returncode == 1
    assert expected in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_verify_bad_keys(served_ledger: tuple[LiveBroker, Ledger]) -> None:
    broker, ledger = served_ledger
    name = ledger.verifier_key.split("+")[0]
    for key, expected in [
        ("not-a-key", "malformed verifier key"),
        (name + "+00000000+" + ledger.verifier_key.split("+", 2)[2], "key ID of the verifier key does not match"),
    ]:
        r = nhi("audit", "verify", "--url", broker.url, "--verifier-key", key)
        assert r.returncode == 1 and expected in r.stderr, r.stderr
    r = nhi(
        "audit", "verify", "--url", broker.url, "--verifier-key", ledger.verifier_key, "--origin", "other.example/log"
    )
    assert r.returncode == 1 and "origin does not match" in r.stderr


def test_consistency_and_witness(broker_on_copy: tuple[LiveBroker, Ledger], tmp_path: Path) -> None:
    from broker.audit import WitnessVerifier

    broker, ledger = broker_on_copy
    state = tmp_path / "monitor.json"
    first = nhi(
        "audit", "consistency", "--url", broker.url, "--verifier-key", ledger.verifier_key, "--state", str(state)
    )
    assert first.returncode == 0 and "first checkpoint recorded" in first.stdout, first.stderr
    assert exchange(broker, SUPPORT, REFUND).status_code == 200
    assert exchange(broker, TRIAGE, FOREIGN, audience="orders-api").status_code in (400, 403)
    second = nhi(
        "audit", "consistency", "--url", broker.url, "--verifier-key", ledger.verifier_key, "--state", str(state)
    )
    assert second.returncode == 0 and "grew from" in second.stdout, second.stderr

    wkey = tmp_path / "witness.pem"
    witness = nhi(
        "audit",
        "witness",
        "--url",
        broker.url,
        "--verifier-key",
        ledger.verifier_key,
        "--state",
        str(tmp_path / "witness.json"),
        "--witness-key",
        str(wkey),
        "--name",
        "witness.example/w1",
    )
    assert witness.returncode == 0, witness.stderr
    vkey = witness.stderr.split("verifier key: ")[1].split()[0]
    cosig = WitnessVerifier(vkey).verify(witness.stdout)
    assert cosig.name == "witness.example/w1"
