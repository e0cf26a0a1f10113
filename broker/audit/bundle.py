"""Export bundles: one self-contained file for offline audit (docs/ledger.md §Export bundle).

The file is UTF-8 text. Line 1 is a JSON header::

    {"format": "nhi-broker-ledger-bundle", "version": 1, "origin": ..., "size": N,
     "checkpoint": "<signed note>", "verifier_key": "<name>+<keyid>+<base64>"}

then one line per entry, in index order: ``<index> <leaf hash, 64 hex> <base64 of the leaf>``.
The verifier key in the header says which key the exporter saw; an auditor still passes the key
it trusts out of band, and a mismatch is reported. :class:`BundleLedgerSource` reads a bundle as
an untrusted :class:`~broker.audit.source.LedgerSource`.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from broker.audit.errors import AuditFailure, SourceUnavailable
from broker.audit.source import RawEntry
from broker.ledger.merkle import MerkleTree, leaf_hash

__all__ = ["BUNDLE_FORMAT", "BundleLedgerSource", "write_bundle"]

BUNDLE_FORMAT = "nhi-broker-ledger-bundle"
BUNDLE_VERSION = 1
_HEX64 = re.compile(rb"[0-9a-f]{64}")
_MAX_HEADER = 1 << 20


def write_bundle(path: Path, *, origin: str, checkpoint: str, size: int, verifier_key: str,
                 leaves: Iterable[bytes]) -> int:
    """Write a bundle of the first ``size`` leaves atomically (temp file, fsync, rename); entries written."""
    header = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "origin": origin, "size": size,
              "checkpoint": checkpoint, "verifier_key": verifier_key}
    tmp = path.with_name(path.name + ".partial")
    written = 0
    with open(tmp, "wb") as out:
        out.write(json.dumps(header, ensure_ascii=True, separators=(",", ":")).encode() + b"\n")
        for leaf in leaves:
            if written == size:
                break
            out.write(b"%d %s %s\n" % (written, leaf_hash(leaf).hex().encode(), base64.b64encode(leaf)))
            written += 1
        out.flush()
        os.fsync(out.fileno())
    if written != size:
        tmp.unlink()
        raise SourceUnavailable(f"the source ended after {written} of {size} entries; no bundle written")
    os.replace(tmp, path)
    return written


class BundleLedgerSource:
    """A bundle file as a :class:`~broker.audit.source.LedgerSource` (nothing in it is trusted)."""

    def __init__(self, path: Path | str) -> None:
        self._path = Path(path)
        try:
            with open(self._path, "rb") as f:
                first = f.readline(_MAX_HEADER)
                self._body_offset = f.tell()
        except OSError as exc:
            raise SourceUnavailable(f"cannot read bundle {self._path}: {exc.strerror}") from None
        self._header = self._parse_header(first)
        self._tree: MerkleTree | None = None
        self._by_hash: dict[bytes, int] = {}
        self._offsets: list[int] = []

    def _parse_header(self, line: bytes) -> dict[str, Any]:
        try:
            header = json.loads(line)
        except ValueError:
            raise SourceUnavailable(f"{self._path} is not a ledger bundle (no JSON header line)") from None
        if not isinstance(header, dict) or header.get("format") != BUNDLE_FORMAT:
            raise SourceUnavailable(f"{self._path} is not a ledger bundle (format is not {BUNDLE_FORMAT!r})")
        if header.get("version") != BUNDLE_VERSION:
            raise SourceUnavailable(f"{self._path}: unsupported bundle version {header.get('version')!r}")
        for name in ("checkpoint", "verifier_key", "origin"):
            if not isinstance(header.get(name), str):
                raise SourceUnavailable(f"{self._path}: header member {name!r} is missing or not a string")
        return header

    @property
    def description(self) -> str:
        return str(self._path)

    @property
    def stated_verifier_key(self) -> str:
        """The verifier key the exporter wrote; informative only, never a trust anchor."""
        return str(self._header["verifier_key"])

    def checkpoint(self) -> str:
        return str(self._header["checkpoint"])

    def _signed_size(self) -> int:
        """The tree size the (still unverified) checkpoint states; rows beyond it are refused."""
        lines = self.checkpoint().split("\n")
        return int(lines[1]) if len(lines) > 2 and lines[1].isdigit() and len(lines[1]) < 20 else 0

    def _lines(self, f: IO[bytes], start: int) -> Iterator[tuple[int, bytes]]:
        """``(offset, line)`` of entry lines from ``start``, reading sequentially."""
        offset = f.seek(self._offsets[start] if start < len(self._offsets) else self._body_offset)
        position = start if start < len(self._offsets) else 0
        while True:
            line = f.readline()
            if not line:
                return
            if position >= start:
                yield offset, line
            offset += len(line)  # not f.tell(): a system call per line
            position += 1

    @staticmethod
    def _parse_line(index: int, line: bytes) -> RawEntry:
        parts = line.rstrip(b"\n").split(b" ")
        if len(parts) != 3 or not line.endswith(b"\n"):
            raise AuditFailure("bundle line is not '<index> <leaf hash> <base64 leaf>'", index=index)
        number, recorded, encoded = parts
        if number != str(index).encode():
            raise AuditFailure(f"bundle line is labelled {number[:20]!r}, expected {index}", index=index)
        if not _HEX64.fullmatch(recorded):
            raise AuditFailure("bundle leaf hash is not 64 lower-case hex digits", index=index)
        try:
            leaf = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise AuditFailure("bundle leaf is not valid base64", index=index) from None
        return RawEntry(index, leaf, bytes.fromhex(recorded.decode()))

    def entries(self, start: int, end: int) -> Iterator[RawEntry]:
        index = start
        if index >= end:
            return
        signed = self._signed_size()
        try:
            with open(self._path, "rb") as f:
                lines = self._lines(f, start)
                for _, line in lines:
                    yield self._parse_line(index, line)
                    index += 1
                    if index == end:
                        if end >= signed and next(lines, None) is not None:
                            # Nothing after the signed tree is vouched for: rows there are an
                            # error, never silently ignored.
                            raise AuditFailure(f"the bundle holds rows after the signed size of {signed} "
                                               "entries", index=end)
                        return
        except OSError as exc:
            raise SourceUnavailable(f"cannot read bundle {self._path}: {exc.strerror}") from None
        raise AuditFailure(f"the bundle ends after {index} entries", index=index)

    def _build_index(self) -> MerkleTree:
        """Hash every leaf once, for proofs and look-ups by hash (bundles carry no proofs)."""
        if self._tree is None:
            tree = MerkleTree()
            by_hash: dict[bytes, int] = {}
            offsets: list[int] = []
            try:
                with open(self._path, "rb") as f:
                    hashes = []
                    for offset, line in self._lines(f, 0):
                        raw = self._parse_line(len(offsets), line)
                        offsets.append(offset)
                        digest = leaf_hash(raw.leaf)
                        by_hash.setdefault(digest, raw.index)
                        hashes.append(digest)
                    tree.extend(hashes)
            except OSError as exc:
                raise SourceUnavailable(f"cannot read bundle {self._path}: {exc.strerror}") from None
            self._tree, self._by_hash, self._offsets = tree, by_hash, offsets
        return self._tree

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        # Derived from the bundle's own leaves: still sound, since it is verified against signed roots.
        tree = self._build_index()
        if not 0 <= first <= second <= tree.size:
            raise SourceUnavailable(f"the bundle holds no tree of size {second}")
        return tree.consistency_proof(first, second)

    def inclusion_proof(self, index: int, tree_size: int) -> list[bytes]:
        tree = self._build_index()
        if not 0 <= index < tree_size <= tree.size:
            raise SourceUnavailable(f"the bundle holds no entry {index} in a tree of size {tree_size}")
        return tree.inclusion_proof(index, tree_size)

    def find(self, leaf_hash: bytes, tree_size: int) -> int | None:
        self._build_index()
        index = self._by_hash.get(leaf_hash)
        return index if index is not None and index < tree_size else None

    def close(self) -> None:
        """Nothing to release: files are opened per call."""
