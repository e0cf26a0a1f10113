"""X.509-SVID verification: the SPIFFE X509-SVID profile, chains to the right bundle, XFCC, bundle reload."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from broker.attest.x509_bundles import X509Bundles
from broker.attest.x509_svid import certificate_thumbprint, load_pem_chain, verify_x509_svid
from broker.attest.xfcc import forwarded_certificate_chain, parse_xfcc
from broker.errors import AttestationError
from tests.attest.x509_factory import NOW, Authority, pem, usage, xfcc_value

SUPPORT = "spiffe://example.org/ns/support/sa/support-assistant"
ORG = Authority.root("example.org")
OTHER = Authority.root("other.org")
ROGUE = Authority.root("example.org")  # claims the same trust domain, but is not in its bundle
BUNDLES = {"example.org": (ORG.cert,), "other.org": (OTHER.cert,)}


def test_valid_svid_directly_under_the_root() -> None:
    leaf = ORG.leaf(SUPPORT)
    svid = verify_x509_svid([leaf], BUNDLES, NOW)
    assert svid.spiffe_id == SUPPORT and svid.trust_domain == "example.org"
    der = leaf.public_bytes(Encoding.DER)
    # RFC 8705 §3.1: x5t#S256 is base64url(SHA-256(DER)) without padding.
    assert svid.x5t_s256 == base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    assert svid.evidence_digest == "sha256:" + hashlib.sha256(der).hexdigest()
    assert svid.not_after == int(NOW + 3600)


def test_valid_svid_through_an_intermediate() -> None:
    intermediate = ORG.intermediate()
    leaf = intermediate.leaf(SUPPORT)
    assert verify_x509_svid([leaf, intermediate.cert], BUNDLES, NOW).spiffe_id == SUPPORT
    with pytest.raises(AttestationError, match="does not verify"):
        verify_x509_svid([leaf], BUNDLES, NOW)  # the intermediate is needed


def _refusals() -> list[tuple[str, list, str]]:  # type: ignore[type-arg]
    not_ca = ORG.intermediate(ca=False)
    return [
        ("wrong trust domain: no bundle", [ORG.leaf("spiffe://elsewhere.org/w")], "has no configured X.509 bundle"),
        ("chain to another trust domain's bundle", [OTHER.leaf(SUPPORT)], "does not verify to the 'example.org'"),
        ("a rogue CA for the same trust domain", [ROGUE.leaf(SUPPORT)], "does not verify"),
        ("two URI SANs", [ORG.leaf(SUPPORT, "spiffe://example.org/other")], "2 URI SANs"),
        ("no URI SAN", [ORG.leaf()], "no URI SAN"),
        ("a URI SAN that is not SPIFFE", [ORG.leaf("https://example.org/w")], "not a SPIFFE ID"),
        ("the trust domain's own ID", [ORG.leaf("spiffe://example.org")], "names a trust domain"),
        ("a CA as the leaf", [ORG.leaf(SUPPORT, ca=True)], "leaf certificate is a CA"),
        ("no basicConstraints", [ORG.leaf(SUPPORT, basic=False)], "no basicConstraints"),
        ("no keyUsage", [ORG.leaf(SUPPORT, key_usage=False)], "no keyUsage"),
        ("keyUsage without digitalSignature", [ORG.leaf(SUPPORT, usage=usage(sign=False))], "lacks digitalSignature"),
        ("keyUsage that signs certificates", [ORG.leaf(SUPPORT, usage=usage(cert_sign=True))], "signing certificates"),
        ("an expired leaf", [ORG.leaf(SUPPORT, not_before=NOW - 7200, not_after=NOW - 1)], "does not verify"),
        ("a leaf not yet valid", [ORG.leaf(SUPPORT, not_before=NOW + 60)], "does not verify"),
        ("signed by a non-CA intermediate", [not_ca.leaf(SUPPORT), not_ca.cert], "does not verify"),
        ("no certificate", [], "no certificate"),
        ("a chain too long", [ORG.leaf(SUPPORT)] * 9, "longer than 8"),
    ]


@pytest.mark.parametrize(("case", "chain", "error"), _refusals(), ids=[c[0] for c in _refusals()])
def test_refused_svids(case: str, chain: list, error: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(AttestationError, match=error):
        verify_x509_svid(chain, BUNDLES, NOW)


def test_pem_loading() -> None:
    leaf = ORG.leaf(SUPPORT)
    assert load_pem_chain(pem(leaf, ORG.cert)) == [leaf, ORG.cert]
    truncated = b"-----BEGIN CERTIFICATE-----\nAAAA\n"
    for bad, error in [(b"", "not valid PEM|no certificate"), (truncated, "not valid PEM")]:
        with pytest.raises(AttestationError, match=error):
            load_pem_chain(bad)


def test_xfcc_as_envoy_writes_it() -> None:
    intermediate = ORG.intermediate()
    leaf = intermediate.leaf(SUPPORT)
    header = (f'By=spiffe://example.org/ns/edge/sa/envoy;Hash={"ab" * 32};Cert="{xfcc_value(leaf)}";'
              f'Chain="{xfcc_value(leaf, intermediate.cert)}";Subject="O=workload";URI={SUPPORT}')
    chain = forwarded_certificate_chain(header)
    assert chain == [leaf, intermediate.cert]
    assert verify_x509_svid(chain, BUNDLES, NOW).x5t_s256 == certificate_thumbprint(leaf)
    assert forwarded_certificate_chain(f"Cert={xfcc_value(leaf)}") == [leaf]  # unquoted value


@pytest.mark.parametrize(("header", "error"), [
    ("", "is empty"),
    ("Cert", "without '='"),
    ("Cert=a;Hash", "without '='"),
    ('Cert="unterminated', "unterminated"),
    ("Evil=1;Cert=x", "unknown key 'Evil'"),
    ("Cert=a;Cert=b", "repeats 'Cert'"),
    ("=x", "empty key"),
    ("Hash=00;URI=spiffe://example.org/w", "no Cert or Chain"),
    ("Cert=not-pem", "not valid PEM|no certificate"),
    ("x" * 40_000, "longer than"),
])
def test_xfcc_refusals(header: str, error: str) -> None:
    with pytest.raises(AttestationError, match=error):
        forwarded_certificate_chain(header)


def test_xfcc_from_several_hops_is_refused() -> None:
    leaf = ORG.leaf(SUPPORT)
    header = f"Cert={xfcc_value(leaf)},Cert={xfcc_value(ORG.leaf(SUPPORT))}"
    assert len(parse_xfcc(header)) == 2
    with pytest.raises(AttestationError, match="2 elements"):
        forwarded_certificate_chain(header)


def test_xfcc_cert_must_lead_its_chain() -> None:
    leaf, other = ORG.leaf(SUPPORT), ORG.leaf(SUPPORT)
    with pytest.raises(AttestationError, match="not the first certificate"):
        forwarded_certificate_chain(f'Cert="{xfcc_value(other)}";Chain="{xfcc_value(leaf)}"')


def test_quoted_values_keep_escaped_quotes_and_separators() -> None:
    (element,) = parse_xfcc('Subject="CN=a\\"b, O=c;d";URI=spiffe://example.org/w')
    assert element == {"Subject": 'CN=a"b, O=c;d', "URI": "spiffe://example.org/w"}


def test_bundles_reload_without_restart(tmp_path: Path) -> None:
    path = tmp_path / "example.org.pem"
    path.write_bytes(pem(ORG.cert))
    bundles = X509Bundles({"example.org": path})
    rotated = Authority.root("example.org")
    leaf = rotated.leaf(SUPPORT)
    with pytest.raises(AttestationError, match="does not verify"):
        verify_x509_svid([leaf], bundles.roots, NOW)
    assert bundles.refresh() == []  # nothing changed on disk

    # SPIRE publishes the new root beside the old one: both verify, with no restart.
    path.write_bytes(pem(ORG.cert, rotated.cert))
    os.utime(path, ns=(1, 2))
    assert bundles.refresh() == ["example.org"]
    assert verify_x509_svid([leaf], bundles.roots, NOW).spiffe_id == SUPPORT
    assert verify_x509_svid([ORG.leaf(SUPPORT)], bundles.roots, NOW).spiffe_id == SUPPORT

    # A half-written file keeps the bundle in force rather than emptying the trust domain.
    path.write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB")
    assert bundles.refresh() == []
    assert verify_x509_svid([leaf], bundles.roots, NOW).spiffe_id == SUPPORT
    # The old root retired: its leaves stop verifying.
    path.write_bytes(pem(rotated.cert))
    assert bundles.refresh() == ["example.org"]
    with pytest.raises(AttestationError, match="does not verify"):
        verify_x509_svid([ORG.leaf(SUPPORT)], bundles.roots, NOW)


@pytest.mark.parametrize(("files", "error"), [
    ({"Example.org": "x"}, "trust domain characters"),
    ({"example.org": "missing.pem"}, "cannot be read"),
    ({"example.org": "empty.pem"}, "not PEM certificates|holds no certificate"),
])
def test_bad_bundle_configuration(tmp_path: Path, files: dict[str, str], error: str) -> None:
    (tmp_path / "empty.pem").write_bytes(b"")
    with pytest.raises(ValueError, match=error):
        X509Bundles({td: tmp_path / name for td, name in files.items()})
