"""Mutual TLS terminated by the broker itself (RFC 8705 §2), and the peer certificate handed to the app.

uvicorn does not expose the client certificate to an ASGI app. :func:`peer_cert_protocol` builds an
HTTP protocol class (passed to uvicorn as ``http=``) that, per connection, reads the peer's verified
certificate from the SSL object and adds it to every request's scope as the ASGI TLS extension
(``scope["extensions"]["tls"]["client_cert_chain"]``, PEM strings, leaf first).

**Which chain the app sees.** Python 3.13 gives the chain the peer sent
(``SSLObject.get_unverified_chain``); the app then verifies that whole chain itself. Python 3.11 and
3.12 give the leaf only, so the app verifies the leaf directly against the trust domain's bundle:
with broker-terminated TLS on those versions an SVID must be signed by a bundle root (SPIRE's
default without an upstream authority); SVIDs under intermediate CAs need 3.13, or a proxy that
forwards the chain (``x-forwarded-client-cert``). The TLS layer is only a first gate; the SPIFFE checks
and the trust domain's own bundle are applied by the ``x509-svid`` method on every request.

The TLS layer trusts the union of the ``[x509]`` bundles. When a bundle file changes, the app's
refresher adds the new roots to the live context (:meth:`ServerTls.add_roots`), so rotated CAs are
accepted without a restart; a removed root stays in the TLS layer until restart but is refused by the
method, which only trusts the current bundle of the SVID's own trust domain.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ServerTls", "TlsSettings", "peer_cert_protocol", "peer_chain"]


class TlsSettings(BaseModel):
    """``[tls]``: the broker's certificate and whether clients must present one."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cert_file: Path = Field(description="PEM certificate chain of the broker (leaf first).")
    key_file: Path = Field(description="PEM private key of the broker's certificate.")
    client_certificates: Literal["optional", "required"] = Field(
        "optional", description="optional: JWT methods still work over the same port; required: mTLS only."
    )


class ServerTls:
    """The server's SSL context, built from :class:`TlsSettings` and the trust bundles' roots."""

    def __init__(self, settings: TlsSettings, roots: Mapping[str, Iterable[x509.Certificate]] | None) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(settings.cert_file), str(settings.key_file))
        self._known: set[bytes] = set()
        if roots:
            context.verify_mode = ssl.CERT_REQUIRED if settings.client_certificates == "required" else ssl.CERT_OPTIONAL
        self.context = context
        self.add_roots(roots or {})

    def add_roots(self, roots: Mapping[str, Iterable[x509.Certificate]]) -> int:
        """Trust roots not yet known to the TLS layer (new handshakes see them); how many were added."""
        added = 0
        for certificates in roots.values():
            for certificate in certificates:
                der = certificate.public_bytes(Encoding.DER)
                if der not in self._known:
                    self.context.load_verify_locations(cadata=der)
                    self._known.add(der)
                    added += 1
        return added


def _tls_extension(transport: Any) -> dict[str, Any] | None:
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    chain: list[str] = []
    unverified = getattr(ssl_object, "get_unverified_chain", None)  # Python 3.13+
    if unverified is not None:
        # DER bytes, leaf first (the Python wrapper converts the C-level certificates).
        chain = [ssl.DER_cert_to_PEM_cert(der) for der in (unverified() or []) if isinstance(der, bytes)]
    if not chain:
        der = ssl_object.getpeercert(binary_form=True)
        if der:
            chain = [ssl.DER_cert_to_PEM_cert(der)]
    return {
        "server_cert": None,
        "client_cert_chain": chain,
        "client_cert_name": None,
        "client_cert_error": None,
        "tls_version": {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}.get(ssl_object.version() or ""),
        "cipher_suite": None,
    }


def peer_cert_protocol(base: type[Any]) -> type[Any]:
    """A subclass of uvicorn's HTTP protocol ``base`` that adds the ASGI TLS extension to each scope."""

    class PeerCertProtocol(base):  # type: ignore[misc]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            extension = _tls_extension(transport)
            if extension is None:
                return
            app: Any = getattr(self, "app")  # noqa: B009  (uvicorn's protocol sets it; untyped here)

            async def with_tls(scope: Any, receive: Any, send: Any) -> None:
                if scope.get("type") == "http":
                    scope = {**scope, "extensions": {**(scope.get("extensions") or {}), "tls": extension}}
                await app(scope, receive, send)

            self.app = with_tls

    PeerCertProtocol.__name__ = f"PeerCert{base.__name__}"
    return PeerCertProtocol


def peer_chain(scope: Mapping[str, Any]) -> tuple[bytes, ...]:
    """The DER certificates of the mutual-TLS peer of a request (leaf first), from the ASGI TLS extension."""
    extension = (scope.get("extensions") or {}).get("tls") or {}
    chain = extension.get("client_cert_chain") or ()
    out = []
    for pem in chain:
        try:
            out.append(ssl.PEM_cert_to_DER_cert(pem))
        except ValueError:
            return ()
    return tuple(out)
