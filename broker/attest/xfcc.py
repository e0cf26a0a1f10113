"""Envoy's ``x-forwarded-client-cert`` (XFCC) header: the client certificate a trusted proxy verified.

Only a proxy the broker is configured to trust may speak for a client (the caller checks the peer
address before calling :func:`forwarded_certificate_chain`); anyone else can write the header. The
grammar is Envoy's: elements separated by ``,`` (one per proxy hop), each a ``;``-separated list of
``Key=Value`` pairs, a value double-quoted when it holds ``,``, ``;`` or ``=`` (``\\"`` escapes a quote).
``Cert`` is the URL-encoded PEM of the client's leaf, ``Chain`` the URL-encoded PEM of leaf and
intermediates. The broker accepts exactly one element: a header that went through several hops is
refused rather than guessed at.
"""

from __future__ import annotations

from urllib.parse import unquote

from cryptography import x509

from broker.attest.x509_svid import load_pem_chain
from broker.errors import AttestationError

__all__ = ["MAX_XFCC_BYTES", "forwarded_certificate_chain", "parse_xfcc"]

MAX_XFCC_BYTES = 32_768
_KNOWN_KEYS = frozenset({"By", "Hash", "Cert", "Chain", "Subject", "URI", "DNS"})


def parse_xfcc(header: str) -> list[dict[str, str]]:
    """Split an XFCC header into its elements; :class:`AttestationError` naming the first fault."""
    if len(header) > MAX_XFCC_BYTES:
        raise AttestationError(f"x-forwarded-client-cert is longer than {MAX_XFCC_BYTES} bytes")
    elements: list[dict[str, str]] = []
    element: dict[str, str] = {}
    key: list[str] = []
    value: list[str] = []
    in_value = quoted = False
    i = 0

    def finish_pair() -> None:
        name = "".join(key).strip()
        if not name:
            raise AttestationError("x-forwarded-client-cert has an empty key")
        if name not in _KNOWN_KEYS:
            raise AttestationError(f"x-forwarded-client-cert has an unknown key {name!r}")
        if name in element and name not in ("URI", "DNS"):
            raise AttestationError(f"x-forwarded-client-cert repeats {name!r} in one element")
        element[name] = "".join(value)
        key.clear()
        value.clear()

    while i < len(header):
        ch = header[i]
        if quoted:
            if ch == "\\" and i + 1 < len(header) and header[i + 1] == '"':
                value.append('"')
                i += 1
            elif ch == '"':
                quoted = False
            else:
                value.append(ch)
        elif not in_value:
            if ch == "=":
                in_value = True
            elif ch in ",;":
                raise AttestationError("x-forwarded-client-cert has a pair without '='")
            else:
                key.append(ch)
        elif ch == '"' and not value:
            quoted = True
        elif ch in ";,":
            finish_pair()
            in_value = False
            if ch == ",":
                elements.append(element)
                element = {}
        else:
            value.append(ch)
        i += 1
    if quoted:
        raise AttestationError("x-forwarded-client-cert has an unterminated quoted value")
    if in_value:
        finish_pair()
    elif key and "".join(key).strip():
        raise AttestationError("x-forwarded-client-cert has a pair without '='")
    if element:
        elements.append(element)
    if not elements:
        raise AttestationError("x-forwarded-client-cert is empty")
    return elements


def forwarded_certificate_chain(header: str) -> list[x509.Certificate]:
    """The client's certificate chain (leaf first) from a trusted proxy's XFCC header."""
    elements = parse_xfcc(header)
    if len(elements) != 1:
        raise AttestationError(
            f"x-forwarded-client-cert has {len(elements)} elements; configure the proxy to sanitize and set it"
        )
    (element,) = elements
    pem = element.get("Chain") or element.get("Cert")
    if not pem:
        raise AttestationError("x-forwarded-client-cert carries no Cert or Chain")
    chain = load_pem_chain(unquote(pem).encode("ascii", "replace"))
    if "Cert" in element and "Chain" in element:
        # Both present: the leaf of Chain must be Cert, or the proxy forwarded two different clients.
        leaf = load_pem_chain(unquote(element["Cert"]).encode("ascii", "replace"))[0]
        if leaf != chain[0]:
            raise AttestationError("x-forwarded-client-cert's Cert is not the first certificate of its Chain")
    return chain
