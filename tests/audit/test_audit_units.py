"""The auditor's building blocks without a broker process: schema, canonical fast path, monitor, witness."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit import (
    AuditFailure,
    ConsistencyViolation,
    EntrySchemaError,
    WitnessSigner,
    WitnessVerifier,
    check_consistency,
    validate_entry,
    verify_ledger,
)
from broker.audit._canonical import decode_leaf
from broker.audit.local import LocalLedgerSource
from broker.clock import FixedClock
from broker.errors import VerificationError
from broker.ledger import Ledger, NoteSigner, SqliteLedgerStorage, decode_entry
from broker.ledger.merkle import MerkleTree
from broker.mint.keys import public_jwk

H = "sha256:" + "ab" * 32
ISSUANCE: dict[str, Any] = {
    "v": 1,
    "kind": "issuance",
    "time": "2026-11-23T10:00:00Z",
    "request_id": "req-1",
    "workload": {
        "spiffe_id": "spiffe://example.org/ns/support/sa/support-assistant",
        "attestation": "kubernetes",
        "issuer": "https://k8s.example.org",
        "evidence_digest": H,
        "name": "support-assistant",
        "owner": "Dana Reyes <dana.reyes@example.com>",
    },
    "audience": "payments-api",
    "intent": {
        "type": "intent",
        "action": "payments.refund",
        "resource": "customers/c-42/orders/o-1",
        "context": {"customer": "c-42", "amount": 20},
    },
    "decision": {"effect": "allow", "rule": "refund-small-eur", "policy_version": H},
    "credential": {"kind": "jwt", "jti": "abc123", "kid": "kid1", "iat": 100, "exp": 400, "claims_sha256": H},
}
KEY_ROTATION: dict[str, Any] = {
    "v": 1,
    "kind": "key_rotation",
    "time": "2026-11-23T10:00:00Z",
    "request_id": "start-1",
    "key": {"purpose": "ledger", "kid": "", "alg": "EdDSA", "public_jwk": {}},
}
_jwk = public_jwk(Ed25519PrivateKey.generate())
KEY_ROTATION["key"]["kid"] = _jwk["kid"]
KEY_ROTATION["key"]["public_jwk"] = _jwk


def _set(entry: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(entry)
    *parents, last = path.split(".")
    target = out
    for name in parents:
        target = target[name]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return out


_DELETE = object()

SCHEMA_ATTACKS = [
    # (name, entry, member named in the error, problem)
    ("version", _set(ISSUANCE, "v", 2), "v", "unsupported entry version"),
    ("bool-version", _set(ISSUANCE, "v", True), "v", "unsupported entry version"),
    ("kind", _set(ISSUANCE, "kind", "grant"), "kind", "must be one of"),
    ("time-format", _set(ISSUANCE, "time", "2026-11-23 10:00:00"), "time", "not an RFC 3339 UTC time"),
    ("time-calendar", _set(ISSUANCE, "time", "2026-02-30T10:00:00Z"), "time", "not a valid calendar time"),
    ("no-request-id", _set(ISSUANCE, "request_id", _DELETE), "request_id", "is required"),
    ("extra-member", _set(ISSUANCE, "token", "eyJ..."), "token", "is not a member"),
    ("trace-id-upper", _set(ISSUANCE, "trace_id", "4BF92F3577B34DA6A3CE929D0E0E4736"), "trace_id",
     "not a W3C trace id"),
    ("trace-id-short", _set(ISSUANCE, "trace_id", "4bf92f3577b34da6"), "trace_id", "not a W3C trace id"),
    ("trace-id-zero", _set(ISSUANCE, "trace_id", "0" * 32), "trace_id", "all zeros"),
    ("trace-id-number", _set(KEY_ROTATION, "trace_id", 4), "trace_id", "must be a string"),
    (
        "spiffe",
        _set(ISSUANCE, "workload.spiffe_id", "spiffe://example.org/../x"),
        "workload.spiffe_id",
        "not a SPIFFE ID",
    ),
    ("attestation", _set(ISSUANCE, "workload.attestation", "asserted"), "workload.attestation", "must be one of"),
    ("digest", _set(ISSUANCE, "workload.evidence_digest", "sha256:XYZ"), "workload.evidence_digest", "sha256:"),
    ("owner-missing", _set(ISSUANCE, "workload.owner", _DELETE), "workload.owner", "is required"),
    ("owner-control", _set(ISSUANCE, "workload.owner", "Dana\nEve"), "workload.owner", "control characters"),
    ("effect", _set(ISSUANCE, "decision.effect", "deny"), "decision.effect", "must be 'allow'"),
    ("resource", _set(ISSUANCE, "intent.resource", "customers/../admin"), "intent.resource", "not a resource"),
    ("context-nested", _set(ISSUANCE, "intent.context", {"x": {"y": 1}}), "intent.context.x", "must be a string"),
    ("exp-before-iat", _set(ISSUANCE, "credential.exp", 50), "credential.exp", "must be after"),
    ("negative-iat", _set(ISSUANCE, "credential.iat", -1), "credential.iat", "non-negative integer"),
    ("private-jwk", _set(KEY_ROTATION, "key.public_jwk.d", "secret"), "key.public_jwk.d", "private key material"),
    ("jwk-kid", _set(KEY_ROTATION, "key.public_jwk.kid", "other"), "key.public_jwk.kid", "thumbprint"),
    ("purpose", _set(KEY_ROTATION, "key.purpose", "tls"), "key.purpose", "must be one of"),
    ("endorsement", _set(KEY_ROTATION, "key.endorsement", 5), "key.endorsement", "must be a string, not a number"),
    ("endorsement-text", _set(KEY_ROTATION, "key.endorsement", "x"), "key.endorsement", "must be a signed note"),
    (
        "reserved-no-request-id",
        {"v": 1, "kind": "approval", "time": "2026-11-23T10:00:00Z"},
        "request_id",
        "is required",
    ),
]


def test_valid_entries_pass() -> None:
    assert validate_entry(ISSUANCE).owner == "Dana Reyes <dana.reyes@example.com>"
    assert validate_entry(KEY_ROTATION).kind == "key_rotation"
    # Every kind now has a full schema: a bare envelope is no longer enough for any of them.
    with pytest.raises(EntrySchemaError):
        validate_entry({"v": 1, "kind": "approval", "time": "2026-11-23T10:00:00Z", "request_id": "r"})


@pytest.mark.parametrize(("name", "entry", "member", "problem"), SCHEMA_ATTACKS, ids=[a[0] for a in SCHEMA_ATTACKS])
def test_schema_attacks(name: str, entry: dict[str, Any], member: str, problem: str) -> None:
    with pytest.raises(EntrySchemaError) as caught:
        validate_entry(entry)
    assert caught.value.member == member, str(caught.value)
    assert problem in caught.value.problem, str(caught.value)


LEAVES = [
    rfc8785.dumps(ISSUANCE),
    rfc8785.dumps({"a": "é", "b": [1, 2.5, -0.0, 1e21], "c": "\u2028\x01"}),
    rfc8785.dumps({"big": 2**53 - 1, "neg": -(2**53 - 1)}),
    b'{"b":1,"a":2}',
    b'{"a":1,"a":1}',
    b'{"a": 1}',
    b'{"a":1.0}',
    b'{"a":"\\/"}',
    b'{"a":-0}',
    b'{"a":NaN}',
    b"[1]",
    b"\xff",
    b'{"a":9007199254740992}',  # 2**53: outside I-JSON's exact range
    b'{"a":-9007199254740991}',
    b'{"a":999999999999999,"b":[1000000000000000]}',
    b'{"a":1e400}',
    b'{"a":1E2}',
    b'{"a":[1,2.5]}',
    b'{"a":"\\u0041"}',
    b'{"a":"\\u001F"}',
    b'{"a":"\\u001f"}',
    b'{"a":{"b":1,"b":1}}',
    b'{"a":"x:1.5","b":"[12345678901234567"}',  # number look-alikes inside strings
    b'{"a":true,"b":false,"c":null,"d":[],"e":{}}',
    b'{"a":1}\n',
    b' {"a":1}',
    b'{"a":"\\ud800"}',
    b'{"\\ud83d\\ude00":1}',
    b'{"a":' * 300 + b"1" + b"}" * 300,  # deeper than pydantic-core's parser goes
]


@pytest.mark.parametrize("leaf", LEAVES)
def test_fast_canonical_path_agrees_with_reference(leaf: bytes) -> None:
    try:
        expected: Any = decode_entry(leaf)
    except VerificationError as exc:
        expected = type(exc)
    try:
        got: Any = decode_leaf(leaf)
    except VerificationError as exc:
        got = type(exc)
    assert got == expected


def test_fast_canonical_path_agrees_with_reference_on_random_leaves() -> None:
    rng = random.Random(11)
    pieces = ["a", "b", "é", "\x01", '"', "\\", "1", ":", ".", "[", "e"]

    def value(depth: int) -> Any:
        roll = rng.random()
        if depth > 3 or roll < 0.5:
            return rng.choice([
                "".join(rng.choice(pieces) for _ in range(rng.randint(0, 4))), rng.randint(-(2**53 - 1), 2**53 - 1),
                rng.randint(-9, 9), True, False, None, 1.5, -0.0, 2**53 - 1, 10**15,
            ])
        if roll < 0.8:
            return {"".join(rng.choice(pieces[:4]) for _ in range(rng.randint(0, 3))): value(depth + 1)
                    for _ in range(rng.randint(0, 4))}
        return [value(depth + 1) for _ in range(rng.randint(0, 4))]

    for _ in range(3000):
        leaf = rfc8785.dumps({"k": value(0), "v": value(0)})
        if rng.random() < 0.3:  # flip, drop or repeat one byte
            at = rng.randrange(len(leaf))
            leaf = rng.choice([leaf[:at] + leaf[at + 1 :], leaf[:at] + leaf[at : at + 1] * 2 + leaf[at + 1 :],
                               leaf[:at] + bytes([rng.randrange(32, 127)]) + leaf[at + 1 :]])
        try:
            expected: Any = decode_entry(leaf)
        except VerificationError as exc:
            expected = type(exc)
        try:
            got: Any = decode_leaf(leaf)
        except VerificationError as exc:
            got = type(exc)
        assert repr(got) == repr(expected), leaf


ORIGIN = "test.example/ledger"


def _ledger(path: Path, key: Ed25519PrivateKey, entries: list[dict[str, Any]]) -> Ledger:
    ledger = Ledger(SqliteLedgerStorage(path), NoteSigner(ORIGIN, key), ORIGIN, FixedClock(1_800_000_000))
    for entry in entries:
        ledger.append(entry)
    return ledger


def _entry(n: int) -> dict[str, Any]:
    return _set(ISSUANCE, "request_id", f"req-{n}")


def test_monitor_detects_fork_and_rollback(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    vkey = NoteSigner(ORIGIN, key).verifier_key
    honest = _ledger(tmp_path / "a.sqlite3", key, [_entry(i) for i in range(5)])
    forked = _ledger(tmp_path / "b.sqlite3", key, [_entry(i) for i in (0, 1, 2, 3, 99)])
    short = _ledger(tmp_path / "c.sqlite3", key, [_entry(i) for i in range(3)])
    state = tmp_path / "state.json"
    try:
        assert check_consistency(LocalLedgerSource(honest), vkey, state).previous is None
        honest.append(_entry(5))
        assert check_consistency(LocalLedgerSource(honest), vkey, state).previous.size == 5  # type: ignore[union-attr]
        before = state.read_text()
        forked.append(_entry(100))  # same size as the honest log, another root
        with pytest.raises(ConsistencyViolation) as caught:
            check_consistency(LocalLedgerSource(forked), vkey, state)
        assert caught.value.kind == "fork" and caught.value.previous != caught.value.latest
        forked.append(_entry(101))  # larger: the consistency proof cannot verify
        with pytest.raises(ConsistencyViolation, match="does not extend") as caught:
            check_consistency(LocalLedgerSource(forked), vkey, state)
        with pytest.raises(ConsistencyViolation) as caught:
            check_consistency(LocalLedgerSource(short), vkey, state)
        assert caught.value.kind == "rollback" and caught.value.index == 3
        assert state.read_text() == before  # evidence kept: the state never moves on a violation
        # The same fork, seen by a full verification that holds the earlier checkpoint: a forked log
        # cannot give honest proofs, so the verifier states the bound it can prove, not an index.
        with pytest.raises(ConsistencyViolation) as caught:
            verify_ledger(LocalLedgerSource(forked), vkey, trusted_note=json.loads(before)["checkpoint"])
        assert caught.value.kind == "fork" and not caught.value.exact
    finally:
        for ledger in (honest, forked, short):
            ledger.close()


def test_monitor_refuses_a_state_signed_by_another_key(tmp_path: Path) -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    with _ledger(tmp_path / "a.sqlite3", key, [_entry(1)]) as a, _ledger(tmp_path / "b.sqlite3", other, []) as b:
        state = tmp_path / "state.json"
        check_consistency(LocalLedgerSource(b), NoteSigner(ORIGIN, other).verifier_key, state)
        with pytest.raises(AuditFailure, match=r"stored checkpoint .* does not verify"):
            check_consistency(LocalLedgerSource(a), NoteSigner(ORIGIN, key).verifier_key, state)
        (tmp_path / "junk.json").write_text("[]")
        with pytest.raises(AuditFailure, match="not a monitor state file"):
            check_consistency(LocalLedgerSource(a), NoteSigner(ORIGIN, key).verifier_key, tmp_path / "junk.json")


def test_witness_cosignature_round_trip_and_attacks(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    with _ledger(tmp_path / "a.sqlite3", key, [_entry(1), _entry(2)]) as ledger:
        consistent = check_consistency(
            LocalLedgerSource(ledger), NoteSigner(ORIGIN, key).verifier_key, tmp_path / "w.json"
        )
    witness = WitnessSigner("witness.example/w1", Ed25519PrivateKey.generate())
    with pytest.raises(TypeError, match="only a checkpoint verified consistent"):
        witness.cosign(consistent.note, 1_800_000_123)  # type: ignore[arg-type]
    note = witness.cosign(consistent, 1_800_000_123)
    verifier = WitnessVerifier(witness.verifier_key)
    assert verifier.verify(note).timestamp == 1_800_000_123
    # The log's own signature still verifies: a cosigned note is a valid checkpoint for log clients.
    from broker.ledger import verify_checkpoint

    assert verify_checkpoint(note, NoteSigner(ORIGIN, key).verifier_key).size == 2

    body, _, _sigs = note.partition("\n\n")
    attacks = [
        ("other-root", note.replace(body.split("\n")[2], "A" * 43 + "=", 1), "invalid cosignature"),
        ("no-cosignature", consistent.note, "no cosignature by witness.example/w1"),
        (
            "other-witness",
            WitnessSigner("witness.example/w1", Ed25519PrivateKey.generate()).cosign(consistent, 1),
            "no cosignature by",
        ),
    ]
    for name, attacked, expected in attacks:
        with pytest.raises(VerificationError, match=expected):
            verifier.verify(attacked)
        assert name
    for bad_key, expected in [
        ("w+00000000+AAAA", "only Ed25519 cosignature/v1 keys"),
        (NoteSigner("witness.example/w1", Ed25519PrivateKey.generate()).verifier_key, "type 0x04"),
        ("nonsense", "has the form"),
    ]:
        with pytest.raises(ValueError, match=expected):
            WitnessVerifier(bad_key)


def test_progress_bar_draws_only_when_asked() -> None:
    import io

    from broker.cli._progress import ProgressBar

    quiet = io.StringIO()
    bar = ProgressBar("verifying", stream=quiet)
    bar(5, 10)
    bar.close()
    assert quiet.getvalue() == ""  # not a terminal: logs and pipes stay clean
    shown = io.StringIO()
    bar = ProgressBar("verifying", stream=shown, force=True)
    bar(10, 10)
    bar.close()
    assert "verifying [" in shown.getvalue() and "100%" in shown.getvalue() and "10/10" in shown.getvalue()
    assert shown.getvalue().endswith("\n")


def test_parallel_verification_agrees_with_inline(tmp_path: Path) -> None:
    from broker.audit import BundleLedgerSource
    from broker.audit.bundle import write_bundle

    key = Ed25519PrivateKey.generate()
    with _ledger(tmp_path / "a.sqlite3", key, [_entry(i) for i in range(3000)]) as ledger:
        note = ledger.checkpoint()
        leaves = [leaf for start in range(0, 3000, 1000) for leaf in ledger.entries(start, start + 1000)]
    vkey = NoteSigner(ORIGIN, key).verifier_key
    bundle = tmp_path / "b.bundle"
    write_bundle(bundle, origin=ORIGIN, checkpoint=note, size=3000, verifier_key=vkey, leaves=leaves)
    inline = verify_ledger(BundleLedgerSource(bundle), vkey)
    parallel = verify_ledger(BundleLedgerSource(bundle), vkey, jobs=2, parallel_threshold=1)
    assert parallel.summary == inline.summary and parallel.tree.root() == inline.tree.root()
    assert parallel.summary.by_kind["issuance"] == 3000
    # An entry of the second batch (index 2500) broken: the same first bad index either way.
    lines = bundle.read_bytes().split(b"\n")
    idx, digest, _ = lines[1 + 2500].split(b" ")
    import base64

    bad = leaves[2500].replace(b'"amount":20', b'"amount":-0.5e1')
    lines[1 + 2500] = b" ".join([idx, digest, base64.b64encode(bad)])
    bundle.write_bytes(b"\n".join(lines))
    for jobs in (1, 2):
        with pytest.raises(AuditFailure) as caught:
            verify_ledger(BundleLedgerSource(bundle), vkey, jobs=jobs, parallel_threshold=1)
        assert caught.value.index == 2500 and "leaf hash the source states" in caught.value.reason


def test_saved_leaf_hashes_must_rebuild_the_trusted_root(tmp_path: Path) -> None:
    from broker.audit.monitor import load_state_hashes, save_state

    key = Ed25519PrivateKey.generate()
    vkey = NoteSigner(ORIGIN, key).verifier_key
    with _ledger(tmp_path / "a.sqlite3", key, [_entry(i) for i in range(5)]) as ledger:
        verified = verify_ledger(LocalLedgerSource(ledger), vkey)
        hashes = verified.tree.nodes(0, 0, 5)
        state = tmp_path / "state.json"
        save_state(state, verified.note, hashes)
        assert load_state_hashes(state) == hashes
        with pytest.raises(AuditFailure, match="damaged monitor state"):
            verify_ledger(
                LocalLedgerSource(ledger),
                vkey,
                trusted_note=verified.note,
                trusted_leaf_hashes=hashes[:-1] + bytes([hashes[-1] ^ 1]),
            )
        ledger.append(_entry(9))
        assert (
            verify_ledger(
                LocalLedgerSource(ledger), vkey, trusted_note=verified.note, trusted_leaf_hashes=hashes
            ).checkpoint.size
            == 6
        )
        # `audit consistency` keeps the saved hashes up to date: they rebuild the new signed root.
        latest = check_consistency(LocalLedgerSource(ledger), vkey, state)
        kept = load_state_hashes(state)
        assert kept is not None and len(kept) == 6 * 32 and kept[: 5 * 32] == hashes
        assert MerkleTree(kept[i : i + 32] for i in range(0, len(kept), 32)).root() == latest.checkpoint.root
