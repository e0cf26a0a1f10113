"""WIMSE WIT + WPT verification: the drafts' own examples as vectors, then each proof mismatch."""

from __future__ import annotations

import json
import secrets
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from broker.attest.wimse import DRAFTS, VerifiedWit, token_hash, verify_wit, verify_wpt
from broker.errors import AttestationError

# draft-ietf-wimse-workload-creds-03 §3.1 and draft-ietf-wimse-wpt-02 §2 (their example request).
DRAFT_WIT = (
    "eyJhbGciOiJFUzI1NiIsImtpZCI6Ikp1bmUgNSIsInR5cCI6IndpdCtqd3QifQ.eyJjbmYiOnsiandrIjp7ImFsZyI6IkVkRFNBIiwiY3J2Ijoi"
    "RWQyNTUxOSIsImt0eSI6Ik9LUCIsIngiOiIxQ1hYdmZsTl9MVlZzSXNZWHNVdkIwM0ptbEdXZUNIcVFWdW91Q0Y5MmJnIn19LCJleHAiOjE3"
    "NDU1MTI1MTAsImlhdCI6MTc0NTUwODkxMCwianRpIjoieC1fMUNUTDJjY2EzQ1NFNGN3Yl9sIiwic3ViIjoid2ltc2U6Ly9leGFtcGxlLmNv"
    "bS9zcGVjaWZpYy13b3JrbG9hZCJ9.6KraSQUxWdl9dxFQ3Fj6dPY0Vi88OkwFwZpAIOhLeq6AbXAnLLQgOp8U9UDGcBuYF3KiNv6oKQD1ZWAz"
    "rMZOJw"
)
DRAFT_WPT = (
    "eyJhbGciOiJFZERTQSIsInR5cCI6IndwdCtqd3QifQ.eyJhdGgiOiJDTDR3amZwUm1OZi1iZFlJYllMblY5ZDVyTUFSR3dLWUUxMHdVd3pDMGpJ"
    "IiwiYXVkIjoiaHR0cHM6Ly93b3JrbG9hZC5leGFtcGxlLmNvbS9wYXRoIiwiZXhwIjoxNzQ1NTEwMDE2LCJqdGkiOiJfX2J3YzRFU0MzYWNj"
    "MkxUQzEtX3giLCJ3dGgiOiJBYVlVZkMzNEQxZGkyRnhRTHBpSUpKN1NnOFZaNm84T0Nkd1NmOUlUb0xnIn0.PI7d9AcYhLoEgPgbJvcM132lk"
    "BKnM1NXU-5hZUzVTIyj2dRJaTLFs6e5NYv5gg6AqcV7NvkYCwfgMgWasWQzCA"
)
DRAFT_ISSUER_KEY = {"kty": "EC", "kid": "June 5", "crv": "P-256", "x": "kXqnA2Op7hgd4zRMbw0iFcc_hDxUxhojxOFVGjE2gks",
                    "y": "n__VndPMR021-59UAs0b9qDTFT-EZtT6xSNs_xFskLo"}
DRAFT_ACCESS_TOKEN = "16_mAd0GiwaZokU26_0902100"
DRAFT_NOW = 1_745_509_900
DRAFT_AUD = "https://workload.example.com/path"

NOW = 1_790_000_000
AUD = "https://broker.example/v1/token"
WORKLOAD = "spiffe://example.org/ns/support/sa/support-assistant"
ISSUER = ec.generate_private_key(ec.SECP256R1())
ISSUER_JWK = jwt.PyJWK(json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ISSUER.public_key())) | {"kid": "k1"}, "ES256")
ANCHORS = {"example.org": [ISSUER_JWK]}
WORKLOAD_KEY = ed25519.Ed25519PrivateKey.generate()
WORKLOAD_JWK = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(WORKLOAD_KEY.public_key())) | {"alg": "EdDSA"}


def test_implements_named_revisions() -> None:
    assert DRAFTS == ("draft-ietf-wimse-workload-creds-03", "draft-ietf-wimse-wpt-02")


def test_the_drafts_example_wit_and_wpt_verify() -> None:
    anchors = {"example.com": [jwt.PyJWK(DRAFT_ISSUER_KEY, "ES256")]}
    wit = verify_wit(DRAFT_WIT, anchors, now=DRAFT_NOW)
    assert (wit.workload_id, wit.trust_domain, wit.jti, wit.proof_alg) == (
        "wimse://example.com/specific-workload", "example.com", "x-_1CTL2cca3CSE4cwb_l", "EdDSA")
    assert wit.wth == "AaYUfC34D1di2FxQLpiIJJ7Sg8VZ6o8OCdwSf9IToLg"  # the wth of the draft's WPT
    proof = verify_wpt([DRAFT_WPT], wit, audience=DRAFT_AUD, now=DRAFT_NOW, access_token=DRAFT_ACCESS_TOKEN)
    assert (proof.jti, proof.expires_at) == ("__bwc4ESC3acc2LTC1-_x", 1_745_510_016)
    # The same proof without the access token it binds (ath) is refused.
    with pytest.raises(AttestationError, match="names an access token the request does not carry"):
        verify_wpt([DRAFT_WPT], wit, audience=DRAFT_AUD, now=DRAFT_NOW)
    with pytest.raises(AttestationError, match="has expired"):
        verify_wit(DRAFT_WIT, anchors, now=1_745_512_600)


def make_wit(claims: dict[str, Any] | None = None, header: dict[str, Any] | None = None, key: Any = ISSUER) -> str:
    body = {"sub": WORKLOAD, "iss": "https://wimse.example.org", "iat": NOW - 60, "exp": NOW + 3600,
            "jti": secrets.token_urlsafe(12), "cnf": {"jwk": WORKLOAD_JWK}} | (claims or {})
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm="ES256",
                      headers={"typ": "wit+jwt", "kid": "k1"} | (header or {}))


def make_wpt(wit: str, claims: dict[str, Any] | None = None, header: dict[str, Any] | None = None,
             key: Any = WORKLOAD_KEY, alg: str = "EdDSA") -> str:
    body = {"aud": AUD, "exp": NOW + 60, "jti": secrets.token_urlsafe(16), "wth": token_hash(wit)} | (claims or {})
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm=alg,
                      headers={"typ": "wpt+jwt"} | (header or {}))


def verified(wit: str | None = None) -> VerifiedWit:
    return verify_wit(wit or make_wit(), ANCHORS, now=NOW)


def test_a_valid_pair() -> None:
    wit = make_wit()
    proof = verify_wpt([make_wpt(wit)], verify_wit(wit, ANCHORS, now=NOW), audience=AUD, now=NOW)
    assert proof.wit.workload_id == WORKLOAD and proof.wit.issuer == "https://wimse.example.org"


OTHER_ISSUER = ec.generate_private_key(ec.SECP256R1())
OTHER_WORKLOAD = ed25519.Ed25519PrivateKey.generate()


@pytest.mark.parametrize(("case", "wit", "error"), [
    ("typ is plain JWT", lambda: make_wit(header={"typ": "JWT"}), "'typ' must be wit\\+jwt"),
    ("typ is a WPT", lambda: make_wit(header={"typ": "wpt+jwt"}), "'typ' must be wit\\+jwt"),
    ("signed by another issuer", lambda: make_wit(key=OTHER_ISSUER), "signature verification failed"),
    ("kid of no anchor", lambda: make_wit(header={"kid": "k9"}), "no trust anchor key matches"),
    ("trust domain without anchors", lambda: make_wit({"sub": "spiffe://other.org/w"}), "has no WIMSE trust anchor"),
    ("sub is not an identifier", lambda: make_wit({"sub": "https://example.org/w"}), "spiffe:// or wimse://"),
    ("sub names a trust domain", lambda: make_wit({"sub": "wimse://example.org"}), "names a trust domain"),
    ("sub has a dot segment", lambda: make_wit({"sub": "wimse://example.org/a/../b"}), "not a workload identifier"),
    ("no exp", lambda: make_wit({"exp": None}), "missing required claim 'exp'"),
    ("expired", lambda: make_wit({"iat": NOW - 7200, "exp": NOW - 3600}), "has expired"),
    ("lifetime over a day", lambda: make_wit({"exp": NOW + 90_000}), "lifetime exceeds"),
    ("exp as a string", lambda: make_wit({"exp": str(NOW + 60)}), "integer NumericDate"),
    ("no cnf", lambda: make_wit({"cnf": None}), "no cnf.jwk"),
    ("cnf key without alg", lambda: make_wit({"cnf": {"jwk": {k: v for k, v in WORKLOAD_JWK.items() if k != "alg"}}}),
     "allowed asymmetric 'alg'"),
    ("cnf key for HS256", lambda: make_wit({"cnf": {"jwk": {"kty": "oct", "k": "AAAA", "alg": "HS256"}}}),
     "allowed asymmetric 'alg'"),
    ("cnf holds a private key", lambda: make_wit({"cnf": {"jwk": WORKLOAD_JWK | {"d": "AAAA"}}}),
     "public asymmetric key"),
    ("a self-keying header", lambda: make_wit(header={"jwk": WORKLOAD_JWK}), "'jwk' is not allowed"),
])
def test_refused_wits(case: str, wit: Any, error: str) -> None:
    with pytest.raises(AttestationError, match=error):
        verify_wit(wit(), ANCHORS, now=NOW)


WIT = make_wit()


@pytest.mark.parametrize(("case", "proofs", "kwargs", "error"), [
    ("no proof", lambda: [], {}, "exactly one Workload-Proof-Token, not 0"),
    ("two proofs", lambda: [make_wpt(WIT), make_wpt(WIT)], {}, "exactly one Workload-Proof-Token, not 2"),
    ("typ missing", lambda: [make_wpt(WIT, header={"typ": None})], {}, "'typ' must be wpt\\+jwt"),
    ("typ dpop", lambda: [make_wpt(WIT, header={"typ": "dpop+jwt"})], {}, "'typ' must be wpt\\+jwt"),
    ("alg other than cnf's", lambda: [make_wpt(WIT, key=ISSUER, alg="ES256")], {}, "must be the WIT's cnf.jwk alg"),
    ("signed by another key", lambda: [make_wpt(WIT, key=OTHER_WORKLOAD)], {}, "signature verification failed"),
    ("for another audience", lambda: [make_wpt(WIT, {"aud": "https://other.example/v1/token"})], {},
     "audience mismatch"),
    ("no aud", lambda: [make_wpt(WIT, {"aud": None})], {}, "missing required claim 'aud'"),
    ("no jti", lambda: [make_wpt(WIT, {"jti": None})], {}, "missing required claim 'jti'"),
    ("short jti", lambda: [make_wpt(WIT, {"jti": "abc"})], {}, "16 to 256"),
    ("no wth", lambda: [make_wpt(WIT, {"wth": None})], {}, "missing required claim 'wth'"),
    ("made for another WIT", lambda: [make_wpt(make_wit())], {}, "'wth' does not match"),
    ("expired", lambda: [make_wpt(WIT, {"exp": NOW - 10})], {}, "has expired"),
    ("exp far ahead", lambda: [make_wpt(WIT, {"exp": NOW + 3600})], {}, "more than 300 s ahead"),
    ("access token not bound", lambda: [make_wpt(WIT)], {"access_token": "at-1"}, "must bind it with 'ath'"),
    ("ath of another token", lambda: [make_wpt(WIT, {"ath": token_hash("at-2")})], {"access_token": "at-1"},
     "'ath' does not match"),
    ("ath without a token", lambda: [make_wpt(WIT, {"ath": token_hash("at-1")})], {}, "does not carry"),
    ("txn token not bound", lambda: [make_wpt(WIT)], {"txn_token": "tt"}, "must bind it with 'tth'"),
    ("oth names an absent header", lambda: [make_wpt(WIT, {"oth": {"x-user": token_hash("u")}})], {},
     "'oth' names 'x-user'"),
    ("other token not in oth", lambda: [make_wpt(WIT)], {"other_tokens": {"x-user": "u"}}, "must bind it"),
    ("oth with an upper-case name", lambda: [make_wpt(WIT, {"oth": {"X-User": token_hash("u")}})],
     {"other_tokens": {"x-user": "u"}}, "lower-case header names"),
])
def test_each_proof_mismatch_is_refused(case: str, proofs: Any, kwargs: dict[str, Any], error: str) -> None:
    with pytest.raises(AttestationError, match=error):
        verify_wpt(proofs(), verified(WIT), audience=AUD, now=NOW, **kwargs)


def test_bound_tokens_verify_when_they_match() -> None:
    proof = make_wpt(WIT, {"ath": token_hash("at-1"), "tth": token_hash("tt"), "oth": {"x-user": token_hash("u")}})
    verify_wpt([proof], verified(WIT), audience=AUD, now=NOW, access_token="at-1", txn_token="tt",
               other_tokens={"x-user": " u "})
