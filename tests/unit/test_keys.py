"""Signing keys: RFC 7638 thumbprint vector, file modes, rotation."""

from __future__ import annotations

import os
import stat

import pytest

from broker.clock import FixedClock
from broker.errors import ConfigError
from broker.mint.keys import KeySet, jwk_thumbprint, load_or_create_private_key, public_jwk

# RFC 7638 §3.1: the example RSA key and its SHA-256 thumbprint.
RFC7638_JWK = {
    "kty": "RSA",
    "n": (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECP"
        "ebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY"
        "368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0f"
        "M4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    ),
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}


def test_rfc7638_thumbprint_vector() -> None:
    assert jwk_thumbprint(RFC7638_JWK) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_thumbprint_ignores_optional_members() -> None:
    bare = {k: RFC7638_JWK[k] for k in ("kty", "n", "e")}
    assert jwk_thumbprint(bare) == jwk_thumbprint(RFC7638_JWK)


@pytest.mark.parametrize("jwk", [{"kty": "oct", "k": "AAAA"}, {"kty": "EC", "crv": "P-256", "x": "AA"}, {}])
def test_thumbprint_refuses_symmetric_and_incomplete_keys(jwk: dict) -> None:
    with pytest.raises((ValueError, KeyError)):
        jwk_thumbprint(jwk)


def test_key_file_created_0600_and_reused(tmp_path) -> None:
    path = tmp_path / "k" / "key.pem"
    key, created = load_or_create_private_key(path, "ES256")
    assert created
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again, created_again = load_or_create_private_key(path, "ES256")
    assert not created_again
    assert public_jwk(again)["kid"] == public_jwk(key)["kid"]


def test_world_readable_key_is_refused(tmp_path) -> None:
    path = tmp_path / "key.pem"
    load_or_create_private_key(path, "EdDSA")
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        load_or_create_private_key(path, "EdDSA")


def test_public_jwk_has_no_private_members(tmp_path) -> None:
    key, _ = load_or_create_private_key(tmp_path / "key.pem", "ES256")
    jwk = public_jwk(key)
    assert "d" not in jwk
    assert jwk["kid"] == jwk_thumbprint(jwk)
    assert (jwk["kty"], jwk["crv"], jwk["alg"]) == ("EC", "P-256", "ES256")


def test_rotation_keeps_previous_key_published(tmp_path) -> None:
    clock = FixedClock(1_900_000_000)
    keys = KeySet(tmp_path / "token", clock=clock)
    first = keys.active.kid
    keys.rotate()
    clock.advance(100)
    keys.rotate()
    published = [k["kid"] for k in keys.jwks()["keys"]]
    assert published[0] == keys.active.kid
    assert len(published) == 2 and first not in published
    reloaded = KeySet(tmp_path / "token", clock=clock)
    assert reloaded.active.kid == keys.active.kid and not reloaded.created


def test_rotated_key_is_published_before_it_signs(tmp_path) -> None:
    """publish-then-sign: the new key is in the JWKS at once, signs only from signs_from on, and the
    key it replaces stays published after."""
    clock = FixedClock(1_900_000_000)
    keys = KeySet(tmp_path / "token", clock=clock)
    old = keys.active
    new = keys.rotate(publish_for=360)
    assert new.signs_from == 1_900_000_360
    assert keys.active.kid == old.kid  # (1) the old key still signs
    assert [k["kid"] for k in keys.jwks()["keys"]] == [new.kid, old.kid]  # (2) the new one is published
    assert (keys.state(new), keys.state(old)) == ("pending", "active")
    clock.advance(359)
    assert keys.active.kid == old.kid
    clock.advance(1)
    assert keys.active.kid == new.kid  # (3) it signs once its time has come ...
    assert [k["kid"] for k in keys.jwks()["keys"]] == [new.kid, old.kid]  # ... the old one still verifies
    assert (keys.state(new), keys.state(old)) == ("active", "published")


def test_refresh_takes_up_keys_another_process_rotated(tmp_path) -> None:
    clock = FixedClock(1_900_000_000)
    running = KeySet(tmp_path / "token", clock=clock)
    old = running.active
    new = KeySet(tmp_path / "token", clock=clock).rotate(publish_for=60)  # `keys rotate` elsewhere
    assert new.kid not in [k["kid"] for k in running.jwks()["keys"]]
    assert [k.kid for k in running.refresh()] == [new.kid]
    assert running.refresh() == []  # read once
    assert [k["kid"] for k in running.jwks()["keys"]] == [new.kid, old.kid] and running.active.kid == old.kid
    clock.advance(60)
    assert running.active.kid == new.kid


def test_refresh_reports_an_unusable_key_file_once_and_keeps_signing(tmp_path, caplog) -> None:
    clock = FixedClock(1_900_000_000)
    running = KeySet(tmp_path / "token", clock=clock)
    active = running.active
    bad = tmp_path / "token" / "001900000000-readable.pem"
    bad.write_text("not a key")
    os.chmod(bad, 0o644)
    assert running.refresh() == [] and running.refresh() == []
    assert "mode 644" in running.refused[bad.name]
    assert len([r for r in caplog.records if f"key file {bad.name} is not used" in r.getMessage()]) == 1
    assert running.active.kid == active.kid
