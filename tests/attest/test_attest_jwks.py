"""JWKS parsing, caching, rotation and rate limiting, against a real local HTTP server."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwcrypto import jwk as jwcrypto_jwk
from jwt.algorithms import get_default_algorithms

from broker.attest.issuers import IssuerConfig
from broker.attest.jwks import JwksError, JwksSource, jwk_thumbprint, parse_jwks
from broker.attest.verifier import Attestor
from broker.errors import AttestationError, ConfigError, TemporarilyUnavailable
from tests.helpers import run

# --- parsing ---------------------------------------------------------------------------------


def _private_jwk(key: Any, alg: str) -> dict[str, Any]:
    return json.loads(get_default_algorithms()[alg].to_jwk(key))


@pytest.mark.parametrize("alg", ["ES256", "RS256"])
def test_jwks_with_private_key_refused(alg: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1()) if alg == "ES256" else rsa.generate_private_key(65537, 2048)
    private = _private_jwk(key, alg)
    assert "d" in private
    with pytest.raises(JwksError, match="private or symmetric key material"):
        parse_jwks({"keys": [private]})
    with pytest.raises(ConfigError, match="private or symmetric key material"):
        JwksSource.from_jwks({"keys": [private]})


def test_jwks_with_symmetric_key_refused() -> None:
    with pytest.raises(JwksError, match="private or symmetric"):
        parse_jwks({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]})


def test_private_member_alone_refuses_the_set(kit: Any) -> None:
    good = kit.make_signer("ES256").public_jwk
    with pytest.raises(JwksError):
        parse_jwks({"keys": [good, {**kit.make_signer("ES256").public_jwk, "d": "AAAA"}]})


def test_unusable_keys_are_skipped(kit: Any) -> None:
    good = kit.make_signer("ES256").public_jwk
    small_rsa = json.loads(
        get_default_algorithms()["RS256"].to_jwk(rsa.generate_private_key(65537, 1024).public_key())  # noqa: S505 (must be refused)
    )
    off_curve = {**kit.make_signer("ES256").public_jwk, "kid": "off"}
    off_curve["y"] = off_curve["x"]
    keys = parse_jwks(
        {
            "keys": [
                good,
                {**kit.make_signer("ES256").public_jwk, "use": "enc"},
                {**kit.make_signer("ES256").public_jwk, "key_ops": ["encrypt"]},
                {**kit.make_signer("ES256").public_jwk, "alg": "HS256"},
                {**kit.make_signer("ES256").public_jwk, "alg": "RS256"},  # alg contradicts kty
                {**small_rsa, "kid": "small"},
                off_curve,
                {"kty": "EC", "crv": "secp256k1", "x": "AA", "y": "AA", "kid": "k1"},
                {"kty": "OKP", "crv": "X25519", "x": "AA", "kid": "x"},
                {"kty": "RSA", "kid": "no-n", "e": "AQAB"},
                {"kty": "XYZ", "kid": "z"},
                {**kit.make_signer("ES256").public_jwk, "kid": 5},
                {**kit.make_signer("ES256").public_jwk, "x": "not base64!"},
            ]
        }
    )
    assert [k.kid for k in keys] == [good["kid"]]


def test_duplicate_kid_is_dropped(kit: Any) -> None:
    a = {**kit.make_signer("ES256").public_jwk, "kid": "same"}
    b = {**kit.make_signer("ES256").public_jwk, "kid": "same"}
    c = kit.make_signer("EdDSA").public_jwk
    assert [k.kid for k in parse_jwks({"keys": [a, b, c]})] == [c["kid"]]


@pytest.mark.parametrize(
    ("document", "says"),
    [
        (b"[]", "'keys' array"),
        (b'{"keys": {}}', "'keys' array"),
        (b'{"keys": [1]}', "must be an object"),
        (b'{"keys": [], "keys": []}', "duplicate member 'keys'"),
        (b"\xff", "not UTF-8 JSON"),
        (b'{"keys": [NaN]}', "non-standard JSON constant"),
    ],
)
def test_malformed_jwks_refused(document: bytes, says: str) -> None:
    with pytest.raises(JwksError, match=says):
        parse_jwks(document)


@pytest.mark.parametrize("alg", ["ES256", "ES384", "ES512", "RS256", "EdDSA"])
def test_thumbprint_matches_jwcrypto(kit: Any, alg: str) -> None:
    public = kit.make_signer(alg, kid=None).public_jwk
    assert jwk_thumbprint(public) == jwcrypto_jwk.JWK(**public).thumbprint()


def test_thumbprint_ignores_optional_members(kit: Any) -> None:
    public = kit.make_signer("ES256", kid=None).public_jwk
    assert jwk_thumbprint({**public, "kid": "x", "use": "sig"}) == jwk_thumbprint(public)


# --- HTTP source -----------------------------------------------------------------------------


def _source(server: Any, clock: Any, **kw: Any) -> JwksSource:
    return JwksSource(jwks_url=server.url, clock=clock, cache_ttl=300, refresh_min_interval=30, **kw)


def test_fetch_and_cache(jwks_server: Any, clock: Any, kit: Any) -> None:
    a = kit.make_signer("ES256")
    jwks_server.document = a.jwks()
    source = _source(jwks_server, clock)
    try:
        for _ in range(5):
            assert source.get_key(a.kid).kid == a.kid
        assert jwks_server.requests == 1
        clock.advance(300)  # cache_ttl reached: fetch again
        assert source.get_key(a.kid).kid == a.kid
        assert jwks_server.requests == 2
    finally:
        source.close()


def test_rotation_unknown_kid_triggers_one_refetch(jwks_server: Any, clock: Any, kit: Any) -> None:
    a, b = kit.make_signer("ES256"), kit.make_signer("ES256")
    jwks_server.document = a.jwks()
    source = _source(jwks_server, clock)
    try:
        source.get_key(a.kid)
        assert jwks_server.requests == 1
        jwks_server.document = {"keys": [a.public_jwk, b.public_jwk]}  # the issuer rotates
        clock.advance(31)
        assert source.get_key(b.kid).kid == b.kid
        assert jwks_server.requests == 2
        assert source.get_key(a.kid).kid == a.kid
        assert jwks_server.requests == 2
    finally:
        source.close()


def test_flood_of_unknown_kids_is_rate_limited(jwks_server: Any, clock: Any, kit: Any) -> None:
    a = kit.make_signer("ES256")
    jwks_server.document = a.jwks()
    source = _source(jwks_server, clock)
    try:
        source.get_key(a.kid)
        clock.advance(31)
        for _ in range(200):
            with pytest.raises(AttestationError, match="no issuer key matches"):
                source.get_key(secrets.token_hex(8))
            clock.advance(0.1)  # 20 s of flood: inside one refresh interval
        assert jwks_server.requests == 2  # the first fetch + one refetch
        clock.advance(11)
        for _ in range(50):
            with pytest.raises(AttestationError):
                source.get_key(secrets.token_hex(8))
        assert jwks_server.requests == 3
        assert source.get_key(a.kid).kid == a.kid  # known keys keep working throughout
    finally:
        source.close()


def test_server_down_with_nothing_cached_is_unavailable(jwks_server: Any, clock: Any, kit: Any) -> None:
    source = _source(jwks_server, clock, timeout=2.0)
    jwks_server.stop()
    try:
        with pytest.raises(TemporarilyUnavailable, match="issuer keys unavailable"):
            source.get_key("any")
    finally:
        source.close()


def test_server_error_with_nothing_cached_is_unavailable(jwks_server: Any, clock: Any) -> None:
    jwks_server.status = 500
    source = _source(jwks_server, clock)
    try:
        with pytest.raises(TemporarilyUnavailable):
            source.get_key("any")
        # A down issuer is not retried on every request either.
        with pytest.raises(TemporarilyUnavailable):
            source.get_key("any")
        assert jwks_server.requests == 1
        clock.advance(30)
        jwks_server.status = 200
        jwks_server.document = {"keys": []}
        with pytest.raises(AttestationError, match="no issuer key matches"):
            source.get_key("any")
        assert jwks_server.requests == 2
    finally:
        source.close()


def test_server_down_with_valid_cache_keeps_the_cache(jwks_server: Any, clock: Any, kit: Any) -> None:
    a = kit.make_signer("ES256")
    jwks_server.document = a.jwks()
    source = _source(jwks_server, clock, timeout=2.0)
    try:
        source.get_key(a.kid)
        jwks_server.stop()
        clock.advance(60)
        assert source.get_key(a.kid).kid == a.kid
        with pytest.raises(AttestationError, match="no issuer key matches"):
            source.get_key("rotated-in")  # refetch fails, cache stays: unknown kid, not 503
        clock.advance(240)  # the cache expires and the issuer is still down: fail closed
        with pytest.raises(TemporarilyUnavailable):
            source.get_key(a.kid)
    finally:
        source.close()


@pytest.mark.parametrize("send_length", [True, False])
def test_oversize_jwks_refused(jwks_server: Any, clock: Any, kit: Any, send_length: bool) -> None:
    a = kit.make_signer("ES256")
    doc = {"keys": [a.public_jwk], "padding": "x" * (64 * 1024)}
    jwks_server.document = json.dumps(doc).encode()
    jwks_server.send_length = send_length
    source = _source(jwks_server, clock)
    try:
        with pytest.raises(TemporarilyUnavailable):
            source.get_key(a.kid)
    finally:
        source.close()


def test_private_key_served_over_http_refused(jwks_server: Any, clock: Any) -> None:
    jwks_server.document = {"keys": [_private_jwk(ec.generate_private_key(ec.SECP256R1()), "ES256")]}
    source = _source(jwks_server, clock)
    try:
        with pytest.raises(TemporarilyUnavailable):
            source.get_key(None)
    finally:
        source.close()


def test_redirect_not_followed(jwks_server: Any, clock: Any) -> None:
    jwks_server.redirect_to = "http://example.invalid/jwks.json"
    source = _source(jwks_server, clock)
    try:
        with pytest.raises(TemporarilyUnavailable):
            source.get_key(None)
    finally:
        source.close()


def test_attestor_end_to_end_over_http_with_rotation(
    jwks_server: Any, clock: Any, store: Any, kit: Any
) -> None:
    a, b = kit.make_signer("ES256"), kit.make_signer("RS256")
    jwks_server.document = a.jwks()
    config = IssuerConfig(
        issuer=kit.SPIFFE_ISS,
        kind="spiffe-jwt",
        audience=kit.AUDIENCE,
        jwks_url=jwks_server.url,
        trust_domain="example.org",
    )
    attestor = Attestor([config], store, clock)
    try:
        assert run(attestor.verify(a.sign(kit.claims()), kit.JWT_TYPE)).method == "spiffe-jwt"
        jwks_server.document = {"keys": [a.public_jwk, b.public_jwk]}
        with pytest.raises(AttestationError, match="no issuer key matches"):
            run(attestor.verify(b.sign(kit.claims()), kit.JWT_TYPE))  # within the refresh interval
        clock.advance(30)
        assert run(attestor.verify(b.sign(kit.claims()), kit.JWT_TYPE)).method == "spiffe-jwt"
        assert jwks_server.requests == 2
    finally:
        attestor.close()


def test_file_source_reads_without_fetch_permission(tmp_path: Path, clock: Any, kit: Any) -> None:
    a = kit.make_signer("ES256")
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(a.jwks()))
    source = JwksSource(jwks_file=path, clock=clock)
    assert source.get_key(a.kid, may_fetch=False).kid == a.kid


# --- file source -----------------------------------------------------------------------------


def test_file_source_rotation(tmp_path: Path, clock: Any, kit: Any) -> None:
    a, b = kit.make_signer("ES256"), kit.make_signer("EdDSA")
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(a.jwks()))
    source = JwksSource(jwks_file=path, clock=clock, cache_ttl=300, refresh_min_interval=30)
    assert source.get_key(a.kid).kid == a.kid
    path.write_text(json.dumps(b.jwks()))
    clock.advance(30)
    assert source.get_key(b.kid).kid == b.kid
    with pytest.raises(AttestationError):
        source.get_key(a.kid)  # the old key left the set


def test_missing_file_is_unavailable(tmp_path: Path, clock: Any) -> None:
    source = JwksSource(jwks_file=tmp_path / "absent.json", clock=clock)
    with pytest.raises(TemporarilyUnavailable):
        source.keys()


def test_static_source_never_refetches(kit: Any) -> None:
    a = kit.make_signer("ES256", kid=None)
    source = JwksSource.from_jwks(a.jwks())
    assert source.get_key(None).kty == "EC"
    with pytest.raises(AttestationError):
        source.get_key("other")


def test_source_needs_exactly_one_location(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        JwksSource()
    with pytest.raises(ConfigError):
        JwksSource(jwks_url="https://x.example/jwks", jwks_file=tmp_path / "j.json")
