"""broker.attest.jwt_checks shortcuts decide exactly as the long way: ES256 signatures checked without
pyjwt's per-token objects agree with pyjwt's ECAlgorithm.verify, and memoised headers are the parse."""

from __future__ import annotations

import base64
import json
import random

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from broker.attest import jwt_checks
from broker.attest.jwt_checks import peek_unverified, verify_signature
from broker.errors import AttestationError

# The order of the P-256 group (SEC 2 §2.4.2).
N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def pyjwt_says(token: str, key: ec.EllipticCurvePublicKey) -> bool:
    signing_input, _, signature = token.rpartition(".")
    algorithm = jwt.get_algorithm_by_name("ES256")
    raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    return bool(algorithm.verify(signing_input.encode(), algorithm.prepare_key(key), raw))


def we_say(token: str, key: object) -> bool:
    try:
        verify_signature(token, key, "ES256")
    except AttestationError as exc:
        assert str(exc) == "signature verification failed"
        return False
    return True


def signatures(token: str) -> list[bytes]:
    """The token's signature and hostile variants of it."""
    raw = base64.urlsafe_b64decode(token.rpartition(".")[2] + "==")
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    rng = random.Random(r)
    flipped = [bytes(b ^ (1 << rng.randrange(8)) if i == j else b for i, b in enumerate(raw)) for j in (0, 31, 32, 63)]
    return [
        raw, *flipped, raw[:63], raw + b"\x00", b"\x00" + raw, b"", raw * 2,
        (0).to_bytes(32, "big") + raw[32:], raw[:32] + (0).to_bytes(32, "big"),
        N.to_bytes(32, "big") + raw[32:], raw[:32] + N.to_bytes(32, "big"),
        raw[:32] + (N - s).to_bytes(32, "big"),  # the other valid s (OpenSSL accepts high s; so does pyjwt)
        (r + N).to_bytes(32, "big") + raw[32:] if r + N < 2**256 else raw[32:] + raw[:32],
        raw[32:] + raw[:32],
    ]


def test_es256_agrees_with_pyjwt_on_valid_and_hostile_signatures() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    for i in range(20):
        token = jwt.encode({"i": i}, key, algorithm="ES256")
        signing_input = token.rpartition(".")[0]
        for raw in signatures(token):
            forged = f"{signing_input}.{b64(raw)}"
            for public in (key.public_key(), other):
                assert we_say(forged, public) == pyjwt_says(forged, public), (i, raw.hex())
        assert we_say(token, key.public_key())


def test_es256_with_a_key_of_another_curve_takes_pyjwts_path() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    token = jwt.encode({"a": 1}, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")
    with pytest.raises(AttestationError):
        verify_signature(token, key.public_key(), "ES256")


def test_memoised_header_is_a_fresh_copy_of_the_parse() -> None:
    jwt_checks._HEADER_MEMO.clear()
    header = b64(json.dumps({"alg": "ES256", "kid": "k1", "typ": "JWT"}).encode())
    token = f"{header}.{b64(b'{}')}.{b64(b'sig')}"
    first, _ = peek_unverified(token)
    first["alg"] = "none"  # a caller's change never reaches the next caller
    second, _ = peek_unverified(token)
    assert second == {"alg": "ES256", "kid": "k1", "typ": "JWT"}
    assert header in jwt_checks._HEADER_MEMO


@pytest.mark.parametrize(
    ("header", "says"),
    [
        ('{"alg":"ES256","alg":"none"}', "duplicate header parameter 'alg'"),
        ('{"alg":"ES256","n":1e999}', "refused"),
        ('["ES256"]', "not a JSON object"),
    ],
)
def test_refused_headers_are_never_memoised(header: str, says: str) -> None:
    token = f"{b64(header.encode())}.{b64(b'{}')}.{b64(b'sig')}"
    for _ in range(2):
        with pytest.raises(AttestationError, match=says):
            peek_unverified(token)
    assert b64(header.encode()) not in jwt_checks._HEADER_MEMO


def test_header_memo_is_bounded_and_keeps_only_flat_headers() -> None:
    for i in range(jwt_checks._HEADER_MEMO_SIZE + 5):
        peek_unverified(f"{b64(json.dumps({'alg': 'ES256', 'kid': f'k{i}'}).encode())}.{b64(b'{}')}.{b64(b'sig')}")
    assert len(jwt_checks._HEADER_MEMO) <= jwt_checks._HEADER_MEMO_SIZE
    nested = b64(b'{"alg":"ES256","x":{"y":1}}')
    peek_unverified(f"{nested}.{b64(b'{}')}.{b64(b'sig')}")
    assert nested not in jwt_checks._HEADER_MEMO
