"""broker.mint.jwt: task tokens built without pyjwt's encoder have the header and payload bytes jwt.encode
writes, pyjwt and the SDK's TaskTokenVerifier accept them, and the ledger's digest is of the signed claims."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from nhi_broker_client import TaskTokenVerifier

from broker.clock import FixedClock
from broker.csprng import RandomPool
from broker.jcs import canonical_json
from broker.mint.jwt import TaskTokenMinter, _der_to_raw_p256
from broker.mint.keys import KeySet
from broker.models import Grant, Intent, RegisteredWorkload, WorkloadIdentity
from broker.strict_json import loads_strict

NOW = 1_800_000_000
ISSUER = "http://127.0.0.1"
SPIFFE = "spiffe://example.org/ns/support/sa/support-assistant"
TXN = "ab" * 32


def grant(context: dict[str, Any] | None = None, now: int = NOW) -> Grant:
    identity = WorkloadIdentity(SPIFFE, "urn:issuer", "dev", SPIFFE, "sha256:00", now + 300)
    workload = RegisteredWorkload("support-assistant", SPIFFE, "team-support", (), ("orders-api",))
    intent = Intent("orders.read", "customers/c-42/orders/ord-1001", context or {"customer": "c-42"})
    return Grant(identity, workload, intent, "orders-api", "rule-1", 600, "jwt", "sha256:00")


def segments(token: str) -> list[bytes]:
    return [base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)) for part in token.split(".")]


@pytest.fixture(params=["ES256", "EdDSA"])
def keys(request: pytest.FixtureRequest, tmp_path: Path) -> KeySet:
    return KeySet(tmp_path / "keys", alg=request.param, clock=FixedClock(NOW))


@pytest.fixture
def minter(keys: KeySet) -> TaskTokenMinter:
    return TaskTokenMinter(keys, ISSUER, clock=FixedClock(NOW))


CONTEXTS = [
    {"customer": "c-42"},
    {"customer": "c-42", "amount": 20.5, "currency": "EUR"},  # a float: the reference canonicaliser
    {"customer": "Zoë ✓ \U0001f600", "note": 'quote " backslash \\ newline \n'},  # non-ASCII, escapes
]


@pytest.mark.parametrize("context", CONTEXTS)
def test_pyjwt_verifies_and_the_digest_is_of_the_signed_claims(
    keys: KeySet, tmp_path: Path, context: dict[str, Any]
) -> None:
    # Minted at the real time: pyjwt checks exp, iat and nbf on its own clock.
    now = int(time.time())
    keys = KeySet(tmp_path / "live-keys", alg=keys.active.alg, clock=FixedClock(now))
    minter = TaskTokenMinter(keys, ISSUER, clock=FixedClock(now))
    prepared = minter.prepare(grant(context, now))
    digest = prepared.claims_sha256()
    token = minter.sign(prepared, txn=TXN)
    key = keys.active
    public = key.private_key.public_key()
    header = jwt.get_unverified_header(token)
    assert header == {"alg": prepared.alg, "kid": prepared.kid, "typ": "at+jwt"}
    claims = jwt.decode(token, public, algorithms=[prepared.alg], audience="orders-api", issuer=ISSUER,
                        options={"require": ["exp", "iat", "nbf", "jti"]})
    assert claims == {**prepared.claims, "txn": TXN}
    # What `audit prove` recomputes from a token: the canonical claims without txn.
    without_txn = {k: v for k, v in claims.items() if k != "txn"}
    assert digest == "sha256:" + hashlib.sha256(canonical_json(without_txn)).hexdigest()
    assert digest == "sha256:" + hashlib.sha256(canonical_json(prepared.claims)).hexdigest()
    # The header and payload bytes are the ones jwt.encode writes (only the signature differs).
    reference = jwt.encode({**prepared.claims, "txn": TXN}, key.private_key, algorithm=prepared.alg,
                           headers={"typ": "at+jwt", "kid": key.kid})
    assert token.split(".")[:2] == reference.split(".")[:2]
    assert loads_strict(segments(token)[1]) == claims


def test_a_txn_among_the_extra_claims_is_replaced_not_repeated(minter: TaskTokenMinter) -> None:
    prepared = minter.prepare(grant(), extra_claims={"txn": "forged", "num_uses": 1})
    token = minter.sign(prepared, txn=TXN)
    assert loads_strict(segments(token)[1])["txn"] == TXN  # strict: a repeated name would raise


def test_es256_signature_is_raw_r_s(tmp_path: Path) -> None:
    keys = KeySet(tmp_path / "keys", alg="ES256", clock=FixedClock(NOW))
    minter = TaskTokenMinter(keys, ISSUER, clock=FixedClock(NOW))
    public = keys.active.private_key.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    for _ in range(50):
        token = minter.sign(minter.prepare(grant()), txn=TXN)
        signing_input, _, _ = token.rpartition(".")
        raw = segments(token)[2]
        assert len(raw) == 64
        der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
        public.verify(der, signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize(
    ("r", "s"),
    [(1, 1), (2**255, 2**255 - 1), (2**256 - 1, 1), (0x7F, 0x80), (2**248, 2**247), (12345, 2**256 - 2**224)],
)
def test_der_to_raw_matches_the_der_decoder(r: int, s: int) -> None:
    der = encode_dss_signature(r, s)
    assert _der_to_raw_p256(der) == r.to_bytes(32, "big") + s.to_bytes(32, "big")
    assert decode_dss_signature(der) == (r, s)


def test_der_to_raw_of_real_signatures() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    for i in range(300):  # about one in 128 has a short r or s
        der = key.sign(b"%d" % i, ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        assert _der_to_raw_p256(der) == r.to_bytes(32, "big") + s.to_bytes(32, "big")


def test_random_pool_never_repeats_and_a_child_forgets_it() -> None:
    pool = RandomPool()
    seen = {pool.take(16) for _ in range(1000)}
    assert len(seen) == 1000 and all(len(b) == 16 for b in seen)
    read, write = os.pipe()
    parent_next = None
    pid = os.fork()
    if pid == 0:  # the child: what it takes must not be what the parent takes next
        os.write(write, pool.take(16))
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    child = os.read(read, 16)
    os.close(read)
    parent_next = pool.take(16)
    assert status == 0 and len(child) == 16 and child != parent_next and child not in seen


class _Jwks(BaseHTTPRequestHandler):
    document = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.document)))
        self.end_headers()
        self.wfile.write(self.document)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def jwks_server() -> Iterator[tuple[ThreadingHTTPServer, type[_Jwks]]]:
    handler = type("Handler", (_Jwks,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, handler
    finally:
        server.shutdown()
        server.server_close()


def test_the_sdk_verifier_accepts_the_token(keys: KeySet, jwks_server: tuple[ThreadingHTTPServer, type[_Jwks]]) -> None:
    server, handler = jwks_server
    handler.document = json.dumps(keys.jwks()).encode()
    issuer = f"http://127.0.0.1:{server.server_address[1]}"
    minter = TaskTokenMinter(keys, issuer, clock=FixedClock(NOW))
    for context in CONTEXTS:
        prepared = minter.prepare(grant(context))
        prepared.claims_sha256()
        token = minter.sign(prepared, txn=TXN)
        with TaskTokenVerifier(issuer, "orders-api", clock=lambda: NOW + 1) as verifier:
            verified = verifier.verify(token)
        assert verified.subject == SPIFFE and verified.jti == prepared.jti and verified.txn == TXN
        assert verified.intent.context == context
