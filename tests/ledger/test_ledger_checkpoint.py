"""C2SP signed notes and tlog checkpoints: the Go sumdb vector, round trips, and refusals."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.errors import VerificationError
from broker.ledger.checkpoint import (
    Checkpoint,
    NoteSigner,
    NoteVerifier,
    sign_checkpoint,
    verify_checkpoint,
)
from broker.ledger.merkle import EMPTY_ROOT

NOTE_VECTOR = json.loads((Path(__file__).parents[1] / "vectors" / "signed_note.json").read_text())
ORIGIN = "example.com/ledger"
ROOT = bytes(range(32))


def _key(seed: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32)


@pytest.fixture
def signer() -> NoteSigner:
    return NoteSigner(ORIGIN, _key(1))


# -- the published Go example (golang.org/x/mod/sumdb/note) ----------------------------------------


def _vector_signer() -> NoteSigner:
    name, _, encoded = NOTE_VECTOR["signer_key"].split("+", 4)[2:]
    raw = base64.b64decode(encoded)
    assert raw[0] == 0x01
    return NoteSigner(name, Ed25519PrivateKey.from_private_bytes(raw[1:]))


def test_go_vector_key_id_and_verifier_key():
    signer = _vector_signer()
    assert signer.key_id.hex() == "c74f20a3"
    assert signer.verifier_key == NOTE_VECTOR["verifier_key"]


def test_go_vector_signature_is_reproduced_byte_for_byte():
    assert _vector_signer().sign(NOTE_VECTOR["text"]) == NOTE_VECTOR["note"]


def test_go_vector_verifies_and_ignores_unknown_cosigner():
    verifier = NoteVerifier.from_verifier_key(NOTE_VECTOR["verifier_key"])
    assert verifier.open(NOTE_VECTOR["note"]) == NOTE_VECTOR["text"]
    assert verifier.open(NOTE_VECTOR["cosigned_note_unknown_key"]) == NOTE_VECTOR["text"]


# -- checkpoints --------------------------------------------------------------------------------------


def test_round_trip(signer):
    note = sign_checkpoint(signer, ORIGIN, 42, ROOT)
    body = f"{ORIGIN}\n42\n{base64.b64encode(ROOT).decode()}\n"
    assert note.startswith(body + "\n\u2014 " + ORIGIN + " ")
    checkpoint = verify_checkpoint(note, signer.verifier_key, expected_origin=ORIGIN)
    assert checkpoint == Checkpoint(ORIGIN, 42, ROOT, ())


def test_empty_tree_checkpoint(signer):
    checkpoint = verify_checkpoint(sign_checkpoint(signer, ORIGIN, 0, EMPTY_ROOT), signer.verifier_key)
    assert (checkpoint.size, checkpoint.root) == (0, EMPTY_ROOT)


def test_extension_lines_are_returned(signer):
    body = Checkpoint(ORIGIN, 7, ROOT, ("ext one", "ext-two")).body()
    checkpoint = verify_checkpoint(signer.sign(body), signer.verifier_key)
    assert checkpoint.extensions == ("ext one", "ext-two")


def test_verifier_key_format(signer):
    name, key_id, encoded = signer.verifier_key.split("+", 2)
    assert name == ORIGIN
    assert key_id == signer.key_id.hex() and len(key_id) == 8
    raw = base64.b64decode(encoded)
    assert raw[0] == 0x01 and len(raw) == 33


def test_cosigned_checkpoint_verifies_for_each_key(signer):
    witness = NoteSigner("witness.example/w1", _key(2))
    note = sign_checkpoint(signer, ORIGIN, 3, ROOT)
    body, sigs = note.split("\n\n", 1)
    witness_line = witness.sign(body + "\n").split("\n\n", 1)[1]
    cosigned = f"{body}\n\n{sigs}{witness_line}"
    assert verify_checkpoint(cosigned, signer.verifier_key).size == 3
    assert verify_checkpoint(cosigned, witness.verifier_key).size == 3


def _resign_raw(signer: NoteSigner, text: str) -> str:
    """A validly signed note over arbitrary text, to test the checkpoint syntax checks."""
    return signer.sign(text)


def _root64() -> str:
    return base64.b64encode(ROOT).decode()


@pytest.mark.parametrize(
    "text,reason",
    [
        ("example.com/ledger\n007\n{root}\n", "canonical decimal"),
        ("example.com/ledger\n+7\n{root}\n", "canonical decimal"),
        ("example.com/ledger\n 7\n{root}\n", "canonical decimal"),
        ("example.com/ledger\n7.0\n{root}\n", "canonical decimal"),
        ("example.com/ledger\n1_000\n{root}\n", "canonical decimal"),
        ("example.com/ledger\n\u0663\n{root}\n", "canonical decimal"),  # Arabic-Indic digit three
        ("example.com/ledger\n-1\n{root}\n", "canonical decimal"),
        ("example.com/ledger\n18446744073709551616\n{root}\n", "canonical decimal"),
        ("example.com/ledger\n\n{root}\n", "canonical decimal"),
        ("example.com/ledger\n7\n", "fewer than three"),
        ("\n7\n{root}\n", "origin is empty"),
        ("example.com/ledger\n7\nAAAA\n", "not a SHA-256 hash"),
        ("example.com/ledger\n7\n{root_nopad}\n", "base64"),
        ("example.com/ledger\n7\n{root}=\n", "canonical base64"),
        ("example.com/ledger\n7\n{root_badbits}\n", "canonical base64"),
        ("example.com/ledger\n7\n{root}\n\next\n", "empty extension"),
    ],
)
def test_checkpoint_syntax_refused(signer, text, reason):
    root = _root64()
    badbits = root[:-2] + chr(ord(root[-2]) + 1) + "="  # same bytes under lax decoding
    note = _resign_raw(signer, text.format(root=root, root_nopad=root.rstrip("="), root_badbits=badbits))
    with pytest.raises(VerificationError, match=reason):
        verify_checkpoint(note, signer.verifier_key)


def test_origin_mismatch(signer):
    note = sign_checkpoint(signer, ORIGIN, 1, ROOT)
    with pytest.raises(VerificationError, match="origin"):
        verify_checkpoint(note, signer.verifier_key, expected_origin="example.com/other")


# -- signatures -------------------------------------------------------------------------------------------


def test_wrong_key(signer):
    note = sign_checkpoint(signer, ORIGIN, 1, ROOT)
    other = NoteSigner(ORIGIN, _key(9))  # same name, different key, hence a different key ID
    with pytest.raises(VerificationError, match="not signed by key"):
        verify_checkpoint(note, other.verifier_key)


def test_edited_body(signer):
    note = sign_checkpoint(signer, ORIGIN, 1, ROOT)
    with pytest.raises(VerificationError, match="invalid signature"):
        verify_checkpoint(note.replace("\n1\n", "\n2\n", 1), signer.verifier_key)


def test_swapped_signature(signer):
    note1 = sign_checkpoint(signer, ORIGIN, 1, ROOT)
    note2 = sign_checkpoint(signer, ORIGIN, 2, ROOT)
    swapped = note1.split("\n\n")[0] + "\n\n" + note2.split("\n\n")[1]
    with pytest.raises(VerificationError, match="invalid signature"):
        verify_checkpoint(swapped, signer.verifier_key)


def test_a_bad_signature_by_the_known_key_rejects_the_note_even_beside_a_good_one(signer):
    good = sign_checkpoint(signer, ORIGIN, 1, ROOT)
    bad_line = sign_checkpoint(signer, ORIGIN, 2, ROOT).split("\n\n")[1]
    with pytest.raises(VerificationError, match="invalid signature"):
        verify_checkpoint(good + bad_line, signer.verifier_key)


def test_signature_with_our_name_but_other_key_id_is_ignored(signer):
    note = sign_checkpoint(signer, ORIGIN, 1, ROOT)
    body, line = note.split("\n\n")
    raw = base64.b64decode(line.rsplit(" ", 1)[1])
    forged = bytes([raw[0] ^ 1]) + raw[1:]
    other_id = f"{body}\n\n\u2014 {ORIGIN} {base64.b64encode(forged).decode()}\n"
    with pytest.raises(VerificationError, match="not signed by key"):
        verify_checkpoint(other_id, signer.verifier_key)
    # ... and a known good signature next to it still verifies.
    assert verify_checkpoint(note + other_id.split("\n\n")[1], signer.verifier_key).size == 1


@pytest.mark.parametrize(
    "mutate,reason",
    [
        (lambda n: n.replace("\n\n", "\n"), "no signature block"),
        (lambda n: n.split("\n\n")[0] + "\n\n", "no signatures"),
        (lambda n: n[:-1], "newline"),
        (lambda n: n.replace("\u2014 ", "-- "), "malformed signature line"),
        (lambda n: n.replace("\u2014 ", "\u2014"), "malformed"),
        (lambda n: n.rsplit(" ", 1)[0] + " !!!!\n", "base64"),
        (lambda n: n[:-1] + "=\n", "base64"),
        (lambda n: n.rsplit(" ", 1)[0] + " AAAA\n", "too short"),
        (lambda n: n.rsplit(" ", 1)[0] + "\n", "too short"),
        (lambda n: n.replace(ORIGIN + "\n", ORIGIN + "\r\n", 1), "control characters"),
        (lambda n: n.replace("\n", "\t\n", 1), "control characters"),
        (lambda n: n + ("\u2014 w x" + "A" * 8 + "\n") * 100, "too many signatures"),
        (lambda n: n.replace("\u2014 " + ORIGIN, "\u2014 bad+name"), "key name"),
        (lambda n: "x" * (1 << 20) + n, "too large"),
    ],
)
def test_malformed_notes(signer, mutate, reason):
    note = sign_checkpoint(signer, ORIGIN, 1, ROOT)
    with pytest.raises(VerificationError, match=reason):
        verify_checkpoint(mutate(note), signer.verifier_key)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda k: k.replace("+", " +", 1),  # name with a space
        lambda k: k.split("+", 1)[0],  # no key ID or key
        lambda k: k.split("+")[0] + "+" + "0" * 8 + "+" + k.split("+", 2)[2],  # key ID does not match
        lambda k: k.split("+")[0] + "+" + k.split("+")[1].upper() + "+" + k.split("+", 2)[2],  # uppercase id
        lambda k: k.rsplit("+", 1)[0] + "+" + base64.b64encode(b"\x02" + bytes(32)).decode(),  # not Ed25519
        lambda k: k.rsplit("+", 1)[0] + "+" + base64.b64encode(b"\x01" + bytes(31)).decode(),  # short key
        lambda k: k + "=",  # bad base64
    ],
)
def test_malformed_verifier_keys(signer, mutate):
    bad = mutate(signer.verifier_key)
    with pytest.raises(ValueError):
        NoteVerifier.from_verifier_key(bad)
    note = sign_checkpoint(signer, ORIGIN, 1, ROOT)
    with pytest.raises(VerificationError, match="verifier key"):
        verify_checkpoint(note, bad)


# -- signer input checks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "has space", "has+plus", "tab\there", "nbsp\u00a0", "line\u2028sep"])
def test_signer_refuses_bad_names(name):
    with pytest.raises(ValueError):
        NoteSigner(name, _key(1))


def test_signer_refuses_non_ed25519_keys():
    with pytest.raises(TypeError):
        NoteSigner(ORIGIN, generate_private_key(SECP256R1()))  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["no newline", "ctl\x01\n", "cr\r\n"])
def test_signer_refuses_bad_text(signer, text):
    with pytest.raises(ValueError):
        signer.sign(text)


@pytest.mark.parametrize(
    "origin,size,root",
    [
        ("has space", 1, ROOT),
        ("", 1, ROOT),
        (ORIGIN, -1, ROOT),
        (ORIGIN, 1 << 64, ROOT),
        (ORIGIN, 1, b"short"),
    ],
)
def test_sign_checkpoint_refuses_bad_fields(signer, origin, size, root):
    with pytest.raises(ValueError):
        sign_checkpoint(signer, origin, size, root)
