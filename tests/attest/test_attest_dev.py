"""The trial-only dev issuer: key file handling, minting, and verification through the Attestor."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import jwt
import pytest
from jwcrypto import jwk as jwcrypto_jwk
from jwcrypto import jwt as jwcrypto_jwt

from broker.attest.dev import DEV_ISSUER, DEV_KEY_FILE, DevIssuer
from broker.attest.verifier import Attestor
from broker.errors import AttestationError, ConfigError, ReplayDetected
from tests.helpers import run


def test_key_file_created_0600_and_reused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = DevIssuer.load_or_create(data_dir)
    path = data_dir / DEV_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert b"PRIVATE KEY" in path.read_bytes()
    second = DevIssuer.load_or_create(data_dir)
    assert second.kid == first.kid
    assert [p.name for p in data_dir.iterdir()] == [DEV_KEY_FILE]  # no temporary file left behind


def test_concurrent_creation_agrees_on_one_key(tmp_path: Path) -> None:
    kids: list[str] = []
    barrier = threading.Barrier(8)

    def create() -> None:
        barrier.wait()
        kids.append(DevIssuer.load_or_create(tmp_path).kid)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(kids) == 8 and len(set(kids)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [DEV_KEY_FILE]


def test_group_readable_key_refused(tmp_path: Path) -> None:
    DevIssuer.load_or_create(tmp_path)
    os.chmod(tmp_path / DEV_KEY_FILE, 0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        DevIssuer.load_or_create(tmp_path)


def test_symlinked_key_refused(tmp_path: Path) -> None:
    DevIssuer.load_or_create(tmp_path / "real")
    (tmp_path / "link").mkdir()
    os.symlink(tmp_path / "real" / DEV_KEY_FILE, tmp_path / "link" / DEV_KEY_FILE)
    with pytest.raises(ConfigError, match="cannot be opened as a key file"):
        DevIssuer.load_or_create(tmp_path / "link")


def test_garbage_key_file_refused(tmp_path: Path) -> None:
    path = tmp_path / DEV_KEY_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not a key")
    os.close(fd)
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        DevIssuer.load_or_create(tmp_path)


def test_jwks_is_public_and_kid_is_the_rfc7638_thumbprint(tmp_path: Path) -> None:
    dev = DevIssuer.load_or_create(tmp_path)
    jwks = dev.jwks()
    (key,) = jwks["keys"]
    assert "d" not in key
    assert key["kid"] == dev.kid == jwcrypto_jwk.JWK(**key).thumbprint()
    assert (key["kty"], key["crv"], key["alg"], key["use"]) == ("EC", "P-256", "ES256", "sig")
    assert repr(dev) == f"DevIssuer(kid={dev.kid!r})"  # never the private key


def test_minted_token_shape(tmp_path: Path, clock: Any, kit: Any) -> None:
    dev = DevIssuer.load_or_create(tmp_path)
    token = dev.mint("spiffe://example.org/assistants/refund-bot", kit.AUDIENCE, ttl=120, clock=clock)
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "ES256", "typ": "JWT", "kid": dev.kid}
    # An independent JOSE implementation verifies it with the published JWKS.
    keyset = jwcrypto_jwk.JWKSet.from_json(json.dumps(dev.jwks()))
    checked = jwcrypto_jwt.JWT(jwt=token, key=keyset, algs=["ES256"], check_claims=False)
    claims = json.loads(checked.claims)
    assert claims["iss"] == DEV_ISSUER
    assert claims["sub"] == "spiffe://example.org/assistants/refund-bot"
    assert claims["aud"] == kit.AUDIENCE
    assert (claims["iat"], claims["exp"]) == (kit.NOW, kit.NOW + 120)
    assert len(claims["jti"]) >= 22  # 128 random bits, base64url


def test_mint_refuses_bad_input(tmp_path: Path, clock: Any, kit: Any) -> None:
    dev = DevIssuer.load_or_create(tmp_path)
    with pytest.raises(ValueError, match="dot segments"):
        dev.mint("spiffe://example.org/../admin", kit.AUDIENCE, clock=clock)
    for ttl in (0, 3601, True):
        with pytest.raises(ValueError, match="ttl"):
            dev.mint("spiffe://example.org/a", kit.AUDIENCE, ttl=ttl, clock=clock)


def test_mint_then_verify_round_trip(tmp_path: Path, clock: Any, store: Any, kit: Any) -> None:
    dev = DevIssuer.load_or_create(tmp_path)
    attestor = Attestor(
        [dev.issuer_config(kit.AUDIENCE)], store, clock, jwks_sources={dev.issuer: dev.jwks_source()}
    )
    ids = [
        "spiffe://example.org/assistants/refund-bot",
        "spiffe://other.test/a/b/c",
        "spiffe://td",
        "spiffe://x_y-z.0/A.B-C_D/..e/f..",
    ]
    for spiffe_id in ids:
        token = dev.mint(spiffe_id, kit.AUDIENCE, clock=clock)
        identity = run(attestor.verify(token, kit.JWT_TYPE))
        assert identity.spiffe_id == spiffe_id
        assert identity.method == "dev"
        assert identity.issuer == DEV_ISSUER
        assert identity.expires_at == kit.NOW + 300
        with pytest.raises(ReplayDetected):
            run(attestor.verify(token, kit.JWT_TYPE))


def test_dev_trust_domain_restriction(tmp_path: Path, clock: Any, store: Any, kit: Any) -> None:
    dev = DevIssuer.load_or_create(tmp_path)
    attestor = Attestor(
        [dev.issuer_config(kit.AUDIENCE, trust_domain="dev.local")],
        store,
        clock,
        jwks_sources={dev.issuer: dev.jwks_source()},
    )
    assert run(attestor.verify(dev.mint("spiffe://dev.local/bot", kit.AUDIENCE, clock=clock), kit.JWT_TYPE))
    with pytest.raises(AttestationError, match="trust domain does not match"):
        run(attestor.verify(dev.mint("spiffe://example.org/bot", kit.AUDIENCE, clock=clock), kit.JWT_TYPE))


def test_dev_token_for_another_audience_refused(tmp_path: Path, clock: Any, store: Any, kit: Any) -> None:
    dev = DevIssuer.load_or_create(tmp_path)
    attestor = Attestor(
        [dev.issuer_config(kit.AUDIENCE)], store, clock, jwks_sources={dev.issuer: dev.jwks_source()}
    )
    with pytest.raises(AttestationError, match="audience mismatch"):
        run(attestor.verify(dev.mint("spiffe://dev.local/bot", "https://elsewhere", clock=clock), kit.JWT_TYPE))


def test_another_dev_key_is_not_trusted(tmp_path: Path, clock: Any, store: Any, kit: Any) -> None:
    ours = DevIssuer.load_or_create(tmp_path / "ours")
    theirs = DevIssuer.load_or_create(tmp_path / "theirs")
    attestor = Attestor(
        [ours.issuer_config(kit.AUDIENCE)], store, clock, jwks_sources={ours.issuer: ours.jwks_source()}
    )
    with pytest.raises(AttestationError, match="no issuer key matches"):
        run(attestor.verify(theirs.mint("spiffe://dev.local/bot", kit.AUDIENCE, clock=clock), kit.JWT_TYPE))
