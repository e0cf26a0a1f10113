"""A tiny certificate authority for X.509-SVID tests: roots, intermediates and leaves with chosen defects."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = 1_790_000_000.0


def _usage(*, sign: bool = True, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=sign, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
                         encipher_only=False, decipher_only=False)


@dataclass
class Authority:
    """A CA certificate and its key."""

    name: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)

    @classmethod
    def root(cls, trust_domain: str) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"{trust_domain} root")])
        cert = (_builder(name, name, key, key, ca=True, uris=[f"spiffe://{trust_domain}"])
                .sign(key, hashes.SHA256()))
        return cls(trust_domain, cert, key)

    def intermediate(self, *, ca: bool = True) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"{self.name} intermediate")])
        cert = _builder(name, self.cert.subject, key, self.key, ca=ca).sign(self.key, hashes.SHA256())
        return Authority(self.name, cert, key)

    def leaf(
        self, *uris: str, ca: bool = False, usage: x509.KeyUsage | None = None, basic: bool = True,
        not_before: float = NOW - 300, not_after: float = NOW + 3600, key_usage: bool = True,
    ) -> x509.Certificate:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "workload")])
        builder = _builder(name, self.cert.subject, key, self.key, ca=ca, uris=list(uris), basic=basic,
                           not_before=not_before, not_after=not_after,
                           usage=(usage or _usage(cert_sign=ca)) if key_usage else None)
        if not ca:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]),
                critical=False)
        return builder.sign(self.key, hashes.SHA256())


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, issuer_key: ec.EllipticCurvePrivateKey,
    *, ca: bool, uris: list[str] | None = None, basic: bool = True, usage: x509.KeyUsage | None = None,
    not_before: float = NOW - 86_400, not_after: float = NOW + 86_400,
) -> x509.CertificateBuilder:
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(dt.datetime.fromtimestamp(not_before, tz=dt.UTC))
         .not_valid_after(dt.datetime.fromtimestamp(not_after, tz=dt.UTC))
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False))
    if basic:
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    if uris:
        b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
                            critical=False)
    if ca:
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        b = b.add_extension(usage or _usage(cert_sign=True), critical=True)
    elif usage is not None:
        b = b.add_extension(usage, critical=True)
    return b


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(Encoding.PEM) for c in certs)


def xfcc_value(*certs: x509.Certificate) -> str:
    """URL-encoded PEM, as Envoy writes Cert= and Chain= values."""
    return quote(pem(*certs).decode(), safe="")


usage = _usage
__all__ = ["NOW", "Authority", "pem", "usage", "xfcc_value"]
