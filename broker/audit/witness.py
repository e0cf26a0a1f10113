"""Witness cosignatures in the C2SP ``tlog-cosignature`` v1 format (Ed25519, signature type 0x04).

A cosignature line is ``— <witness name> base64(key ID || timestamp || signature)`` where the key
ID is ``SHA-256(name || "\\n" || 0x04 || public key)[:4]``, the timestamp a big-endian uint64 of
POSIX seconds, and the Ed25519 signature covers::

    cosignature/v1
    time <timestamp>
    <the whole checkpoint body>

It states that, at that time, this is the largest tree the witness saw *consistent* with every
earlier one. :class:`WitnessSigner` therefore only signs a
:class:`~broker.audit.monitor.ConsistentCheckpoint`.
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

from broker.audit.monitor import ConsistentCheckpoint
from broker.errors import VerificationError

__all__ = ["Cosignature", "WitnessSigner", "WitnessVerifier", "split_note"]

_ALG_COSIGNATURE_V1 = 0x04
_SIG_PREFIX = "\u2014 "
_MAX_TIMESTAMP = (1 << 63) - 1


def _key_id(name: str, public: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([_ALG_COSIGNATURE_V1]) + public).digest()[:4]


def _message(body: str, timestamp: int) -> bytes:
    return f"cosignature/v1\ntime {timestamp}\n{body}".encode()


def _check_name(name: str) -> None:
    if not name or "+" in name or any(ch.isspace() for ch in name):
        raise ValueError("a witness name must be non-empty, without spaces or '+'")


def split_note(note: str) -> tuple[str, list[str]]:
    """``(body, signature lines)`` of a signed note; :class:`VerificationError` if it is not one."""
    split = note.rfind("\n\n")
    if split < 0 or not note.endswith("\n"):
        raise VerificationError("not a signed note")
    lines = note[split + 2 :].split("\n")[:-1]
    if not lines or not all(line.startswith(_SIG_PREFIX) for line in lines):
        raise VerificationError("malformed signature block")
    return note[: split + 1], lines


class WitnessSigner:
    """A witness's Ed25519 key, named; signs cosignatures over verified-consistent checkpoints."""

    def __init__(self, name: str, key: Ed25519PrivateKey) -> None:
        _check_name(name)
        self.name = name
        self._key = key
        self._public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.key_id = _key_id(name, self._public)

    @property
    def verifier_key(self) -> str:
        """``<name>+<hex key ID>+<base64(0x04 || public key)>``, the vkey logs and clients configure."""
        encoded = base64.b64encode(bytes([_ALG_COSIGNATURE_V1]) + self._public).decode()
        return f"{self.name}+{self.key_id.hex()}+{encoded}"

    def cosign(self, consistent: ConsistentCheckpoint, timestamp: int) -> str:
        """The checkpoint note with this witness's cosignature line appended."""
        if not 0 <= timestamp <= _MAX_TIMESTAMP:
            raise ValueError("timestamp out of range")
        body, _ = split_note(consistent.note)
        signature = self._key.sign(_message(body, timestamp))
        raw = self.key_id + struct.pack(">Q", timestamp) + signature
        return consistent.note + f"{_SIG_PREFIX}{self.name} {base64.b64encode(raw).decode()}\n"


@dataclass(frozen=True)
class Cosignature:
    """A verified cosignature: which witness, when, and its signature line verbatim."""

    name: str
    timestamp: int
    line: str


class WitnessVerifier:
    """Verifies one witness's cosignatures; built from its verifier key."""

    def __init__(self, verifier_key: str) -> None:
        parts = verifier_key.split("+", 2) if isinstance(verifier_key, str) else []
        if len(parts) != 3 or not re.fullmatch(r"[0-9a-f]{8}", parts[1]):
            raise ValueError("a witness verifier key has the form <name>+<8 hex key id>+<base64 key>")
        name, key_id_hex, encoded = parts
        _check_name(name)
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("the witness key is not base64") from None
        if len(raw) != 33 or raw[0] != _ALG_COSIGNATURE_V1:
            raise ValueError("only Ed25519 cosignature/v1 keys (type 0x04) are accepted")
        if _key_id(name, raw[1:]).hex() != key_id_hex:
            raise ValueError("the key ID does not match the witness name and key")
        self.name = name
        self.key_id = bytes.fromhex(key_id_hex)
        self._public = Ed25519PublicKey.from_public_bytes(raw[1:])

    def verify(self, note: str) -> Cosignature:
        """This witness's cosignature on ``note``; :class:`VerificationError` if absent or invalid."""
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
                continue  # another key of the same name, or another signature type
            (timestamp,) = struct.unpack(">Q", raw[4:12])
            if timestamp > _MAX_TIMESTAMP:
                raise VerificationError("cosignature timestamp out of range")
            try:
                self._public.verify(raw[12:], _message(body, timestamp))
            except InvalidSignature:
                raise VerificationError(f"invalid cosignature by {self.name}") from None
            return Cosignature(self.name, timestamp, line)
        raise VerificationError(f"note has no cosignature by {self.name}+{self.key_id.hex()}")
