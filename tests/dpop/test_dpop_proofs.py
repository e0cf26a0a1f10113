"""DPoP proof verification (RFC 9449): the RFC's own example, a table of attack proofs each naming the
error it must get, htu normalisation, replay, server nonces and policy bindings."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwcrypto import jwk as jwcrypto_jwk
from jwcrypto import jws as jwcrypto_jws

from broker.clock import FixedClock
from broker.dpop import (
    DPoPBindingRequired,
    DPoPProof,
    DPoPReplay,
    DPoPVerifier,
    InvalidDPoPProof,
    NonceIssuer,
    UseDPoPNonce,
    enforce_binding,
    normalize_htu,
)
from broker.models import Grant, Intent, RegisteredWorkload, WorkloadIdentity
from broker.state.sqlite import SqliteStateStore
from tests.dpop.dpop_helpers import HTU, jwk_of, new_key, proof
from tests.helpers import run

NOW = 1_700_000_000

# RFC 9449 §4.1, Figure 3 (the proof) and §6.1 (the thumbprint of its key).
RFC_PROOF = (
    "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgtMzR0VjNoUklDUkRZOXpDa0Rs"
    "cEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5VERWclUwQ2R2R1JEQSIsImNydiI6IlAtMjU2In19"
    ".eyJqdGkiOiItQndDM0VTYzZhY2MybFRjIiwiaHRtIjoiUE9TVCIsImh0dSI6Imh0dHBzOi8vc2VydmVyLmV4YW1wbGUuY29tL3Rva2VuIiwiaWF0"
    "IjoxNTYyMjYyNjE2fQ"
    ".2-GxA6T8lP4vfrg8v-FdWP0A0zdrj8igiMLvqRMUvwnQg4PtFLbdLXiOSsX0x7NVY-FNyJK70nfbV37xRZT3Lg"
)
RFC_JKT = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
RFC_IAT = 1562262616


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = SqliteStateStore(tmp_path / "state.sqlite3", clock=FixedClock(NOW))
    yield s
    s.close_now()


class _Verifier:
    """A :class:`DPoPVerifier` driven from synchronous tests (each proof on a fresh event loop)."""

    def __init__(self, inner: DPoPVerifier) -> None:
        self.inner = inner

    def verify(self, proof: str, *, htm: str, htu: str) -> DPoPProof:
        return run(self.inner.verify(proof, htm=htm, htu=htu))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def verifier(store: Any, now: float = NOW, **kwargs: Any) -> _Verifier:
    return _Verifier(DPoPVerifier(store, FixedClock(now), **kwargs))


def test_rfc9449_example_proof_verifies(store: Any) -> None:
    verified = verifier(store, RFC_IAT + 3).verify(RFC_PROOF, htm="POST", htu="https://server.example.com/token")
    assert verified.jkt == RFC_JKT
    assert verified.jti == "-BwC3ESc6acc2lTc"
    # An independent JOSE library agrees on the signature and the thumbprint.
    header = json.loads(base64.urlsafe_b64decode(RFC_PROOF.split(".")[0] + "=="))
    key = jwcrypto_jwk.JWK(**header["jwk"])
    token = jwcrypto_jws.JWS()
    token.deserialize(RFC_PROOF)
    token.verify(key, alg="ES256")
    assert key.thumbprint() == RFC_JKT


def test_rfc9449_example_is_refused_when_stale_or_for_another_uri(store: Any) -> None:
    with pytest.raises(InvalidDPoPProof, match="older than 60 s"):
        verifier(store, RFC_IAT + 61).verify(RFC_PROOF, htm="POST", htu="https://server.example.com/token")
    with pytest.raises(InvalidDPoPProof, match="'htu' does not match"):
        verifier(store, RFC_IAT).verify(RFC_PROOF, htm="POST", htu="https://server.example.com/other")


def test_fresh_proofs_of_each_key_type_verify_and_jwcrypto_agrees(store: Any) -> None:
    keys = [ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP384R1()),
            ed25519.Ed25519PrivateKey.generate(), rsa.generate_private_key(65537, 2048)]
    algs = ["ES256", "ES384", "EdDSA", "PS256"]
    for key, alg in zip(keys, algs, strict=True):
        jwk = jwk_of(key) if not isinstance(key, ec.EllipticCurvePrivateKey) or alg == "ES256" else None
        if jwk is None:  # P-384: build the JWK with jwcrypto
            jwk = json.loads(jwcrypto_jwk.JWK.from_pyca(key.public_key()).export_public())
        p = jwt.encode({"jti": f"j-{alg}", "htm": "POST", "htu": HTU, "iat": NOW}, key, algorithm=alg,
                       headers={"typ": "dpop+jwt", "jwk": jwk})
        verified = verifier(store).verify(p, htm="POST", htu=HTU)
        assert verified.jkt == jwcrypto_jwk.JWK(**jwk).thumbprint()


K = new_key()
OTHER = new_key()


def _private_jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    return json.loads(jwcrypto_jwk.JWK.from_pyca(key).export_private())


def _resign_with_other_key() -> str:
    good = proof(K, iat=NOW)
    forged = proof(OTHER, iat=NOW)
    return ".".join([good.split(".")[0], good.split(".")[1], forged.split(".")[2]])


def _b64(obj: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return f"{_b64(header)}.{_b64(claims)}.c2ln"


ATTACKS: list[tuple[str, Any, str]] = [
    ("not a JWS", lambda: "abc", "not a compact JWS"),
    ("whitespace", lambda: proof(K, iat=NOW) + " ", "not a compact JWS"),
    ("oversized", lambda: proof(K, iat=NOW, pad="x" * 9000), "exceeds 8192 bytes"),
    ("typ JWT", lambda: proof(K, iat=NOW, header={"typ": "JWT"}), "'typ' must be dpop+jwt"),
    ("typ missing", lambda: proof(K, iat=NOW, header={"typ": ""}), "'typ' must be dpop+jwt"),
    ("typ at+jwt", lambda: proof(K, iat=NOW, header={"typ": "at+jwt"}), "'typ' must be dpop+jwt"),
    ("alg none", lambda: _unsigned({"typ": "dpop+jwt", "alg": "none", "jwk": jwk_of(K)},
                                   {"jti": "j", "htm": "POST", "htu": HTU, "iat": NOW}), "not an allowed"),
    ("alg HS256 with the public key as secret",
     lambda: _unsigned({"typ": "dpop+jwt", "alg": "HS256", "jwk": jwk_of(K)},
                       {"jti": "j", "htm": "POST", "htu": HTU, "iat": NOW}), "not an allowed"),
    ("alg does not fit the key", lambda: _unsigned({"typ": "dpop+jwt", "alg": "EdDSA", "jwk": jwk_of(K)},
                                                   {"jti": "j", "htm": "POST", "htu": HTU, "iat": NOW}),
     "does not match its 'jwk'"),
    ("no jwk", lambda: proof(K, iat=NOW, drop=("jwk",)), "'jwk' must be a JSON object"),
    ("private key in jwk", lambda: proof(K, iat=NOW, header={"jwk": _private_jwk(K)}), "private or symmetric"),
    ("symmetric jwk", lambda: proof(K, iat=NOW, header={"jwk": {"kty": "oct", "k": "c2VjcmV0"}}),
     "private or symmetric"),
    ("kid pointing elsewhere", lambda: proof(K, iat=NOW, header={"kid": "k1"}), "'kid' is not allowed"),
    ("jku", lambda: proof(K, iat=NOW, header={"jku": "https://evil.example/jwks"}), "'jku' is not allowed"),
    ("x5c", lambda: proof(K, iat=NOW, header={"x5c": ["MII"]}), "'x5c' is not allowed"),
    ("crit", lambda: proof(K, iat=NOW, header={"crit": ["exp"]}), "'crit' is not allowed"),
    ("signed by another key", _resign_with_other_key, "signature verification failed"),
    ("duplicate claim", lambda: _unsigned({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk_of(K)}, {}).replace(
        _b64({}), base64.urlsafe_b64encode(b'{"jti":"a","jti":"b"}').rstrip(b"=").decode()), "duplicated member"),
    ("no jti", lambda: proof(K, iat=NOW, drop=("jti",)), "missing claim 'jti'"),
    ("no htm", lambda: proof(K, iat=NOW, drop=("htm",)), "missing claim 'htm'"),
    ("no htu", lambda: proof(K, iat=NOW, drop=("htu",)), "missing claim 'htu'"),
    ("no iat", lambda: proof(K, iat=NOW, drop=("iat",)), "missing claim 'iat'"),
    ("jti not a string", lambda: proof(K, iat=NOW, jti=7), "'jti' must be"),
    ("iat as a string", lambda: proof(K, iat=str(NOW)), "'iat' must be a NumericDate"),
    ("iat as a boolean", lambda: proof(K, iat=True), "'iat' must be a NumericDate"),
    ("iat absurd", lambda: proof(K, iat=1e20), "'iat' must be a NumericDate"),
    ("htm GET", lambda: proof(K, iat=NOW, htm="GET"), "'htm' does not match"),
    ("htm lower case", lambda: proof(K, iat=NOW, htm="post"), "'htm' does not match"),
    ("htu of another server", lambda: proof(K, iat=NOW, htu="https://evil.example/v1/token"), "'htu' does not match"),
    ("htu of another path", lambda: proof(K, iat=NOW, htu="https://broker.example/v1/introspect"),
     "'htu' does not match"),
    ("htu over http", lambda: proof(K, iat=NOW, htu="http://broker.example/v1/token"), "'htu' does not match"),
    ("htu not a URI", lambda: proof(K, iat=NOW, htu="/v1/token"), "'htu' does not match"),
    ("htu with userinfo", lambda: proof(K, iat=NOW, htu="https://u@broker.example/v1/token"), "'htu' does not match"),
    ("iat in the future", lambda: proof(K, iat=NOW + 30), "'iat' is in the future"),
    ("iat too old", lambda: proof(K, iat=NOW - 61), "older than 60 s"),
]


@pytest.mark.parametrize(("name", "make", "error"), ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attack_proofs_are_refused(store: Any, name: str, make: Any, error: str) -> None:
    with pytest.raises(InvalidDPoPProof, match=re.escape(error)) as info:
        verifier(store).verify(make(), htm="POST", htu=HTU)
    assert info.value.code == "invalid_dpop_proof"
    assert info.value.status == 400


def test_htu_ignores_query_and_fragment_and_normalises(store: Any) -> None:
    p = proof(K, iat=NOW, htu="HTTPS://Broker.Example:443/v1/%74oken?x=1#f")
    assert verifier(store).verify(p, htm="POST", htu=HTU).htu == HTU


@pytest.mark.parametrize(("given", "normal"), [
    ("https://a.example", "https://a.example/"),
    ("HTTP://A.Example:80/x", "http://a.example/x"),
    ("http://a.example:8080/x", "http://a.example:8080/x"),
    ("https://a.example/a/./b/../c", "https://a.example/a/c"),
    ("https://a.example/%7euser/%2f", "https://a.example/~user/%2F"),
    ("https://[::1]:8443/t?q#f", "https://[::1]:8443/t"),
])
def test_normalize_htu(given: str, normal: str) -> None:
    assert normalize_htu(given) == normal


def test_a_proof_is_single_use_per_key(store: Any) -> None:
    v = verifier(store)
    p = proof(K, iat=NOW, jti="same-jti")
    v.verify(p, htm="POST", htu=HTU)
    with pytest.raises(DPoPReplay, match="already been used"):
        v.verify(p, htm="POST", htu=HTU)
    # Another key choosing the same jti cannot burn (or be blocked by) ours.
    v.verify(proof(OTHER, iat=NOW, jti="same-jti"), htm="POST", htu=HTU)


def test_a_refused_proof_does_not_burn_its_jti(store: Any) -> None:
    v = verifier(store)
    with pytest.raises(InvalidDPoPProof, match="'htm'"):
        v.verify(proof(K, iat=NOW, jti="j-1"), htm="GET", htu=HTU)
    v.verify(proof(K, iat=NOW, jti="j-1"), htm="POST", htu=HTU)


def test_server_nonce(store: Any) -> None:
    nonces = NonceIssuer(b"n" * 32, window=60)
    v = verifier(store, nonces=nonces)
    with pytest.raises(UseDPoPNonce) as missing:
        v.verify(proof(K, iat=NOW), htm="POST", htu=HTU)
    assert missing.value.code == "use_dpop_nonce"
    nonce = missing.value.http_headers["DPoP-Nonce"]
    assert nonce == v.fresh_nonce()
    v.verify(proof(K, iat=NOW, nonce=nonce), htm="POST", htu=HTU)
    # Valid for the next window too, not after.
    verifier(store, NOW + 60, nonces=nonces).verify(proof(K, iat=NOW + 60, nonce=nonce), htm="POST", htu=HTU)
    with pytest.raises(UseDPoPNonce, match="stale or invalid"):
        verifier(store, NOW + 120, nonces=nonces).verify(proof(K, iat=NOW + 120, nonce=nonce), htm="POST", htu=HTU)
    with pytest.raises(UseDPoPNonce, match="stale or invalid"):
        v.verify(proof(K, iat=NOW, nonce=NonceIssuer(b"m" * 32).current(NOW)), htm="POST", htu=HTU)


def _grant(binding: str, cnf_jkt: str | None = None) -> Grant:
    identity = WorkloadIdentity("spiffe://example.org/a", "iss", "dev", "spiffe://example.org/a", "sha256:00", 0,
                                cnf_jkt=cnf_jkt)
    workload = RegisteredWorkload("a", "spiffe://example.org/a", "owner", (), ("api",))
    return Grant(identity, workload, Intent("a.b", "r"), "api", "rule-1", 60, "jwt", "sha256:00", binding=binding)


def test_enforce_binding() -> None:
    bound = DPoPProof(jkt="k" * 43, jti="j", iat=NOW, htm="POST", htu=HTU)
    enforce_binding(_grant("optional"), None)
    enforce_binding(_grant("dpop"), bound)
    enforce_binding(_grant("dpop-identity-key", cnf_jkt="k" * 43), bound)
    cases = [(_grant("dpop"), None, "requires a DPoP-bound token"),
             (_grant("dpop-identity-key", cnf_jkt="k" * 43), None, "requires a DPoP-bound token"),
             (_grant("dpop-identity-key", cnf_jkt="z" * 43), bound, "key the workload identity is bound to"),
             (_grant("dpop-identity-key"), bound, "key the workload identity is bound to")]
    for grant, given, error in cases:
        with pytest.raises(DPoPBindingRequired, match=error) as info:
            enforce_binding(grant, given)
        assert info.value.rule_id == "rule-1"
    assert replace(bound, jkt="x").jkt == "x"  # frozen value type, copied not mutated
