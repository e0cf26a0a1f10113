"""The whole path over real HTTP against ``nhi-broker serve``: dev identity -> exchange -> verify the token
with an independent JOSE library (jwcrypto) -> prove the ledger entry against the signed checkpoint."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import rfc8785
from jwcrypto import jwk as jwcrypto_jwk
from jwcrypto import jwt as jwcrypto_jwt

from broker.ledger.checkpoint import verify_checkpoint
from broker.ledger.merkle import leaf_hash, verify_consistency, verify_inclusion
from tests.helpers import SUPPORT, LiveBroker, delegated_form, intent

NHI = str(Path(sys.executable).with_name("nhi-broker"))
REFUND_20 = intent("payments.refund", "customers/c-42/orders/ord-1001", customer="c-42", amount=20, currency="EUR")


def dev_identity(broker: LiveBroker, spiffe_id: str = SUPPORT) -> str:
    out = subprocess.run([NHI, "dev", "identity", spiffe_id, "--data-dir", str(broker.data_dir)],
                         capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.strip()


def dev_user(broker: LiveBroker, subject: str = "c-42") -> str:
    out = subprocess.run([NHI, "dev", "user", subject, "--data-dir", str(broker.data_dir)],
                         capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.strip()


def refund_form(broker: LiveBroker, details: str = REFUND_20) -> dict[str, str]:
    """A refund for the verified end user c-42 (delegated: the sample refund rules need the user)."""
    return delegated_form(dev_user(broker), dev_identity(broker), "payments-api", details)


def checkpoint(broker: LiveBroker, verifier_key: str) -> tuple[int, bytes]:
    note = httpx.get(broker.url + "/v1/ledger/checkpoint").text
    cp = verify_checkpoint(note, verifier_key)
    return cp.size, cp.root


def test_exchange_verify_and_prove(live_broker: LiveBroker) -> None:
    meta = httpx.get(live_broker.url + "/.well-known/oauth-authorization-server").json()
    assert meta["issuer"] == live_broker.url
    verifier_key = meta["ledger_verifier_key"]
    size_before, root_before = checkpoint(live_broker, verifier_key)

    r = httpx.post(live_broker.url + "/v1/token", data=refund_form(live_broker))
    assert r.status_code == 200, r.text
    body = r.json()
    token = body["access_token"]

    # An independent JOSE implementation verifies the token with the JWKS alone.
    jwks = httpx.get(live_broker.url + "/.well-known/jwks.json").json()
    keyset = jwcrypto_jwk.JWKSet.from_json(json.dumps(jwks))
    verified = jwcrypto_jwt.JWT(jwt=token, key=keyset, algs=["ES256"],
                                check_claims={"iss": live_broker.url, "aud": "payments-api", "exp": None})
    header = json.loads(verified.header)
    claims = json.loads(verified.claims)
    assert header["typ"] == "at+jwt"
    assert header["kid"] == keyset.get_key(header["kid"]).thumbprint()  # kid = RFC 7638 thumbprint
    assert claims["sub"] == "c-42" and claims["act"] == {"sub": SUPPORT}  # for the verified customer
    assert claims["client_id"] == "support-assistant"
    assert claims["owner"]
    assert claims["authorization_details"] == json.loads(REFUND_20)
    assert claims["exp"] - claims["iat"] == body["expires_in"] <= 120
    assert claims["nbf"] == claims["iat"]
    assert claims["txn"] == body["receipt"]["leaf_hash"]

    # The receipt's entry is in the signed tree and commits to exactly these claims.
    size, root = checkpoint(live_broker, verifier_key)
    index = body["receipt"]["index"]
    assert size_before <= index < size
    proof = httpx.get(live_broker.url + "/v1/ledger/proof/inclusion",
                      params={"leaf_hash": claims["txn"], "tree_size": size}).json()
    assert proof["index"] == index
    verify_inclusion(bytes.fromhex(claims["txn"]), index, size,
                     [base64.b64decode(h) for h in proof["audit_path"]], root)
    entries = httpx.get(live_broker.url + "/v1/ledger/entries", params={"start": index, "end": index + 1}).json()
    leaf = base64.b64decode(entries["entries"][0]["leaf"])
    assert leaf_hash(leaf).hex() == claims["txn"]
    entry = json.loads(leaf)
    assert entry["kind"] == "issuance"
    assert entry["credential"]["jti"] == claims["jti"]
    unsigned = {k: v for k, v in claims.items() if k != "txn"}
    assert entry["credential"]["claims_sha256"] == "sha256:" + hashlib.sha256(rfc8785.dumps(unsigned)).hexdigest()
    assert entry["decision"]["rule"] == "refund-small-eur"
    assert entry["decision"]["policy_version"].startswith("sha256:")
    assert token not in leaf.decode()

    # The tree only grew: consistency from the first checkpoint to the latest.
    cons = httpx.get(live_broker.url + "/v1/ledger/proof/consistency",
                     params={"first": size_before, "second": size}).json()
    verify_consistency(size_before, size, root_before, root, [base64.b64decode(h) for h in cons["proof"]])


def test_restart_reuses_keys_and_ledger(tmp_path: Path) -> None:
    first = LiveBroker(tmp_path / "data")
    try:
        jwks = httpx.get(first.url + "/.well-known/jwks.json").json()
        vkey = httpx.get(first.url + "/.well-known/oauth-authorization-server").json()["ledger_verifier_key"]
        size, _ = checkpoint(first, vkey)
    finally:
        first.stop()
    key_modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "data").rglob("*.pem")}
    assert key_modes and set(key_modes.values()) == {"0o600"}
    second = LiveBroker(tmp_path / "data")
    try:
        assert httpx.get(second.url + "/.well-known/jwks.json").json() == jwks
        meta = httpx.get(second.url + "/.well-known/oauth-authorization-server").json()
        assert meta["ledger_verifier_key"] == vkey
        size2, _ = checkpoint(second, vkey)
        assert size2 == size + 1  # one policy_load entry for the second start; no new keys
    finally:
        second.stop()


def test_granian_names_the_broker_not_itself_in_server(tmp_path: Path) -> None:
    # granian would name itself unless the app sends a Server header.
    broker = LiveBroker(tmp_path / "data", server="granian")
    try:
        for r in (httpx.get(broker.url + "/healthz"), httpx.post(broker.url + "/v1/token", data={"a": "b"}),
                  httpx.get(broker.url + "/no/such/path")):
            assert r.headers.get_list("server") == ["nhi-broker"], r.headers
        r = httpx.post(broker.url + "/v1/token", data=refund_form(broker))
        assert r.status_code == 200, r.text
    finally:
        broker.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_granian_serves_the_same_exchange(tmp_path: Path, workers: int) -> None:
    broker = LiveBroker(tmp_path / "data", workers=workers, server="granian")
    try:
        r = httpx.post(broker.url + "/v1/token", data=refund_form(broker))
        assert r.status_code == 200, r.text
        assert r.json()["receipt"]["index"] >= 0
        assert r.headers.get_list("server") == ["nhi-broker"]
    finally:
        broker.stop()
