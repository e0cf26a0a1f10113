"""X.509-SVID verification (SPIFFE X509-SVID.md) and the RFC 8705 certificate thumbprint.

A workload presents its X.509-SVID over mutual TLS, or a trusted proxy forwards the certificate it
verified (Envoy's ``x-forwarded-client-cert``, see :mod:`broker.attest.xfcc`). Either way the broker
verifies the chain itself, against the trust domain's X.509 bundle, and only then trusts the SPIFFE
ID. :func:`verify_x509_svid` returns a :class:`VerifiedX509Svid` or raises
:class:`~broker.errors.AttestationError`; nothing else builds one.

Checks, in order (each failure names what is wrong, never the certificate bytes):

1. the leaf carries exactly one URI SAN, and it is a valid SPIFFE ID (X509-SVID.md §2);
2. the leaf is not a CA: ``basicConstraints`` present with ``cA`` false (§4.1); ``keyUsage`` present,
   with ``digitalSignature`` set and neither ``keyCertSign`` nor ``cRLSign`` (§4.3);
3. the SPIFFE ID's trust domain has a bundle (§5: a bundle is per trust domain, never shared);
4. the chain verifies to one of that bundle's roots at ``now`` (RFC 5280 path validation by
   ``cryptography``'s verifier: signatures, validity periods, CA constraints of every signing cert).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from broker.attest.spiffe import SpiffeId, parse_spiffe_id
from broker.errors import AttestationError

__all__ = ["VerifiedX509Svid", "certificate_thumbprint", "load_pem_chain", "verify_x509_svid"]

MAX_CHAIN_LENGTH = 8  # leaf + intermediates a client may present


@dataclass(frozen=True, slots=True)
class VerifiedX509Svid:
    """An X.509-SVID whose chain verified to its trust domain's bundle. Built only by the verifier.

    ``x5t_s256`` is the RFC 8705 §3.1 thumbprint (base64url SHA-256 of the leaf's DER), for a
    certificate-bound token's ``cnf``; ``evidence_digest`` is ``sha256:<hex>`` of the same bytes.
    """

    spiffe_id: str
    trust_domain: str
    x5t_s256: str
    evidence_digest: str
    not_after: int


def certificate_thumbprint(certificate: x509.Certificate) -> str:
    """RFC 8705 §3.1 ``x5t#S256``: base64url (no padding) of SHA-256 over the certificate's DER."""
    digest = hashlib.sha256(certificate.public_bytes(Encoding.DER)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def load_pem_chain(pem: bytes) -> list[x509.Certificate]:
    """Certificates of a PEM bundle, in order; :class:`AttestationError` if none or malformed."""
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise AttestationError("the certificate chain is not valid PEM") from None
    if not certificates:
        raise AttestationError("no certificate was presented")
    if len(certificates) > MAX_CHAIN_LENGTH:
        raise AttestationError(f"the certificate chain is longer than {MAX_CHAIN_LENGTH}")
    return certificates


def _spiffe_id_of(leaf: x509.Certificate) -> SpiffeId:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise AttestationError("the certificate has no URI SAN (an X.509-SVID has exactly one)") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise AttestationError(f"the certificate has {len(uris)} URI SANs; an X.509-SVID has exactly one")
    try:
        parsed = parse_spiffe_id(uris[0])
    except ValueError as exc:
        raise AttestationError(f"the URI SAN is not a SPIFFE ID: {exc}") from None
    if not parsed.path:
        raise AttestationError("the URI SAN names a trust domain, not a workload")
    return parsed


def _check_leaf_profile(leaf: x509.Certificate) -> None:
    try:
        constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise AttestationError("the leaf certificate has no basicConstraints (an SVID must say cA=false)") from None
    if constraints.ca:
        raise AttestationError("the leaf certificate is a CA; an X.509-SVID leaf must not be")
    try:
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise AttestationError("the leaf certificate has no keyUsage (an SVID must set digitalSignature)") from None
    if not usage.digital_signature:
        raise AttestationError("the leaf certificate's keyUsage lacks digitalSignature")
    if usage.key_cert_sign or usage.crl_sign:
        raise AttestationError("the leaf certificate's keyUsage allows signing certificates or CRLs")


def verify_x509_svid(
    chain: Sequence[x509.Certificate],
    bundles: Mapping[str, Sequence[x509.Certificate]],
    now: float,
) -> VerifiedX509Svid:
    """Verify ``chain`` (leaf first, then intermediates) as an X.509-SVID; see the module docstring.

    ``bundles`` maps a trust domain name to its root certificates; ``now`` is seconds since the epoch.
    """
    if not chain:
        raise AttestationError("no certificate was presented")
    if len(chain) > MAX_CHAIN_LENGTH:
        raise AttestationError(f"the certificate chain is longer than {MAX_CHAIN_LENGTH}")
    leaf, intermediates = chain[0], list(chain[1:])
    # (1) exactly one URI SAN, a SPIFFE ID.
    parsed = _spiffe_id_of(leaf)
    # (2) a leaf, not a signing certificate.
    _check_leaf_profile(leaf)
    # (3) the bundle of the ID's own trust domain, and no other.
    trust_domain = parsed.trust_domain
    roots = bundles.get(trust_domain)
    if not roots:
        raise AttestationError(f"trust domain {trust_domain!r} has no configured X.509 bundle")
    # (4) path validation to one of those roots, at the broker's time.
    at = dt.datetime.fromtimestamp(now, tz=dt.UTC)
    verifier = PolicyBuilder().store(Store(list(roots))).time(at).max_chain_depth(MAX_CHAIN_LENGTH)
    try:
        verifier.build_client_verifier().verify(leaf, intermediates)
    except VerificationError as exc:
        raise AttestationError(f"the certificate chain does not verify to the {trust_domain!r} bundle: {exc}") \
            from None
    der = leaf.public_bytes(Encoding.DER)
    return VerifiedX509Svid(
        spiffe_id=str(parsed),
        trust_domain=trust_domain,
        x5t_s256=certificate_thumbprint(leaf),
        evidence_digest="sha256:" + hashlib.sha256(der).hexdigest(),
        not_after=int(leaf.not_valid_after_utc.timestamp()),
    )
