"""X.509-SVID attestation over real HTTP against ``nhi-broker serve``.

Two ways in: an XFCC header from a configured proxy address (the broker on plain HTTP behind Envoy),
and mutual TLS terminated by the broker itself (``[tls]``). Every refusal names the status, ``error``
and description it must get. A certificate-bound token (RFC 8705 §3.1 ``cnf.x5t#S256``) is checked
with an independent JOSE library (jwcrypto), and its ledger entry records the same thumbprint. A
bundle file rotated on disk is followed without a restart.
"""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from jwcrypto import jwk as jwcrypto_jwk
from jwcrypto import jwt as jwcrypto_jwt
from nhi_broker_client import (
    X509_SVID_TOKEN_TYPE,
    BrokerClient,
    InvalidTokenError,
    TaskTokenVerifier,
    certificate_thumbprint,
)

from tests.attest.x509_factory import Authority, pem, xfcc_value
from tests.helpers import JWT_TYPE, SUPPORT, LiveBroker, dev_user, intent

X509_TYPE = "urn:nhi-broker:token-type:x509-svid"
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
REFUND_20 = intent("payments.refund", "customers/c-42/orders/ord-1001", customer="c-42", amount=20, currency="EUR")
NOW = time.time()
ORG = Authority.root("example.org", now=NOW)
OTHER = Authority.root("other.org", now=NOW)
ROTATED = Authority.root("example.org", now=NOW)  # the trust domain's next CA, not yet in its bundle


def form(spiffe_id: str = SUPPORT) -> dict[str, str]:
    return {"grant_type": EXCHANGE, "subject_token": spiffe_id, "subject_token_type": X509_TYPE,
            "audience": "payments-api", "authorization_details": REFUND_20}


def refund_form(broker: LiveBroker, spiffe_id: str = SUPPORT) -> dict[str, str]:
    """A refund for the verified customer c-42 (RFC 8693 delegation; the sample refund rules need the user):
    the workload's X.509-SVID is the actor, the customer's token (trial user issuer) the subject."""
    return {"grant_type": EXCHANGE, "subject_token": dev_user(broker.data_dir), "subject_token_type": JWT_TYPE,
            "actor_token": spiffe_id, "actor_token_type": X509_TYPE, "audience": "payments-api",
            "authorization_details": REFUND_20}


def thumbprint(certificate: x509.Certificate) -> str:
    digest = hashlib.sha256(certificate.public_bytes(Encoding.DER)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def xfcc(*chain: x509.Certificate) -> dict[str, str]:
    return {"x-forwarded-client-cert": f'Hash={"ab" * 32};Chain="{xfcc_value(*chain)}";URI={SUPPORT}'}


def write_config(directory: Path, *, tls: bool = False) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    org_bundle, other_bundle = directory / "example.org.pem", directory / "other.org.pem"
    org_bundle.write_bytes(pem(ORG.cert))
    other_bundle.write_bytes(pem(OTHER.cert))
    lines = ["[x509]", f'bundles = {{"example.org" = "{org_bundle}", "other.org" = "{other_bundle}"}}',
             'trusted_proxies = ["127.0.0.1/32"]', "refresh_interval = 1"]
    if tls:
        server_ca = Authority.root("broker.test", now=NOW)
        cert, key = server_ca.leaf_and_key(ip="127.0.0.1")
        (directory / "server.pem").write_bytes(pem(cert))
        (directory / "server-key.pem").write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
        (directory / "server-ca.pem").write_bytes(pem(server_ca.cert))
        lines += ["[tls]", f'cert_file = "{directory / "server.pem"}"', f'key_file = "{directory / "server-key.pem"}"']
    config = directory / "broker.toml"
    config.write_text("\n".join(lines) + "\n")
    return config, org_bundle


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveBroker, Path]]:
    root = tmp_path_factory.mktemp("x509")
    config, org_bundle = write_config(root / "etc")
    live = LiveBroker(root / "data", config=config)
    try:
        yield live, org_bundle
    finally:
        live.stop()


def verify_independently(broker: LiveBroker, token: str, **client: Any) -> dict[str, Any]:
    jwks = httpx.get(broker.url + "/.well-known/jwks.json", **client).json()
    keyset = jwcrypto_jwk.JWKSet.from_json(json.dumps(jwks))
    verified = jwcrypto_jwt.JWT(jwt=token, key=keyset, algs=["ES256"],
                                check_claims={"iss": broker.url, "aud": "payments-api", "exp": None})
    claims: dict[str, Any] = json.loads(verified.claims)
    return claims


def ledger_entry(broker: LiveBroker, index: int, **client: Any) -> dict[str, Any]:
    page = httpx.get(broker.url + "/v1/ledger/entries", params={"start": index, "end": index + 1}, **client).json()
    entry: dict[str, Any] = json.loads(base64.b64decode(page["entries"][0]["leaf"]))
    return entry


def test_svid_forwarded_by_a_trusted_proxy_gets_a_certificate_bound_token(proxied: tuple[LiveBroker, Path]) -> None:
    broker, _ = proxied
    intermediate = ORG.intermediate()
    leaf = intermediate.leaf(SUPPORT)
    r = httpx.post(broker.url + "/v1/token", data=refund_form(broker), headers=xfcc(leaf, intermediate.cert))
    assert r.status_code == 200, r.text
    body = r.json()
    claims = verify_independently(broker, body["access_token"])
    assert claims["sub"] == "c-42" and claims["act"] == {"sub": SUPPORT}
    assert claims["cnf"] == {"x5t#S256": thumbprint(leaf)}  # RFC 8705 §3.1
    entry = ledger_entry(broker, body["receipt"]["index"])
    assert entry["workload"]["attestation"] == "x509-svid"
    assert entry["credential"]["cnf_x5t_s256"] == thumbprint(leaf)


def _refusals() -> list[tuple[str, Any, dict[str, str], str]]:
    return [
        ("wrong trust domain", [ORG.leaf("spiffe://elsewhere.org/ns/a/sa/b")], form("spiffe://elsewhere.org/ns/a/sa/b"),
         "trust domain 'elsewhere.org' has no configured X.509 bundle"),
        ("two URI SANs", [ORG.leaf(SUPPORT, "spiffe://example.org/other")], form(),
         "the certificate has 2 URI SANs; an X.509-SVID has exactly one"),
        ("a CA as the leaf", [ORG.leaf(SUPPORT, ca=True)], form(), "the leaf certificate is a CA"),
        ("an expired leaf", [ORG.leaf(SUPPORT, not_before=NOW - 7200, not_after=NOW - 600)], form(),
         "does not verify to the 'example.org' bundle"),
        ("a chain to another trust domain's bundle", [OTHER.leaf(SUPPORT)], form(),
         "does not verify to the 'example.org' bundle"),
        ("a certificate of another workload than claimed", [ORG.leaf("spiffe://example.org/ns/x/sa/y")], form(),
         "subject_token does not match the client certificate's SPIFFE ID"),
    ]


@pytest.mark.parametrize(("case", "chain", "data", "error"), _refusals(), ids=[c[0] for c in _refusals()])
def test_refused_svids_over_http(proxied: tuple[LiveBroker, Path], case: str, chain: list[x509.Certificate],
                                 data: dict[str, str], error: str) -> None:
    broker, _ = proxied
    r = httpx.post(broker.url + "/v1/token", data=data, headers=xfcc(*chain))
    assert (r.status_code, r.json()["error"]) == (400, "invalid_grant"), r.text
    assert error in r.json()["error_description"]


def test_xfcc_from_an_untrusted_address_is_refused_unread(proxied: tuple[LiveBroker, Path]) -> None:
    broker, _ = proxied
    # 127.0.0.2 is loopback too, but not in trusted_proxies; the header is not even parsed.
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(transport=transport) as client:
        for headers in (xfcc(ORG.leaf(SUPPORT)), {"x-forwarded-client-cert": "not;even=parsable,"}):
            r = client.post(broker.url + "/v1/token", data=form(), headers=headers)
            assert (r.status_code, r.json()["error"]) == (400, "invalid_grant"), r.text
            assert r.json()["error_description"] == (
                "x-forwarded-client-cert is accepted only from a trusted proxy; 127.0.0.2 is not one")
        # X-Forwarded-For does not make the caller a trusted proxy either.
        r = client.post(broker.url + "/v1/token", data=form(),
                        headers={**xfcc(ORG.leaf(SUPPORT)), "x-forwarded-for": "127.0.0.1"})
        assert r.status_code == 400 and "127.0.0.2 is not one" in r.json()["error_description"]


def test_no_certificate_at_all(proxied: tuple[LiveBroker, Path]) -> None:
    broker, _ = proxied
    r = httpx.post(broker.url + "/v1/token", data=form())
    assert (r.status_code, r.json()["error"]) == (400, "invalid_grant")
    assert "needs a client certificate" in r.json()["error_description"]
    r = httpx.post(broker.url + "/v1/token", data=form(), headers=xfcc(ORG.leaf(SUPPORT), ORG.cert) | {
        "x-forwarded-client-cert": f'Cert="{xfcc_value(ORG.leaf(SUPPORT))}",Cert="{xfcc_value(ORG.leaf(SUPPORT))}"'})
    assert r.status_code == 400 and "has 2 elements" in r.json()["error_description"]


def test_rotated_bundle_is_followed_without_restart(proxied: tuple[LiveBroker, Path]) -> None:
    broker, org_bundle = proxied
    leaf = ROTATED.leaf(SUPPORT)
    r = httpx.post(broker.url + "/v1/token", data=form(), headers=xfcc(leaf))
    assert r.status_code == 400 and "does not verify" in r.json()["error_description"]
    # The operator (or SPIRE's bundle sidecar) publishes the new CA next to the old one.
    org_bundle.write_bytes(pem(ORG.cert, ROTATED.cert))
    deadline = time.monotonic() + 15
    while True:
        r = httpx.post(broker.url + "/v1/token", data=refund_form(broker), headers=xfcc(leaf))
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)  # the broker reloads on its own schedule (refresh_interval = 1 s)
    assert r.status_code == 200, r.text
    assert verify_independently(broker, r.json()["access_token"])["cnf"] == {"x5t#S256": thumbprint(leaf)}


# --- mutual TLS terminated by the broker -------------------------------------------------------------


@pytest.fixture(scope="module")
def terminating(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveBroker, Path]]:
    root = tmp_path_factory.mktemp("mtls")
    config, _ = write_config(root / "etc", tls=True)
    live = LiveBroker(root / "data", config=config, tls_verify=server_ca(root / "etc"))
    try:
        yield live, root / "etc"
    finally:
        live.stop()


def client_files(directory: Path, authority: Authority, *uris: str, **kw: Any) -> tuple[tuple[str, str], str]:
    cert, key = authority.leaf_and_key(*uris, **kw)
    name = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()[:12]
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert_path.write_bytes(pem(cert))
    key_path.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    return (str(cert_path), str(key_path)), thumbprint(cert)


def server_ca(etc: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(etc / "server-ca.pem"))


def mtls_client(etc: Path, cert: tuple[str, str] | None) -> httpx.Client:
    context = server_ca(etc)
    if cert is not None:
        context.load_cert_chain(*cert)
    return httpx.Client(verify=context)


def test_svid_over_mutual_tls_terminated_by_the_broker(terminating: tuple[LiveBroker, Path]) -> None:
    broker, etc = terminating
    cert, x5t = client_files(etc, ORG, SUPPORT)
    with mtls_client(etc, cert) as client:
        r = client.post(broker.url + "/v1/token", data=refund_form(broker))
        assert r.status_code == 200, r.text
        claims = verify_independently(broker, r.json()["access_token"], verify=server_ca(etc))
        assert claims["cnf"] == {"x5t#S256": x5t}
        assert ledger_entry(broker, r.json()["receipt"]["index"], verify=server_ca(etc))[
            "credential"]["cnf_x5t_s256"] == x5t


def test_mutual_tls_refusals(terminating: tuple[LiveBroker, Path]) -> None:
    broker, etc = terminating
    # A certificate of another configured trust domain's CA passes the TLS layer (which trusts every
    # bundle) but not the SVID check: its SPIFFE ID is in example.org.
    cert, _ = client_files(etc, OTHER, SUPPORT)
    with mtls_client(etc, cert) as client:
        r = client.post(broker.url + "/v1/token", data=form())
        assert (r.status_code, r.json()["error"]) == (400, "invalid_grant")
        assert "does not verify to the 'example.org' bundle" in r.json()["error_description"]
    cert, _ = client_files(etc, ORG, SUPPORT, "spiffe://example.org/two")
    with mtls_client(etc, cert) as client:
        r = client.post(broker.url + "/v1/token", data=form())
        assert r.status_code == 400 and "2 URI SANs" in r.json()["error_description"]
    # Without a client certificate (client_certificates = "optional") the TLS connection works and
    # the x509-svid request is refused precisely; JWT methods are unaffected.
    with mtls_client(etc, None) as client:
        r = client.post(broker.url + "/v1/token", data=form())
        assert r.status_code == 400 and "needs a client certificate" in r.json()["error_description"]
        assert client.get(broker.url + "/readyz").status_code == 200
    # A certificate from a CA the broker does not trust at all fails the TLS handshake.
    cert, _ = client_files(etc, Authority.root("example.org", now=NOW), SUPPORT)
    with mtls_client(etc, cert) as client, pytest.raises(httpx.HTTPError):
        client.post(broker.url + "/v1/token", data=form())


def test_sdk_over_mutual_tls_and_the_resource_side_binding_check(terminating: tuple[LiveBroker, Path]) -> None:
    broker, etc = terminating
    cert, x5t = client_files(etc, ORG, SUPPORT)
    other, _ = client_files(etc, ORG, SUPPORT)
    # The SVID-attested assistant acts for the verified customer c-42 (actor_token_type = the SVID's type).
    with BrokerClient(broker.url, actor=SUPPORT, user_token=partial(dev_user, broker.data_dir),
                      subject_token_type=X509_SVID_TOKEN_TYPE, dpop=False, client_cert=cert,
                      ca_file=str(etc / "server-ca.pem")) as client:
        token = client.get_token("payments-api", "payments.refund", "customers/c-42/orders/ord-1001",
                                 {"customer": "c-42", "amount": 20, "currency": "EUR"})
    assert token.token_type == "Bearer"
    with TaskTokenVerifier(broker.url, "payments-api", http_client=httpx.Client(verify=server_ca(etc))) as verifier:
        presented = Path(cert[0]).read_text()
        verified = verifier.verify(token.access_token, scheme="Bearer", client_certificate=presented)
        assert verified.cnf_x5t_s256 == x5t == certificate_thumbprint(presented)
        assert verified.claims["act"] == {"sub": SUPPORT}
        with pytest.raises(InvalidTokenError, match="needs the client certificate"):
            verifier.verify(token.access_token, scheme="Bearer")
        with pytest.raises(InvalidTokenError, match="not the one the token is bound to"):
            verifier.verify(token.access_token, scheme="Bearer", client_certificate=Path(other[0]).read_bytes())
