"""The SDK's JOSE pieces against RFC vectors and an independent JOSE library (jwcrypto), both ways:
proofs made by the SDK verify at the broker, and proofs made by jwcrypto verify in the SDK."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwcrypto import jwk as jwcrypto_jwk
from jwcrypto import jwt as jwcrypto_jwt
from nhi_broker_client import DPoPKey, InMemoryReplayCache, InvalidDPoPError, access_token_hash, jwk_thumbprint
from nhi_broker_client._dpop import verify_resource_proof
from nhi_broker_client._jose import normalize_htu, public_key_from_jwk

from broker.clock import SystemClock
from broker.dpop import DPoPVerifier
from broker.state.sqlite import SqliteStateStore
from tests.helpers import run

RFC9449_JWK = {"kty": "EC", "x": "l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs",
               "y": "9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA", "crv": "P-256"}
URL = "https://payments.example/refunds"


def test_thumbprint_rfc9449_vector_and_jwcrypto() -> None:
    assert jwk_thumbprint(RFC9449_JWK) == "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
    for _ in range(5):
        key = DPoPKey.generate()
        assert key.jkt == jwcrypto_jwk.JWK(**key.public_jwk).thumbprint()


def test_sdk_proofs_verify_at_the_broker(tmp_path: Path) -> None:
    store = SqliteStateStore(tmp_path / "s.sqlite3")
    try:
        key = DPoPKey.generate()
        proof = key.proof("post", "HTTPS://Broker.Example:443/v1/token?q=1")
        verified = run(DPoPVerifier(store, SystemClock()).verify(proof, htm="POST", htu="https://broker.example/v1/token"))
        assert verified.jkt == key.jkt
    finally:
        store.close_now()


def _jwcrypto_proof(key: jwcrypto_jwk.JWK, alg: str, token: str, **claims: object) -> str:
    body = {"jti": f"j-{time.monotonic_ns()}", "htm": "POST", "htu": URL, "iat": int(time.time()),
            "ath": access_token_hash(token), **claims}
    header = {"typ": "dpop+jwt", "alg": alg, "jwk": json.loads(key.export_public())}
    proof = jwcrypto_jwt.JWT(header=header, claims=body)
    proof.make_signed_token(key)
    return str(proof.serialize())


@pytest.mark.parametrize(("kty", "alg"), [("EC", "ES256"), ("OKP", "EdDSA"), ("RSA", "PS256")])
def test_jwcrypto_proofs_verify_in_the_sdk(kty: str, alg: str) -> None:
    params = {"EC": {"crv": "P-256"}, "OKP": {"crv": "Ed25519"}, "RSA": {"size": 2048}}[kty]
    key = jwcrypto_jwk.JWK.generate(kty=kty, **params)
    replay = InMemoryReplayCache()
    token = "a.b.c"
    proof = _jwcrypto_proof(key, alg, token)
    args = {"htm": "POST", "htu": URL, "access_token": token, "jkt": key.thumbprint(), "now": time.time(),
            "max_age": 60, "leeway": 5, "algorithms": ("ES256", "EdDSA", "PS256"), "replay": replay}
    verify_resource_proof(proof, **args)  # type: ignore[arg-type]
    with pytest.raises(InvalidDPoPError, match="already been used"):
        verify_resource_proof(proof, **args)  # type: ignore[arg-type]
    with pytest.raises(InvalidDPoPError, match="'ath' does not match"):
        verify_resource_proof(_jwcrypto_proof(key, alg, "other.token.x"), **args)  # type: ignore[arg-type]


def test_jwk_refusals() -> None:
    private = json.loads(jwcrypto_jwk.JWK.from_pyca(ec.generate_private_key(ec.SECP256R1())).export_private())
    small_rsa = json.loads(jwcrypto_jwk.JWK.from_pyca(rsa.generate_private_key(65537, 1024).public_key()).export())  # noqa: S505 - the refused input
    for jwk, alg, why in [
        (private, "ES256", "private or symmetric"),
        ({"kty": "oct", "k": "c2VjcmV0"}, "ES256", "private or symmetric"),
        (RFC9449_JWK, "ES384", "does not fit"),
        (RFC9449_JWK, "EdDSA", "does not fit"),
        ({**RFC9449_JWK, "alg": "ES384"}, "ES256", "pinned to another alg"),
        ({**RFC9449_JWK, "x": "AAAA"}, "ES256", "not a valid key"),
        (small_rsa, "PS256", "2048 to 8192 bits"),
    ]:
        with pytest.raises(ValueError, match=why):
            public_key_from_jwk(jwk, alg)


@pytest.mark.parametrize(("given", "normal"), [
    ("https://a.example", "https://a.example/"),
    ("HTTP://A.Example:80/x?y#z", "http://a.example/x"),
    ("https://a.example/a/./b/../c", "https://a.example/a/c"),
    ("https://a.example/%7euser/%2f", "https://a.example/~user/%2F"),
])
def test_htu_normalisation_matches_the_broker(given: str, normal: str) -> None:
    from broker.dpop import normalize_htu as broker_normalize

    assert normalize_htu(given) == broker_normalize(given) == normal
