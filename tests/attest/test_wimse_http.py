"""WIMSE attestation over real HTTP against ``nhi-broker serve``: a WIT as ``subject_token`` and its WPT
in the ``Workload-Proof-Token`` header (draft-ietf-wimse-workload-creds-03, draft-ietf-wimse-wpt-02).

A valid pair gets a task token (checked with jwcrypto); every proof mismatch is refused with the
status, ``error`` and description it names.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwcrypto import jwk as jwcrypto_jwk
from jwcrypto import jwt as jwcrypto_jwt

from broker.attest.wimse import token_hash
from tests.helpers import JWT_TYPE, SUPPORT, LiveBroker, dev_user, intent

WIT_TYPE = "urn:nhi-broker:token-type:wimse-wit"
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
REFUND_20 = intent("payments.refund", "customers/c-42/orders/ord-1001", customer="c-42", amount=20, currency="EUR")
ISSUER = ec.generate_private_key(ec.SECP256R1())
ISSUER_JWK = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ISSUER.public_key())) | {"kid": "wimse-1", "use": "sig"}
WORKLOAD_KEY = ed25519.Ed25519PrivateKey.generate()
WORKLOAD_JWK = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(WORKLOAD_KEY.public_key())) | {"alg": "EdDSA"}


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveBroker]:
    root = tmp_path_factory.mktemp("wimse")
    jwks = root / "wimse-jwks.json"
    jwks.write_text(json.dumps({"keys": [ISSUER_JWK]}))
    config = root / "broker.toml"
    config.write_text(f'[wimse]\ntrust_anchors = [{{trust_domain = "example.org", jwks_file = "{jwks}"}}]\n')
    live = LiveBroker(root / "data", config=config)
    try:
        yield live
    finally:
        live.stop()


def make_wit(sub: str = SUPPORT, **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": "https://wimse.example.org", "sub": sub, "iat": now, "exp": now + 600,
            "jti": secrets.token_urlsafe(12), "cnf": {"jwk": WORKLOAD_JWK}} | claims
    return jwt.encode(body, ISSUER, algorithm="ES256", headers={"typ": "wit+jwt", "kid": "wimse-1"})


def make_wpt(broker: LiveBroker, wit: str, *, key: Any = WORKLOAD_KEY, alg: str = "EdDSA", **claims: Any) -> str:
    body = {"aud": broker.url + "/v1/token", "exp": int(time.time()) + 60, "jti": secrets.token_urlsafe(16),
            "wth": token_hash(wit)} | claims
    return jwt.encode(body, key, algorithm=alg, headers={"typ": "wpt+jwt"})


def form(broker: LiveBroker, wit: str) -> dict[str, str]:
    """A refund for the verified customer c-42 (RFC 8693 delegation; the sample refund rules need the
    user): the WIT is the actor, proven by the WPT; the customer's token (trial user issuer) the subject."""
    return {"grant_type": EXCHANGE, "subject_token": dev_user(broker.data_dir), "subject_token_type": JWT_TYPE,
            "actor_token": wit, "actor_token_type": WIT_TYPE, "audience": "payments-api",
            "authorization_details": REFUND_20}


def post(broker: LiveBroker, wit: str, proofs: list[str], **headers: str) -> httpx.Response:
    pairs = [("workload-proof-token", proof) for proof in proofs] + list(headers.items())
    return httpx.post(broker.url + "/v1/token", data=form(broker, wit), headers=httpx.Headers(pairs))


def test_a_valid_pair_gets_a_task_token(broker: LiveBroker) -> None:
    wit = make_wit()
    r = post(broker, wit, [make_wpt(broker, wit)])
    assert r.status_code == 200, r.text
    jwks = httpx.get(broker.url + "/.well-known/jwks.json").json()
    verified = jwcrypto_jwt.JWT(jwt=r.json()["access_token"], key=jwcrypto_jwk.JWKSet.from_json(json.dumps(jwks)),
                                algs=["ES256"], check_claims={"iss": broker.url, "aud": "payments-api", "exp": None})
    claims = json.loads(verified.claims)
    assert claims["sub"] == "c-42" and claims["act"] == {"sub": SUPPORT}
    assert claims["client_id"] == "support-assistant"
    index = r.json()["receipt"]["index"]
    page = httpx.get(broker.url + "/v1/ledger/entries", params={"start": index, "end": index + 1}).json()
    assert page["entries"][0]["entry"]["workload"]["attestation"] == "wimse"
    # The WIT is reusable with a fresh proof (it is a credential, not a one-time token).
    assert post(broker, wit, [make_wpt(broker, wit)]).status_code == 200


def test_a_replayed_proof_is_refused(broker: LiveBroker) -> None:
    wit = make_wit()
    proof = make_wpt(broker, wit)
    assert post(broker, wit, [proof]).status_code == 200
    r = post(broker, wit, [proof])
    assert (r.status_code, r.json()["error"]) == (400, "invalid_grant")
    assert r.json()["error_description"] == "the Workload-Proof-Token has already been used"


def _mismatches() -> list[tuple[str, Any, str]]:
    other_key = ec.generate_private_key(ec.SECP256R1())
    return [
        ("aud of another endpoint", lambda b, w: [make_wpt(b, w, aud=b.url + "/v1/introspect")], "audience"),
        ("aud from a spoofed Host", lambda b, w: [make_wpt(b, w, aud="http://attacker.example/v1/token")],
         "audience"),
        ("wth of another WIT", lambda b, w: [make_wpt(b, w, wth=token_hash(make_wit()))],
         "the proof's 'wth' does not match the workload identity token"),
        ("missing WPT", lambda b, w: [], "the Workload-Proof-Token header is missing"),
        ("two WPT headers", lambda b, w: [make_wpt(b, w), make_wpt(b, w)],
         "the request must carry exactly one Workload-Proof-Token, not 2"),
        ("alg other than cnf.jwk's", lambda b, w: [make_wpt(b, w, key=other_key, alg="ES256")],
         "the proof's alg must be the WIT's cnf.jwk alg EdDSA"),
        ("signed by another key", lambda b, w: [make_wpt(b, w, key=ed25519.Ed25519PrivateKey.generate())],
         "signature"),
        ("an expired proof", lambda b, w: [make_wpt(b, w, exp=int(time.time()) - 60)], "has expired"),
    ]


@pytest.mark.parametrize(("case", "proofs", "error"), _mismatches(), ids=[c[0] for c in _mismatches()])
def test_proof_mismatches(broker: LiveBroker, case: str, proofs: Any, error: str) -> None:
    wit = make_wit()
    headers = {"host": "attacker.example"} if "Host" in case else {}
    r = post(broker, wit, proofs(broker, wit), **headers)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_grant"), r.text
    assert error in r.json()["error_description"]


@pytest.mark.parametrize(("case", "wit", "error"), [
    ("a wimse:// identifier", lambda: make_wit("wimse://example.org/support"), "must be a spiffe:// ID"),
    ("an unconfigured trust domain", lambda: make_wit("spiffe://elsewhere.org/ns/a/sa/b"),
     "trust domain 'elsewhere.org' has no WIMSE trust anchor"),
    ("a WIT without typ wit+jwt", lambda: jwt.encode({"sub": SUPPORT, "exp": int(time.time()) + 60}, ISSUER,
                                                      algorithm="ES256", headers={"kid": "wimse-1"}),
     "'typ' must be wit+jwt"),
])
def test_refused_wits(broker: LiveBroker, case: str, wit: Any, error: str) -> None:
    token = wit()
    r = post(broker, token, [make_wpt(broker, token)])
    assert (r.status_code, r.json()["error"]) == (400, "invalid_grant"), r.text
    assert error in r.json()["error_description"]
