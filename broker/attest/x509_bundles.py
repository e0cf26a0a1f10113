"""Trust domains' X.509 bundles (root certificates), read from PEM files and reloaded when they change.

SPIRE rotates its X.509 CA and publishes the new bundle before it signs with it; an operator (or a
sidecar) writes the new PEM file, and the broker must follow without a restart. :meth:`refresh`
re-reads a file whose size or modification time changed; a file that no longer parses keeps the
previous bundle in force (and says so), so a half-written file never empties a trust domain.
:meth:`refresh` reads files: call it from a worker thread, never on the event loop.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from cryptography import x509

from broker.attest.spiffe import validate_trust_domain

__all__ = ["X509Bundles"]

log = logging.getLogger("nhi_broker.attest")


class X509Bundles:
    """Root certificates per trust domain, from one PEM file each.

    ``files`` maps a trust domain name to its bundle file. The constructor loads every file and
    raises :class:`ValueError` naming the first one that is missing, empty or not PEM.
    """

    def __init__(self, files: Mapping[str, Path]) -> None:
        self._files = {validate_trust_domain(td): Path(path) for td, path in files.items()}
        self._stamps: dict[str, tuple[int, int]] = {}
        roots: dict[str, tuple[x509.Certificate, ...]] = {}
        for trust_domain, path in self._files.items():
            roots[trust_domain], self._stamps[trust_domain] = self._read(trust_domain, path)
        self._roots: Mapping[str, tuple[x509.Certificate, ...]] = MappingProxyType(roots)

    @property
    def roots(self) -> Mapping[str, tuple[x509.Certificate, ...]]:
        """The bundles in force: an immutable snapshot, replaced whole by :meth:`refresh`."""
        return self._roots

    def refresh(self) -> list[str]:
        """Reload changed files; the trust domains whose bundle changed."""
        changed: dict[str, tuple[x509.Certificate, ...]] = {}
        for trust_domain, path in self._files.items():
            try:
                stat = path.stat()
            except OSError as exc:
                log.error("X.509 bundle of %s unreadable (%s); keeping the previous one", trust_domain, exc)
                continue
            if (stat.st_mtime_ns, stat.st_size) == self._stamps.get(trust_domain):
                continue
            try:
                certificates, stamp = self._read(trust_domain, path)
            except ValueError as exc:
                log.error("%s; keeping the previous bundle of %s", exc, trust_domain)
                continue
            self._stamps[trust_domain] = stamp
            if certificates != self._roots.get(trust_domain):
                changed[trust_domain] = certificates
        if changed:
            self._roots = MappingProxyType({**self._roots, **changed})
            log.info("X.509 bundles reloaded: %s", ", ".join(sorted(changed)))
        return sorted(changed)

    @staticmethod
    def _read(trust_domain: str, path: Path) -> tuple[tuple[x509.Certificate, ...], tuple[int, int]]:
        try:
            with path.open("rb") as f:
                stat = os.fstat(f.fileno())
                data = f.read()
        except OSError as exc:
            raise ValueError(f"X.509 bundle of {trust_domain} ({path}) cannot be read: {exc.strerror}") from None
        try:
            certificates = tuple(x509.load_pem_x509_certificates(data))
        except ValueError:
            raise ValueError(f"X.509 bundle of {trust_domain} ({path}) is not PEM certificates") from None
        if not certificates:
            raise ValueError(f"X.509 bundle of {trust_domain} ({path}) holds no certificate")
        return certificates, (stat.st_mtime_ns, stat.st_size)
