"""C2SP ``tlog-cosignature`` v1 (Ed25519, signature type 0x04): format, signing and verification.

A cosignature line is ``— <name> base64(key ID || timestamp || signature)``: key ID
``SHA-256(name || "\\n" || 0x04 || public key)[:4]``, timestamp a big-endian uint64 of POSIX
seconds, and the Ed25519 signature over ``cosignature/v1\\ntime <timestamp>\\n<checkpoint body>``.
It states that at that time this was the largest tree the cosigner saw consistent with every
earlier one. Witnesses sign through :class:`broker.audit.witness.WitnessSigner`, which only accepts
checkpoints verified consistent; the broker verifies cosignatures it publishes with
:class:`CosignatureVerifier`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from broker.errors import VerificationError

__all__ = ["Cosignature", "CosignatureVerifier", "cosignature_line", "cosigner_verifier_key", "split_note"]

_ALG_COSIGNATURE_V1 = 0x04
_SIG_PREFIX = "\u2014 "
_MAX_TIMESTAMP = (1 << 63) - 1


def _key_id(name: str, public: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([_ALG_COSIGNATURE_V1]) + public).digest()[:4]


def _message(body: str, timestamp: int) -> bytes:
    return f"cosignature/v1\ntime {timestamp}\n{body}".encode()


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or "+" in name or any(ch.isspace() for ch in name):
        raise ValueError("a cosigner name must be non-empty, without spaces or '+'")


def split_note(note: str) -> tuple[str, list[str]]:
    """``(body, signature lines)`` of a signed note; :class:`VerificationError` if it is not one."""
    split = note.rfind("\n\n") if isinstance(note, str) else -1
    if split < 0 or not note.endswith("\n"):
        raise VerificationError("not a signed note")
    lines = note[split + 2 :].split("\n")[:-1]
    if not lines or not all(line.startswith(_SIG_PREFIX) for line in lines):
        raise VerificationError("malformed signature block")
    return note[: split + 1], lines


def cosigner_verifier_key(name: str, key: Ed25519PrivateKey) -> str:
    """``<name>+<hex key ID>+<base64(0x04 || public key)>`` for a cosigner's key."""
    _check_name(name)
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    encoded = base64.b64encode(bytes([_ALG_COSIGNATURE_V1]) + public).decode()
    return f"{name}+{_key_id(name, public).hex()}+{encoded}"


def cosignature_line(name: str, key: Ed25519PrivateKey, body: str, timestamp: int) -> str:
    """The signature line (with its newline) cosigning the checkpoint ``body`` at ``timestamp``."""
    _check_name(name)
    if isinstance(timestamp, bool) or not isinstance(timestamp, int) or not 0 <= timestamp <= _MAX_TIMESTAMP:
        raise ValueError("timestamp out of range")
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    raw = _key_id(name, public) + struct.pack(">Q", timestamp) + key.sign(_message(body, timestamp))
    return f"{_SIG_PREFIX}{name} {base64.b64encode(raw).decode()}\n"


@dataclass(frozen=True)
class Cosignature:
    """A verified cosignature: which cosigner, when, and its signature line verbatim (no newline)."""

    name: str
    timestamp: int
    line: str


class CosignatureVerifier:
    """Verifies one cosigner's cosignatures; built from its verifier key (``ValueError`` if malformed)."""

    def __init__(self, verifier_key: str) -> None:
        parts = verifier_key.split("+", 2) if isinstance(verifier_key, str) else []
        if len(parts) != 3 or not re.fullmatch(r"[0-9a-f]{8}", parts[1]):
            raise ValueError("a cosigner verifier key has the form <name>+<8 hex key id>+<base64 key>")
        name, key_id_hex, encoded = parts
        _check_name(name)
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("the cosigner key is not base64") from None
        if len(raw) != 33 or raw[0] != _ALG_COSIGNATURE_V1:
            raise ValueError("only Ed25519 cosignature/v1 keys (type 0x04) are accepted")
        if _key_id(name, raw[1:]).hex() != key_id_hex:
            raise ValueError("the key ID does not match the cosigner name and key")
        self.name = name
        self.key_id = bytes.fromhex(key_id_hex)
        self._public = Ed25519PublicKey.from_public_bytes(raw[1:])

    def verify(self, note: str) -> Cosignature:
        """This cosigner's cosignature on ``note``; :class:`VerificationError` if absent or invalid."""
        body, lines = split_note(note)
        for line in lines:
            name, _, encoded = line[len(_SIG_PREFIX) :].partition(" ")
            if name != self.name:
                continue
            try:
                raw = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise VerificationError(f"cosignature by {name} is not base64") from None
            if len(raw) != 4 + 8 + 64 or raw[:4] != self.key_id:
                continue  # another key of the same name, or another signature type (the log's own)
            (timestamp,) = struct.unpack(">Q", raw[4:12])
            if timestamp > _MAX_TIMESTAMP:
                raise VerificationError("cosignature timestamp out of range")
            try:
                self._public.verify(raw[12:], _message(body, timestamp))
            except InvalidSignature:
                raise VerificationError(f"invalid cosignature by {self.name}") from None
            return Cosignature(self.name, timestamp, line)
        raise VerificationError(f"note has no cosignature by {self.name}+{self.key_id.hex()}")
