"""Ledger key rotation, recorded in the ledger itself (docs/ledger.md §5.3).

Rotating from key K0 to K1: (1) K0 signs an *endorsement* of K1 — a signed note whose text is
``nhi-broker ledger key rotation/v1``, the origin and K1's verifier key; (2) a ``key_rotation``
entry (purpose ``ledger``) carrying K1's public JWK and that endorsement is appended; (3) a
checkpoint covering it is signed by K0 and recorded (the hand-over); (4) K1 replaces K0 on disk and
K0 is kept, retired. Checkpoints signed by K0 stay verifiable with K0; an auditor who trusts K0
accepts K1 through the endorsement it finds in the verified tree (:func:`endorsed_key`).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from broker.clock import Clock
from broker.entries import key_rotation_entry
from broker.errors import VerificationError
from broker.ledger.checkpoint import NoteSigner, NoteVerifier
from broker.ledger.engines import default_ledger_url, open_ledger_storage
from broker.ledger.log import Ledger
from broker.mint.keys import b64url, public_jwk

__all__ = ["ENDORSEMENT_HEADER", "endorsed_key", "rotate_ledger_key"]

ENDORSEMENT_HEADER = "nhi-broker ledger key rotation/v1"


def endorsed_key(endorsement: str, by_verifier_key: str, origin: str, public_jwk_x: str) -> str:
    """The verifier key that ``by_verifier_key`` endorsed for ``origin``; :class:`VerificationError` otherwise.

    ``public_jwk_x`` is the entry's JWK ``x``: the endorsed key must be the key the entry records.
    """
    try:
        verifier = NoteVerifier.from_verifier_key(by_verifier_key)
    except ValueError as exc:
        raise VerificationError(f"malformed verifier key: {exc}") from None
    text = verifier.open(endorsement)
    lines = text.split("\n")[:-1]
    if len(lines) != 3 or lines[0] != ENDORSEMENT_HEADER:
        raise VerificationError("not a ledger key endorsement")
    if lines[1] != origin:
        raise VerificationError("the endorsement is for another log")
    try:
        new = NoteVerifier.from_verifier_key(lines[2])
    except ValueError as exc:
        raise VerificationError(f"the endorsed key is malformed: {exc}") from None
    if b64url(new.public_key_bytes) != public_jwk_x:
        raise VerificationError("the endorsed key is not the key the entry records")
    return lines[2]


def rotate_ledger_key(data_dir: Path, key_name: str, origin: str, clock: Clock,
                      ledger_url: str | None = None) -> tuple[str, str]:
    """Rotate the ledger key under ``data_dir``; ``(old verifier key, new verifier key)``.

    ``ledger_url`` names the ledger storage (default: ``ledger.sqlite3`` under ``data_dir``). On a
    shared (PostgreSQL) ledger, copy the new key to every replica.

    Running brokers take the new key file up without a restart (:meth:`Runtime.refresh_keys`); until
    then they sign with the old key, which auditors still accept.
    """
    from broker.mint.keys import _load

    key_path = data_dir / "keys" / "ledger-key.pem"
    old = _load(key_path, "EdDSA")
    assert isinstance(old, Ed25519PrivateKey)
    new = Ed25519PrivateKey.generate()
    old_signer, new_signer = NoteSigner(key_name, old), NoteSigner(key_name, new)
    endorsement = old_signer.sign(f"{ENDORSEMENT_HEADER}\n{origin}\n{new_signer.verifier_key}\n")
    jwk = public_jwk(new)
    entry = key_rotation_entry(now=clock.now(), request_id=f"cli-{uuid.uuid4().hex}", purpose="ledger",
                               kid=jwk["kid"], alg="EdDSA", jwk=jwk, endorsement=endorsement)
    # (1)-(3) with the old key: the entry, then a recorded hand-over checkpoint that covers it.
    # Opening the ledger checks its integrity: never endorse a key over a rewritten history.
    storage = open_ledger_storage(ledger_url or default_ledger_url(data_dir))
    with Ledger(storage, old_signer, origin, clock) as ledger:
        ledger.append(entry)
        ledger.checkpoint()
    # (4) the new key in place; the old one kept, retired, for the record.
    old_kid = public_jwk(old)["kid"]
    staged = key_path.with_name("ledger-key.pem.new")
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, new.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.link(key_path, key_path.with_name(f"ledger-key.{old_kid}.retired.pem"))
    os.replace(staged, key_path)
    return old_signer.verifier_key, new_signer.verifier_key
