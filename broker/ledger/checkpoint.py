"""Tree heads as C2SP ``tlog-checkpoint`` bodies inside C2SP ``signed-note`` envelopes (Ed25519).

A note is its text, a blank line, then signature lines ``— <key name> <base64(key ID || sig)>``
(signed-note §Format). The key ID of an Ed25519 key is the first four bytes of
``SHA-256(name || 0x0A || 0x01 || public key)`` (signed-note §Ed25519 signatures), and a verifier
key is printed as ``<name>+<8 hex key ID>+<base64(0x01 || public key)>``, the form the Go
``golang.org/x/mod/sumdb/note`` package and every tlog tool read.

A checkpoint's text is ``<origin>\\n<tree size>\\n<base64 root>\\n`` plus optional extension
lines (tlog-checkpoint §Note text). The only way to get a :class:`Checkpoint` from a note is
:func:`verify_checkpoint`, which checks the signature before it reads a single field.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from broker.errors import VerificationError

__all__ = [
    "Checkpoint",
    "NoteSigner",
    "NoteVerifier",
    "sign_checkpoint",
    "verify_checkpoint",
]

_ALG_ED25519 = 0x01  # signed-note §Signature types
_SIG_PREFIX = "\u2014 "  # em dash, space
_MAX_SIGNATURES = 100  # signed-note asks verifiers to cap this and to accept at least 16
_MAX_NOTE_BYTES = 1 << 20
_MAX_TREE_SIZE = (1 << 64) - 1  # tree sizes are uint64 in RFC 6962 and every tlog client
_SIZE_RE = re.compile(r"0|[1-9][0-9]*")  # tlog-checkpoint: ASCII decimal, no leading zeroes


def _check_name(name: str) -> None:
    """signed-note §Format: a key name is non-empty, without Unicode spaces or ``+``."""
    if not isinstance(name, str) or not name:
        raise ValueError("a key name must be a non-empty string")
    if "+" in name or any(ch.isspace() or ch < "\x20" for ch in name):
        raise ValueError("a key name must not contain spaces, control characters or '+'")


def _key_id(name: str, public_key: bytes) -> bytes:
    return hashlib.sha256(name.encode("utf-8") + b"\n" + bytes([_ALG_ED25519]) + public_key).digest()[:4]


def _b64decode(text: str) -> bytes:
    """Standard base64 (RFC 4648 §4) in its one canonical spelling; :class:`ValueError` otherwise.

    Lax decoders accept extra padding or stray trailing bits, which would give one key or
    signature several printed forms.
    """
    raw = base64.b64decode(text, validate=True)
    if base64.b64encode(raw).decode("ascii") != text:
        raise ValueError("non-canonical base64")
    return raw


def _check_text(text: str) -> None:
    # signed-note §Format: the text ends in a newline, and no control characters but newline.
    if not isinstance(text, str) or not text.endswith("\n"):
        raise ValueError("note text must be a string ending in a newline")
    if any(ch < "\x20" and ch != "\n" for ch in text):
        raise ValueError("note text must not contain control characters other than newline")


class NoteSigner:
    """Signs note texts with one named Ed25519 key (signature type 0x01).

    The key must not be the task-token signing key (DESIGN.md: Ledger); the broker loads it
    separately and injects it here.
    """

    def __init__(self, name: str, key: Ed25519PrivateKey) -> None:
        _check_name(name)
        if not isinstance(key, Ed25519PrivateKey):
            raise TypeError("a signed-note signer needs an Ed25519 private key")
        self._name = name
        self._key = key
        public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self._key_id = _key_id(name, public)
        self._verifier_key = "{}+{}+{}".format(
            name, self._key_id.hex(), base64.b64encode(bytes([_ALG_ED25519]) + public).decode("ascii")
        )

    @property
    def name(self) -> str:
        """The key name written on signature lines."""
        return self._name

    @property
    def key_id(self) -> bytes:
        """The 4-byte key ID (big-endian uint32)."""
        return self._key_id

    @property
    def verifier_key(self) -> str:
        """``<name>+<hex key ID>+<base64(0x01 || public key)>``: what auditors configure."""
        return self._verifier_key

    def sign(self, text: str) -> str:
        """The signed note: ``text``, a blank line and this key's signature line."""
        _check_text(text)
        signature = self._key.sign(text.encode("utf-8"))
        encoded = base64.b64encode(self._key_id + signature).decode("ascii")
        return f"{text}\n{_SIG_PREFIX}{self._name} {encoded}\n"


@dataclass(frozen=True, slots=True)
class _Signature:
    name: str
    key_id: bytes
    signature: bytes


def _parse_note(note: str) -> tuple[str, list[_Signature]]:
    """Split a note into its text and signature lines; nothing here is trusted yet."""
    if not isinstance(note, str):
        raise VerificationError("a signed note is text")
    if len(note.encode("utf-8", "surrogatepass")) > _MAX_NOTE_BYTES:
        raise VerificationError("signed note is too large")
    if any(ch < "\x20" and ch != "\n" for ch in note):
        raise VerificationError("signed note contains control characters")
    if any("\ud800" <= ch <= "\udfff" for ch in note):
        raise VerificationError("signed note is not valid UTF-8")
    if not note.endswith("\n"):
        raise VerificationError("signed note does not end in a newline")
    # The text is separated from the signatures by the *last* blank line.
    split = note.rfind("\n\n")
    if split < 0:
        raise VerificationError("signed note has no signature block")
    text, block = note[: split + 1], note[split + 2 :]
    lines = block.split("\n")[:-1]  # the block ends in "\n"
    if not lines:
        raise VerificationError("signed note has no signatures")
    if len(lines) > _MAX_SIGNATURES:
        raise VerificationError("signed note has too many signatures")
    signatures = []
    for line in lines:
        if not line.startswith(_SIG_PREFIX):
            raise VerificationError("malformed signature line in signed note")
        name, sep, encoded = line[len(_SIG_PREFIX) :].partition(" ")
        try:
            _check_name(name)
        except ValueError:
            raise VerificationError("malformed key name on a signature line") from None
        try:
            raw = _b64decode(encoded) if sep else b""
        except (binascii.Error, ValueError):
            raise VerificationError("signature is not valid base64") from None
        if len(raw) < 5:
            raise VerificationError("signature is too short")
        signatures.append(_Signature(name, raw[:4], raw[4:]))
    return text, signatures


class NoteVerifier:
    """Verifies notes signed by one known Ed25519 key. Built from a verifier key string."""

    def __init__(self, name: str, public_key: Ed25519PublicKey) -> None:
        _check_name(name)
        self._name = name
        self._public_key = public_key
        self._key_id = _key_id(name, public_key.public_bytes(Encoding.Raw, PublicFormat.Raw))

    @classmethod
    def from_verifier_key(cls, verifier_key: str) -> NoteVerifier:
        """Parse ``<name>+<hex key ID>+<base64(0x01 || key)>``; raises :class:`ValueError`."""
        if not isinstance(verifier_key, str):
            raise ValueError("a verifier key is a string")
        # At most two splits: the base64 key itself may contain '+'.
        parts = verifier_key.split("+", 2)
        if len(parts) != 3:
            raise ValueError("a verifier key has the form <name>+<key id>+<key>")
        name, key_id_hex, encoded = parts
        _check_name(name)
        if not re.fullmatch(r"[0-9a-f]{8}", key_id_hex):
            raise ValueError("the key ID of a verifier key is 8 lowercase hex digits")
        try:
            raw = _b64decode(encoded)
        except (binascii.Error, ValueError):
            raise ValueError("the key of a verifier key is not canonical base64") from None
        if len(raw) != 33 or raw[0] != _ALG_ED25519:
            raise ValueError("only Ed25519 verifier keys (type 0x01, 32 bytes) are accepted")
        verifier = cls(name, Ed25519PublicKey.from_public_bytes(raw[1:]))
        if verifier.key_id.hex() != key_id_hex:
            raise ValueError("the key ID of the verifier key does not match its name and key")
        return verifier

    @property
    def name(self) -> str:
        return self._name

    @property
    def key_id(self) -> bytes:
        return self._key_id

    @property
    def public_key_bytes(self) -> bytes:
        """The raw 32-byte Ed25519 public key."""
        return self._public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)

    def open(self, note: str) -> str:
        """Return the text of ``note`` once this key's signature on it verifies.

        Signatures by other keys are ignored (signed-note §Signatures: witnesses, key rotation),
        but every signature that names this key *and* key ID must verify, and there must be one.
        """
        text, signatures = _parse_note(note)
        message = text.encode("utf-8")
        verified = False
        for sig in signatures:
            if sig.name != self._name or sig.key_id != self._key_id:
                continue
            try:
                self._public_key.verify(sig.signature, message)
            except InvalidSignature:
                raise VerificationError(f"invalid signature by key {self._name}") from None
            verified = True
        if not verified:
            raise VerificationError(f"note is not signed by key {self._name}+{self._key_id.hex()}")
        return text


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A tree head: origin, tree size, RFC 6962 root hash and opaque extension lines."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def body(self) -> str:
        """The tlog-checkpoint note text."""
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode("ascii"), *self.extensions]
        return "".join(line + "\n" for line in lines)


def _parse_checkpoint_body(text: str) -> Checkpoint:
    lines = text.split("\n")[:-1]  # note text always ends in "\n"
    if len(lines) < 3:
        raise VerificationError("checkpoint has fewer than three lines")
    origin, size_text, root_text, *extensions = lines
    if not origin:
        raise VerificationError("checkpoint origin is empty")
    if not _SIZE_RE.fullmatch(size_text) or int(size_text) > _MAX_TREE_SIZE:
        raise VerificationError("checkpoint tree size is not a canonical decimal integer")
    try:
        root = _b64decode(root_text)
    except (binascii.Error, ValueError):
        raise VerificationError("checkpoint root hash is not canonical base64") from None
    if len(root) != 32:
        raise VerificationError("checkpoint root hash is not a SHA-256 hash")
    if any(not line for line in extensions):
        raise VerificationError("checkpoint has an empty extension line")
    return Checkpoint(origin, int(size_text), root, tuple(extensions))


def sign_checkpoint(signer: NoteSigner, origin: str, size: int, root: bytes) -> str:
    """The signed note for the tree head (``origin``, ``size``, ``root``)."""
    _check_name(origin)  # the SHOULD of tlog-checkpoint: no spaces, no '+'; we hold ourselves to it
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= _MAX_TREE_SIZE:
        raise ValueError("tree size must be an integer in the uint64 range")
    if not isinstance(root, bytes) or len(root) != 32:
        raise ValueError("root must be a 32-byte SHA-256 hash")
    return signer.sign(Checkpoint(origin, size, root).body())


def verify_checkpoint(note: str, verifier_key: str, expected_origin: str | None = None) -> Checkpoint:
    """Verify a signed checkpoint and return it; raise :class:`VerificationError` otherwise.

    ``expected_origin`` pins the log identity; pass it whenever you know which log you audit.
    """
    # (1) the trusted key, from configuration.
    try:
        verifier = NoteVerifier.from_verifier_key(verifier_key)
    except ValueError as exc:
        raise VerificationError(f"malformed verifier key: {exc}") from None
    # (2) the signature, before any field of the body is read.
    text = verifier.open(note)
    # (3) the body's syntax.
    checkpoint = _parse_checkpoint_body(text)
    # (4) the log identity.
    if expected_origin is not None and checkpoint.origin != expected_origin:
        raise VerificationError("checkpoint origin does not match the expected log")
    return checkpoint
