"""`nhi-broker audit ...` and `nhi-broker ledger export` end to end, against a live broker and a bundle."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import jwt
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


def _resigned(token: str, alg: str = "ES256") -> str:
    """The same header and claims, signed by a key the broker never had (or with alg none)."""
    import base64

    from cryptography.hazmat.primitives.asymmetric import ec

    header_b64, payload, _ = token.split(".")
    header = json.loads(base64.urlsafe_b64decode(header_b64 + "=" * (-len(header_b64) % 4)))
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    if alg == "none":  # an unsigned token: a rejection test only
        unsigned = {**header, "alg": "none"}
        encode = base64.urlsafe_b64encode
        return (encode(json.dumps(unsigned).encode()).decode().rstrip("=") + "."
                + encode(json.dumps(claims).encode()).decode().rstrip("=") + ".")
    return jwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256",
                      headers={"kid": header["kid"], "typ": header["typ"]})


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (lambda led: ["--leaf-hash", "ab" * 32], "no entry with leaf hash"),
        (lambda led: ["--leaf-hash", "XYZ"], "a leaf hash is 64 lower-case hex digits"),
        (lambda led: ["--jti", "never-issued"], "no issuance entry in the verified tree"),
        (lambda led: ["--token", "not.a.jwt.at.all"], "not a compact JWT"),
        (lambda led: ["--token", _forge_claim(led.issued[0].token)], "claims differ from those the entry committed"),
        (lambda led: ["--token", _resigned(led.issued[0].token)], "signature does not verify with the key the ledger"),
        (lambda led: ["--token", _resigned(led.issued[0].token, "none")], "algorithm 'none' is not one the broker"),
    ],
    ids=["unknown-hash", "malformed-hash", "unknown-jti", "not-a-jwt", "altered-claims", "copied-claims-other-key",
         "alg-none"],
)
def test_prove_refuses(served_ledger: tuple[LiveBroker, Ledger], query, expected: str) -> None:  # type: ignore[no-untyped-def]
    broker, ledger = served_ledger
    r = nhi("audit", "prove", "--url", broker.url, "--verifier-key", ledger.verifier_key, *query(ledger))
    assert r.returncode == 1
    assert expected in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("args", "code", "expected"),
    [
        (["--url", "ftp://example.org"], 2, "http(s) URL"),
        (["--url", "http://127.0.0.1:9"], 4, "cannot read the ledger"),
        (["--bundle", "/nonexistent/bundle"], 4, "cannot read bundle"),
        (["--bundle", __file__], 4, "is not a ledger bundle"),
    ],
    ids=["bad-scheme", "unreachable", "missing-bundle", "not-a-bundle"],
)
def test_verify_bad_sources(args: list[str], code: int, expected: str, written_ledger: Ledger) -> None:
    # 2: usage, 4: nothing could be read; neither is a verdict on the ledger.
    r = nhi("audit", "verify", *args, "--verifier-key", written_ledger.verifier_key)
    assert r.returncode == code
    assert expected in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "does NOT verify" not in r.stderr


def test_verify_bad_keys(served_ledger: tuple[LiveBroker, Ledger]) -> None:
    broker, ledger = served_ledger
    name = ledger.verifier_key.split("+")[0]
    for key, expected in [
        ("not-a-key", "malformed verifier key"),
        (name + "+00000000+" + ledger.verifier_key.split("+", 2)[2], "key ID of the verifier key does not match"),
    ]:
        r = nhi("audit", "verify", "--url", broker.url, "--verifier-key", key)
        assert r.returncode == 2 and expected in r.stderr, r.stderr  # usage: nothing was checked
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
    assert exchange(broker, SUPPORT, REFUND, user="c-42").status_code == 200
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


def test_witness_publishes_cosignatures(written_ledger: Ledger, tmp_path: Path) -> None:
    import shutil

    import httpx
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    from broker.audit import WitnessSigner, WitnessVerifier

    key = Ed25519PrivateKey.generate()
    wkey = tmp_path / "witness.pem"
    wkey.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    wkey.chmod(0o600)
    vkey = WitnessSigner("witness.example/w1", key).verifier_key
    config = tmp_path / "broker.toml"
    config.write_text(f"ledger_witnesses = [{json.dumps(vkey)}]\n")
    shutil.copytree(written_ledger.data_dir, tmp_path / "data")
    broker = LiveBroker(tmp_path / "data", config=config)
    try:
        assert httpx.get(broker.url + "/v1/ledger/checkpoint/cosigned").status_code == 404
        r = nhi(
            "audit", "witness", "--url", broker.url, "--verifier-key", written_ledger.verifier_key,
            "--state", str(tmp_path / "w.json"), "--witness-key", str(wkey), "--name", "witness.example/w1",
            "--publish",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        cosigned = httpx.get(broker.url + "/v1/ledger/checkpoint/cosigned").text
        assert WitnessVerifier(vkey).verify(cosigned).name == "witness.example/w1"
        latest = httpx.get(broker.url + "/v1/ledger/checkpoint").text
        assert latest == cosigned  # nothing appended since: the latest checkpoint carries the cosignature

        stranger = WitnessSigner("witness.example/w1", Ed25519PrivateKey.generate())
        attacks = [
            (b"\xff\xfe", 400, "not UTF-8"),
            (b"junk", 400, "not a checkpoint of this log"),
            (r.stdout.replace("witness.example/w1 ", "witness.example/w2 ").encode(), 400, "no valid cosignature"),
            (cosigned.replace(cosigned.split("\n")[1], "999", 1).encode(), 400, "not a checkpoint of this log"),
        ]
        assert stranger.name
        for body, status, expected in attacks:
            answer = httpx.post(broker.url + "/v1/ledger/cosignatures", content=body)
            assert answer.status_code == status, answer.text
            assert expected in answer.json()["error_description"]
    finally:
        broker.stop()


def test_cosignatures_need_configured_witnesses(served_ledger: tuple[LiveBroker, Ledger]) -> None:
    import httpx

    from broker.config import load_settings
    from broker.errors import ConfigError

    broker, _ = served_ledger
    answer = httpx.post(broker.url + "/v1/ledger/cosignatures", content=b"anything")
    assert answer.status_code == 404 and "no witnesses configured" in answer.json()["error_description"]
    with pytest.raises(ConfigError, match="cosigner verifier key has the form"):
        load_settings(ledger_witnesses=["not-a-key"])


def test_tiles_read_api(served_ledger: tuple[LiveBroker, Ledger]) -> None:
    import struct

    import httpx

    from broker.ledger import root_from_leaf_hashes, verify_checkpoint
    from broker.ledger.merkle import leaf_hash

    broker, ledger = served_ledger
    base = broker.url + "/v1/ledger/tiles"
    checkpoint = verify_checkpoint(httpx.get(base + "/checkpoint").text, ledger.verifier_key)
    n = checkpoint.size
    assert 0 < n < 256
    hashes = httpx.get(f"{base}/tile/0/000.p/{n}")
    assert hashes.status_code == 200 and hashes.headers["content-type"] == "application/octet-stream"
    leaf_hashes = [hashes.content[i : i + 32] for i in range(0, len(hashes.content), 32)]
    assert root_from_leaf_hashes(leaf_hashes) == checkpoint.root
    bundle = httpx.get(f"{base}/tile/entries/000.p/{n}").content
    leaves, offset = [], 0
    while offset < len(bundle):
        (length,) = struct.unpack(">H", bundle[offset : offset + 2])
        leaves.append(bundle[offset + 2 : offset + 2 + length])
        offset += 2 + length
    assert [leaf_hash(leaf) for leaf in leaves] == leaf_hashes
    for path, status in [("0/000", 404), (f"0/000.p/{n + 1}", 404), ("1/000.p/1", 404), ("0/00", 400), ("x/000", 400)]:
        assert httpx.get(f"{base}/tile/{path}").status_code == status, path


def test_paged_verification_over_http(ledger_copy: Ledger) -> None:
    import sqlite3

    import rfc8785

    from broker.audit import AuditFailure
    from broker.ledger import SqliteLedgerStorage

    storage = SqliteLedgerStorage(ledger_copy.data_dir / "ledger.sqlite3")
    try:
        template = json.loads(storage.entries(ledger_copy.issued[0].index, ledger_copy.issued[0].index + 1)[0])
        extra = [rfc8785.dumps({**template, "request_id": f"bulk-{i}"}) for i in range(2500)]
        storage.append_batch(extra)  # one transaction: more than two pages of the read API
    finally:
        storage.close()
    broker = LiveBroker(ledger_copy.data_dir)
    try:
        source = HttpLedgerSource(broker.url)
        verified = verify_ledger(source, ledger_copy.verifier_key)
        assert verified.summary.by_kind["issuance"] == 6 + 2500
        conn = sqlite3.connect(ledger_copy.data_dir / "ledger.sqlite3", isolation_level=None)
        try:
            conn.execute("DROP TRIGGER entries_no_delete")
            conn.execute("DELETE FROM entries WHERE idx = 1500")
        finally:
            conn.close()
        with pytest.raises(AuditFailure) as caught:
            verify_ledger(source, ledger_copy.verifier_key)
        assert caught.value.index == 1500 and "does not serve this entry" in caught.value.reason
        source.close()
    finally:
        broker.stop()
