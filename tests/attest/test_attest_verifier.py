"""Attestor.verify: recorded attack inputs (each naming the error it expects) and happy paths."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from broker.attest.issuers import IssuerConfig
from broker.attest.jwks import JwksSource
from broker.attest.verifier import Attestor
from broker.errors import (
    AttestationError,
    BrokerError,
    ConfigError,
    InvalidRequest,
    ReplayDetected,
)
from tests.helpers import run

# ---------------------------------------------------------------------------------------------
# Attack table. Each builder gets the harness `h` and the helper kit `k` and returns
# (token, token_type); the case names the error class and a substring of its description.
# ---------------------------------------------------------------------------------------------

Builder = Callable[[Any, Any], tuple[str, str]]
JWT = "urn:ietf:params:oauth:token-type:jwt"


@dataclass(frozen=True)
class Case:
    id: str
    build: Builder
    error: type[BrokerError]
    says: str


def tok(fn: Callable[[Any, Any], str]) -> Builder:
    return lambda h, k: (fn(h, k), JWT)


def _hs256_with_public_key(h: Any, k: Any) -> str:
    # The classic key-confusion attack: the issuer's *public* key used as an HMAC secret.
    pem = h.rsa.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = k.b64url(json.dumps({"alg": "HS256", "kid": h.rsa.kid}))
    payload = k.b64url(json.dumps(k.claims()))
    mac = hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{k.b64url(mac)}"


def _none_with_signature(h: Any, k: Any) -> str:
    header = k.b64url(json.dumps({"alg": "none", "kid": h.ec.kid}))
    return f"{header}.{k.b64url(json.dumps(k.claims()))}.{k.b64url(b'x' * 32)}"


def _tampered(h: Any, k: Any) -> str:
    header, _payload, sig = h.ec.sign(k.claims()).split(".")
    forged = k.b64url(json.dumps(k.claims(sub="spiffe://example.org/admin")))
    return f"{header}.{forged}.{sig}"


def _other_key_same_kid(h: Any, k: Any) -> str:
    attacker = k.make_signer("ES256", kid=h.ec.kid)
    return attacker.sign(k.claims())


def _rs_header_ec_kid(h: Any, k: Any) -> str:
    # Header says RS256 but names the EC key's kid; signed with the RSA key.
    return h.rsa.sign(k.claims(), headers={"kid": h.ec.kid})


def _raw(header: dict[str, Any] | str, payload: dict[str, Any] | str | bytes) -> Callable[[Any, Any], str]:
    def build(h: Any, k: Any) -> str:
        hdr = header if isinstance(header, str) else json.dumps({"kid": h.ec.kid, **header})
        body = payload if isinstance(payload, str | bytes) else json.dumps(payload)
        return h.ec.sign_raw(hdr, body)

    return build


def _dup_claims(h: Any, k: Any) -> str:
    c = k.claims()
    body = json.dumps(c)[:-1] + ', "sub": "spiffe://example.org/admin"}'
    return h.ec.sign_raw(json.dumps({"alg": "ES256", "kid": h.ec.kid}), body)


def _dup_header(h: Any, k: Any) -> str:
    hdr = f'{{"alg": "ES256", "kid": "{h.ec.kid}", "kid": "other"}}'
    return h.ec.sign_raw(hdr, json.dumps(k.claims()))


def _payload_segment(h: Any, k: Any, raw: bytes) -> str:
    return h.ec.sign_raw(json.dumps({"alg": "ES256", "kid": h.ec.kid}), raw)


def _oversize(h: Any, k: Any) -> str:
    return h.ec.sign(k.claims(pad="a" * 9000))


def _with_padding(h: Any, k: Any) -> str:
    header, payload, sig = h.ec.sign(k.claims()).split(".")
    return f"{header}.{payload}.{sig}=="


def _noncanonical_b64(h: Any, k: Any) -> str:
    # Flip an unused low bit of the payload's last base64url character: same bytes, another spelling.
    pad = ""
    while True:
        header, payload, sig = h.ec.sign(k.claims(jti="fixed", pad=pad)).split(".")
        if len(payload) % 4:
            break
        pad += "x"
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    bumped = alphabet[alphabet.index(payload[-1]) ^ 1]
    return f"{header}.{payload[:-1]}{bumped}.{sig}"


def _k8s(**over: Any) -> Callable[[Any, Any], str]:
    return lambda h, k: h.ec.sign(k.k8s_claims(**over))


def _k8s_claim(mutate: Callable[[dict[str, Any]], None], **over: Any) -> Callable[[Any, Any], str]:
    def build(h: Any, k: Any) -> str:
        c = k.k8s_claims(**over)
        mutate(c["kubernetes.io"])
        return h.ec.sign(c)

    return build


def C(id: str, fn: Callable[[Any, Any], str], error: type[BrokerError], says: str) -> Case:
    return Case(id, tok(fn), error, says)


NOW = 1_800_000_000
A = AttestationError

ATTACKS: list[Case] = [
    # --- token type
    Case(
        "token-type-unsupported",
        lambda h, k: (h.ec.sign(k.claims()), "urn:ietf:params:oauth:token-type:saml2"),
        InvalidRequest,
        "unsupported subject_token_type",
    ),
    Case(
        "token-type-access-token",
        lambda h, k: (h.ec.sign(k.claims()), "urn:ietf:params:oauth:token-type:access_token"),
        InvalidRequest,
        "unsupported subject_token_type",
    ),
    # --- algorithms
    C("alg-none-pyjwt", lambda h, k: jwt.encode(k.claims(), None, algorithm="none"), A, "not a compact JWS"),
    C("alg-none-with-signature", _none_with_signature, A, "algorithm none is not allowed"),
    C("alg-None-mixed-case", _raw({"alg": "None"}, {"x": 1}), A, "algorithm none is not allowed"),
    C("alg-hs256-public-key-as-secret", _hs256_with_public_key, A, "algorithm HS256 is not allowed"),
    C(
        "alg-not-in-issuer-allow-list",
        lambda h, k: k.make_signer("ES384").sign(k.claims()),
        A,
        "algorithm ES384 is not allowed for this issuer",
    ),
    C("alg-unknown", _raw({"alg": "XS999"}, {"x": 1}), A, "algorithm XS999 is not allowed"),
    C("alg-missing", _raw({}, {"x": 1}), A, "'alg' is missing"),
    C("alg-rs-header-ec-key", _rs_header_ec_kid, A, "algorithm RS256 does not match the issuer key"),
    C(
        "alg-es-header-rsa-key",
        lambda h, k: h.ec.sign(k.claims(), headers={"kid": h.rsa.kid}),
        A,
        "algorithm ES256 does not match the issuer key",
    ),
    # --- keys and signatures
    C(
        "unknown-kid",
        lambda h, k: h.ec.sign(k.claims(), headers={"kid": "no-such-key"}),
        A,
        "no issuer key matches",
    ),
    C(
        "no-kid-with-several-keys",
        lambda h, k: k.make_signer("ES256", kid=None).sign(k.claims()),
        A,
        "no issuer key matches",
    ),
    C("kid-not-a-string", _raw({"alg": "ES256", "kid": 7}, {"x": 1}), A, "'kid' must be"),
    C("bad-signature-other-key", _other_key_same_kid, A, "signature verification failed"),
    C("tampered-payload", _tampered, A, "signature verification failed"),
    # --- time
    C(
        "expired",
        lambda h, k: h.ec.sign(k.claims(iat=NOW - 400, exp=NOW - 31)),
        A,
        "subject_token has expired",
    ),
    C(
        "expired-exactly-at-leeway",
        lambda h, k: h.ec.sign(k.claims(iat=NOW - 400, exp=NOW - 30)),
        A,
        "has expired",
    ),
    C("nbf-in-future", lambda h, k: h.ec.sign(k.claims(nbf=NOW + 31)), A, "not yet valid"),
    C(
        "iat-in-future",
        lambda h, k: h.ec.sign(k.claims(iat=NOW + 31, exp=NOW + 300)),
        A,
        "issued in the future",
    ),
    C(
        "iat-after-exp",
        lambda h, k: h.ec.sign(k.claims(iat=NOW + 20, exp=NOW + 10)),
        A,
        "'iat' is after 'exp'",
    ),
    C(
        "exp-string",
        lambda h, k: h.ec.sign(k.claims(exp=str(NOW + 300))),
        A,
        "claim 'exp' must be an integer",
    ),
    C("exp-float-1e20", lambda h, k: h.ec.sign(k.claims(exp=1e20)), A, "claim 'exp' must be an integer"),
    C(
        "exp-float-small",
        lambda h, k: h.ec.sign(k.claims(exp=NOW + 300.5)),
        A,
        "claim 'exp' must be an integer",
    ),
    C("exp-bool", lambda h, k: h.ec.sign(k.claims(exp=True)), A, "claim 'exp' must be an integer"),
    C("exp-huge-int", lambda h, k: h.ec.sign(k.claims(exp=2**63)), A, "claim 'exp' must be an integer"),
    C("exp-negative", lambda h, k: h.ec.sign(k.claims(exp=-1)), A, "claim 'exp' must be an integer"),
    C("iat-string", lambda h, k: h.ec.sign(k.claims(iat="now")), A, "claim 'iat' must be an integer"),
    C("nbf-list", lambda h, k: h.ec.sign(k.claims(nbf=[NOW])), A, "claim 'nbf' must be an integer"),
    C(
        "lifetime-over-cap",
        lambda h, k: h.ec.sign(k.claims(iat=NOW, exp=NOW + 3601)),
        A,
        "token lifetime exceeds 3600 s",
    ),
    C(
        "lifetime-over-cap-old-iat",
        lambda h, k: h.ec.sign(k.claims(iat=NOW - 3500, exp=NOW + 200)),
        A,
        "token lifetime exceeds 3600 s",
    ),
    C(
        "lifetime-over-cap-no-iat",
        lambda h, k: h.ec.sign(k.claims(iat=k.DROP, exp=NOW + 3700)),
        A,
        "token lifetime exceeds 3600 s",
    ),
    # --- required claims and audience/issuer
    C("missing-exp", lambda h, k: h.ec.sign(k.claims(exp=k.DROP)), A, "missing required claim 'exp'"),
    C("exp-null", lambda h, k: h.ec.sign(k.claims(exp=None)), A, "missing required claim 'exp'"),
    C("missing-iss", lambda h, k: h.ec.sign(k.claims(iss=k.DROP)), A, "missing required claim 'iss'"),
    C(
        "iss-not-string",
        lambda h, k: _payload_segment(h, k, json.dumps(k.claims(iss=["a"])).encode()),
        A,
        "claim 'iss' must be a string",
    ),
    C("missing-aud", lambda h, k: h.ec.sign(k.claims(aud=k.DROP)), A, "missing required claim 'aud'"),
    C("empty-aud-list", lambda h, k: h.ec.sign(k.claims(aud=[])), A, "missing required claim 'aud'"),
    C("missing-sub", lambda h, k: h.ec.sign(k.claims(sub=k.DROP)), A, "missing required claim 'sub'"),
    C("sub-not-string", lambda h, k: h.ec.sign(k.claims(sub=42)), A, "claim 'sub' must be a string"),
    C(
        "wrong-audience",
        lambda h, k: h.ec.sign(k.claims(aud="https://other.example")),
        A,
        "audience mismatch",
    ),
    C(
        "audience-list-without-ours",
        lambda h, k: h.ec.sign(k.claims(aud=["https://a.example", "https://b.example"])),
        A,
        "audience mismatch",
    ),
    C("audience-not-string", lambda h, k: h.ec.sign(k.claims(aud=[1, 2])), A, "audience mismatch"),
    C("unknown-issuer", lambda h, k: h.ec.sign(k.claims(iss="https://evil.example")), A, "unknown issuer"),
    C(
        "issuer-differs-by-trailing-slash",
        lambda h, k: h.ec.sign(k.claims(iss=k.SPIFFE_ISS + "/")),
        A,
        "unknown issuer",
    ),
    # --- JSON structure
    C("duplicate-claim-sub", _dup_claims, A, "duplicate claim 'sub'"),
    C("duplicate-header-kid", _dup_header, A, "duplicate header parameter 'kid'"),
    C(
        "duplicate-nested-claim",
        lambda h, k: _payload_segment(
            h, k, json.dumps(k.claims())[:-1].encode() + b', "x": {"a": 1, "a": 2}}'
        ),
        A,
        "duplicate claim 'a'",
    ),
    C(
        "payload-nan",
        lambda h, k: _payload_segment(h, k, json.dumps(k.claims())[:-1].encode() + b', "x": NaN}'),
        A,
        "payload is not valid JSON",
    ),
    C(
        "payload-non-utf8",
        lambda h, k: _payload_segment(h, k, b'{"iss": "\xff\xfe"}'),
        A,
        "payload is not UTF-8",
    ),
    C("payload-array", lambda h, k: _payload_segment(h, k, b"[1, 2, 3]"), A, "payload is not a JSON object"),
    C(
        "payload-string",
        lambda h, k: _payload_segment(h, k, b'"spiffe://example.org/x"'),
        A,
        "payload is not a JSON object",
    ),
    C(
        "payload-deeply-nested",
        lambda h, k: _payload_segment(h, k, b"[" * 1500 + b"]" * 1500),
        A,
        "payload is nested too deeply",
    ),
    C("header-not-json", _raw("not json", {"x": 1}), A, "header is not valid JSON"),
    C("header-array", _raw("[]", {"x": 1}), A, "header is not a JSON object"),
    # --- header parameters
    C(
        "crit-header",
        lambda h, k: h.ec.sign(k.claims(), headers={"crit": ["exp"], "exp": 1}),
        A,
        "'crit' is not allowed",
    ),
    C(
        "jku-header",
        lambda h, k: h.ec.sign(k.claims(), headers={"jku": "https://evil.example/jwks"}),
        A,
        "'jku' is not allowed",
    ),
    C(
        "x5u-header",
        lambda h, k: h.ec.sign(k.claims(), headers={"x5u": "https://evil.example/cert"}),
        A,
        "'x5u' is not allowed",
    ),
    C(
        "jwk-header",
        lambda h, k: h.ec.sign(k.claims(), headers={"jwk": h.ec.public_jwk}),
        A,
        "'jwk' is not allowed",
    ),
    C("x5c-header", lambda h, k: h.ec.sign(k.claims(), headers={"x5c": ["MIIB"]}), A, "'x5c' is not allowed"),
    C("b64-header", _raw({"alg": "ES256", "b64": False}, {"x": 1}), A, "'b64' is not allowed"),
    C(
        "cty-nested-jwt",
        lambda h, k: h.ec.sign(k.claims(), headers={"cty": "JWT"}),
        A,
        "'cty' is not allowed",
    ),
    C(
        "typ-access-token",
        lambda h, k: h.ec.sign(k.claims(), headers={"typ": "at+jwt"}),
        A,
        "'typ' is not accepted",
    ),
    C("typ-not-string", lambda h, k: h.ec.sign(k.claims(), headers={"typ": 1}), A, "'typ' is not accepted"),
    # --- shape and size
    C("oversize-token", _oversize, A, "exceeds 8192 bytes"),
    C("two-parts", lambda h, k: ".".join(h.ec.sign(k.claims()).split(".")[:2]), A, "not a compact JWS"),
    C("four-parts", lambda h, k: h.ec.sign(k.claims()) + ".e30", A, "not a compact JWS"),
    C("empty-signature", lambda h, k: h.ec.sign(k.claims()).rsplit(".", 1)[0] + ".", A, "not a compact JWS"),
    C("padding-chars", _with_padding, A, "not a compact JWS"),
    C("trailing-newline", lambda h, k: h.ec.sign(k.claims()) + "\n", A, "not a compact JWS"),
    C("leading-space", lambda h, k: " " + h.ec.sign(k.claims()), A, "not a compact JWS"),
    C(
        "standard-base64-chars",
        lambda h, k: h.ec.sign(k.claims()).replace("-", "+").replace("_", "/") + "+/",
        A,
        "not a compact JWS",
    ),
    C("non-ascii", lambda h, k: h.ec.sign(k.claims()) + "é", A, "not a compact JWS"),
    C("empty-token", lambda h, k: "", A, "not a compact JWS"),
    C(
        "json-serialization",
        lambda h, k: json.dumps({"payload": "e30", "signatures": []}),
        A,
        "not a compact JWS",
    ),
    C(
        "segment-length-mod-4-is-1",
        lambda h, k: "eyJhbGciOiJFUzI1NiJ9.e30AB.c2ln",
        A,
        "payload is not base64url",
    ),
    C("noncanonical-base64", _noncanonical_b64, A, "not base64url"),
    # --- jti
    C("missing-jti", lambda h, k: h.ec.sign(k.claims(jti=k.DROP)), A, "missing required claim 'jti'"),
    C("jti-not-string", lambda h, k: h.ec.sign(k.claims(jti=12345)), A, "claim 'jti' must be a string"),
    C("jti-empty", lambda h, k: h.ec.sign(k.claims(jti="")), A, "claim 'jti' must be 1..256 printable"),
    C(
        "jti-control-char",
        lambda h, k: h.ec.sign(k.claims(jti="a\x00b")),
        A,
        "claim 'jti' must be 1..256 printable",
    ),
    C(
        "jti-too-long",
        lambda h, k: h.ec.sign(k.claims(jti="j" * 257)),
        A,
        "claim 'jti' must be 1..256 printable",
    ),
    # --- SPIFFE ID of a JWT-SVID
    C(
        "svid-wrong-trust-domain",
        lambda h, k: h.ec.sign(k.claims(sub="spiffe://evil.org/assistants/refund-bot")),
        A,
        "trust domain does not match",
    ),
    C(
        "svid-not-spiffe",
        lambda h, k: h.ec.sign(k.claims(sub="refund-bot")),
        A,
        "sub is not a valid SPIFFE ID",
    ),
    # --- Kubernetes
    C(
        "k8s-sub-other-namespace",
        _k8s(sub="system:serviceaccount:admin:refund-bot"),
        A,
        "'kubernetes.io' does not match sub",
    ),
    C(
        "k8s-sub-other-account",
        _k8s(sub="system:serviceaccount:payments:root"),
        A,
        "'kubernetes.io' does not match sub",
    ),
    C("k8s-sub-not-sa", _k8s(sub="payments/refund-bot"), A, "'kubernetes.io' does not match sub"),
    C("k8s-claim-missing", _k8s(**{"kubernetes.io": None}), A, "'kubernetes.io' is missing"),
    C(
        "k8s-serviceaccount-missing",
        _k8s_claim(lambda c: c.pop("serviceaccount")),
        A,
        "'kubernetes.io.serviceaccount' is missing",
    ),
    C(
        "k8s-namespace-path-traversal",
        _k8s_claim(lambda c: c.update(namespace=".."), sub="system:serviceaccount:..:refund-bot"),
        A,
        "not a valid namespace",
    ),
    C(
        "k8s-namespace-slash",
        _k8s_claim(lambda c: c.update(namespace="a/b"), sub="system:serviceaccount:a/b:refund-bot"),
        A,
        "not a valid namespace",
    ),
    C("k8s-name-uppercase", _k8s(name="Refund-Bot"), A, "serviceaccount.name' is not a valid name"),
    C(
        "k8s-uid-missing",
        _k8s_claim(lambda c: c["serviceaccount"].pop("uid")),
        A,
        "uid' is missing or invalid",
    ),
]


@pytest.mark.parametrize("case", ATTACKS, ids=[c.id for c in ATTACKS])
def test_attack_is_refused(h: Any, kit: Any, case: Case) -> None:
    token, token_type = case.build(h, kit)
    with pytest.raises(BrokerError) as caught:
        h.verify(token, token_type)
    err = caught.value
    assert type(err) is case.error, f"{type(err).__name__}: {err.description}"
    assert case.says in err.description
    # The description never repeats the token or any of its parts.
    for part in token.split("."):
        if len(part) >= 8:
            assert part not in err.description


def test_attack_table_ids_are_unique() -> None:
    ids = [c.id for c in ATTACKS]
    assert len(ids) == len(set(ids))


# Invalid SPIFFE IDs in the sub of a JWT-SVID: each is refused with the spec's reason.
INVALID_SVID_SUBS = [
    ("trailing-newline", "spiffe://example.org/assistants/refund-bot\n", "characters are limited"),
    ("dot-dot-segment", "spiffe://example.org/assistants/../admin", "dot segments"),
    ("dot-segment", "spiffe://example.org/./admin", "dot segments"),
    ("upper-case-scheme", "SPIFFE://example.org/assistants/refund-bot", "scheme"),
    ("port", "spiffe://example.org:443/assistants/refund-bot", "port"),
    ("query", "spiffe://example.org/assistants/refund-bot?admin=1", "query"),
    ("fragment", "spiffe://example.org/assistants/refund-bot#x", "fragment"),
    ("percent-encoding", "spiffe://example.org/assistants/refund%2Fbot", "percent-encoding"),
    ("empty-segment", "spiffe://example.org/assistants//refund-bot", "empty segments"),
    ("trailing-slash", "spiffe://example.org/assistants/refund-bot/", "trailing slash"),
    ("userinfo", "spiffe://admin@example.org/assistants/refund-bot", "userinfo"),
    ("upper-case-trust-domain", "spiffe://Example.org/assistants/refund-bot", "trust domain characters"),
    ("over-2048-bytes", "spiffe://example.org/" + "a" * 2048, "exceeds 2048 bytes"),
]


@pytest.mark.parametrize(
    ("sub", "reason"), [c[1:] for c in INVALID_SVID_SUBS], ids=[c[0] for c in INVALID_SVID_SUBS]
)
def test_invalid_spiffe_id_in_svid(h: Any, kit: Any, sub: str, reason: str) -> None:
    with pytest.raises(AttestationError) as caught:
        h.verify(h.ec.sign(kit.claims(sub=sub)))
    assert "sub is not a valid SPIFFE ID" in caught.value.description
    assert reason in caught.value.description


# ---------------------------------------------------------------------------------------------
# Happy paths
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signer_name", ["ec", "rsa", "ed"])
def test_spiffe_jwt_svid(h: Any, kit: Any, signer_name: str) -> None:
    signer = getattr(h, signer_name)
    c = kit.claims()
    token = signer.sign(c, headers={"typ": "JWT"})
    identity = h.verify(token)
    assert identity.spiffe_id == "spiffe://example.org/assistants/refund-bot"
    assert identity.issuer == kit.SPIFFE_ISS
    assert identity.method == "spiffe-jwt"
    assert identity.subject == c["sub"]
    assert identity.expires_at == kit.NOW + 300
    assert identity.jti == c["jti"]
    assert identity.evidence_digest == "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def test_ps256_accepted_with_rsa_key(h: Any, kit: Any) -> None:
    token = h.rsa.sign(kit.claims(), alg="PS256")
    assert h.verify(token).spiffe_id.startswith("spiffe://example.org/")


def test_audience_list_containing_ours(h: Any, kit: Any) -> None:
    token = h.ec.sign(kit.claims(aud=["https://other.example", kit.AUDIENCE]))
    assert h.verify(token).method == "spiffe-jwt"


def test_id_token_type_accepted(h: Any, kit: Any) -> None:
    identity = h.verify(h.ec.sign(kit.claims()), "urn:ietf:params:oauth:token-type:id_token")
    assert identity.method == "spiffe-jwt"


@pytest.mark.parametrize("typ", ["JWT", "jwt", "JOSE", "application/jwt"])
def test_accepted_typ_values(h: Any, kit: Any, typ: str) -> None:
    assert h.verify(h.ec.sign(kit.claims(), headers={"typ": typ})).method == "spiffe-jwt"


def test_unknown_header_parameter_is_ignored(h: Any, kit: Any) -> None:
    # RFC 7515 §4: unknown parameters are ignored unless listed in crit (which is refused).
    assert h.verify(h.ec.sign(kit.claims(), headers={"x5t#S256": "abc"})).method == "spiffe-jwt"


def test_trust_domain_id_without_path(h: Any, kit: Any) -> None:
    assert h.verify(h.ec.sign(kit.claims(sub="spiffe://example.org"))).spiffe_id == "spiffe://example.org"


def test_expiry_within_leeway_accepted(h: Any, kit: Any) -> None:
    identity = h.verify(h.ec.sign(kit.claims(iat=kit.NOW - 300, exp=kit.NOW - 29)))
    assert identity.expires_at == kit.NOW - 29


def test_nbf_and_iat_within_leeway_accepted(h: Any, kit: Any) -> None:
    token = h.ec.sign(kit.claims(iat=kit.NOW + 30, nbf=kit.NOW + 30, exp=kit.NOW + 300))
    assert h.verify(token).method == "spiffe-jwt"


def test_lifetime_exactly_at_cap_accepted(h: Any, kit: Any) -> None:
    assert h.verify(h.ec.sign(kit.claims(iat=kit.NOW, exp=kit.NOW + 3600))).expires_at == kit.NOW + 3600


def test_lifetime_without_iat_is_measured_from_now(h: Any, kit: Any) -> None:
    assert h.verify(h.ec.sign(kit.claims(iat=kit.DROP, exp=kit.NOW + 3600 + 30))).expires_at == kit.NOW + 3630


def test_time_follows_the_injected_clock(h: Any, kit: Any) -> None:
    token = h.ec.sign(kit.claims(iat=kit.NOW, exp=kit.NOW + 60))
    h.clock.set(kit.NOW + 90)
    with pytest.raises(AttestationError, match="subject_token has expired"):
        h.verify(token)
    h.clock.set(kit.NOW + 89)
    assert h.verify(token).expires_at == kit.NOW + 60


def test_single_key_jwks_token_without_kid(kit: Any, h: Any) -> None:
    signer = kit.make_signer("ES256", kid=None)
    cfg = h.configs[0]
    attestor = Attestor(
        [cfg], h.store, h.clock, jwks_sources={cfg.issuer: JwksSource.from_jwks(signer.jwks())}
    )
    assert run(attestor.verify(signer.sign(kit.claims()), JWT)).method == "spiffe-jwt"


def test_kubernetes_service_account_token(h: Any, kit: Any) -> None:
    c = kit.k8s_claims(namespace="payments", name="refund-bot")
    identity = h.verify(h.rsa.sign(c))
    assert identity.spiffe_id == "spiffe://cluster.example/ns/payments/sa/refund-bot"
    assert identity.method == "kubernetes"
    assert identity.subject == "system:serviceaccount:payments:refund-bot"
    assert identity.issuer == kit.K8S_ISS


def test_kubernetes_dotted_service_account_name(h: Any, kit: Any) -> None:
    identity = h.verify(h.ec.sign(kit.k8s_claims(namespace="kube-system", name="bot.v2")))
    assert identity.spiffe_id == "spiffe://cluster.example/ns/kube-system/sa/bot.v2"


def test_oidc_template_sub(h: Any, kit: Any) -> None:
    c = kit.claims(iss=kit.OIDC_ISS, sub="248289761001", jti=kit.DROP)
    identity = h.verify(h.ec.sign(c), "urn:ietf:params:oauth:token-type:id_token")
    assert identity.spiffe_id == "spiffe://people.example/oidc/248289761001"
    assert identity.method == "oidc"
    assert identity.jti is None


def test_oidc_template_other_claim(h: Any, kit: Any) -> None:
    cfg = IssuerConfig(
        issuer=kit.OIDC_ISS,
        kind="oidc",
        audience=kit.AUDIENCE,
        jwks_url="https://login.example.com/jwks",
        spiffe_id_template="spiffe://people.example/tenants/{claim:tid}/users/{sub}",
    )
    attestor = h.build([cfg])
    identity = run(attestor.verify(h.ec.sign(kit.claims(iss=kit.OIDC_ISS, sub="u-17", tid="acme")), JWT))
    assert identity.spiffe_id == "spiffe://people.example/tenants/acme/users/u-17"


@pytest.mark.parametrize(
    ("sub", "says"),
    [
        ("alice@example.com", "not usable as a SPIFFE ID path segment"),
        ("a/b", "not usable as a SPIFFE ID path segment"),
        ("..", "dot segments"),
        ("%2e%2e", "not usable as a SPIFFE ID path segment"),
        ("u\n", "not usable as a SPIFFE ID path segment"),
    ],
)
def test_oidc_template_refuses_unsafe_values(h: Any, kit: Any, sub: str, says: str) -> None:
    with pytest.raises(AttestationError) as caught:
        h.verify(h.ec.sign(kit.claims(iss=kit.OIDC_ISS, sub=sub)))
    assert says in caught.value.description


def test_oidc_template_missing_claim(h: Any, kit: Any) -> None:
    cfg = IssuerConfig(
        issuer=kit.OIDC_ISS,
        kind="oidc",
        audience=kit.AUDIENCE,
        jwks_url="https://login.example.com/jwks",
        spiffe_id_template="spiffe://people.example/{claim:employee_id}",
    )
    with pytest.raises(
        AttestationError, match="claim 'employee_id' required by the SPIFFE ID template is missing"
    ):
        run(h.build([cfg]).verify(h.ec.sign(kit.claims(iss=kit.OIDC_ISS, sub="u-1")), JWT))


# ---------------------------------------------------------------------------------------------
# Replay
# ---------------------------------------------------------------------------------------------


def test_jti_replay_is_detected(h: Any, kit: Any) -> None:
    token = h.ec.sign(kit.claims())
    h.verify(token)
    with pytest.raises(ReplayDetected, match="subject_token has already been used"):
        h.verify(token)


def test_replay_detected_across_attestors_sharing_a_store(h: Any, kit: Any) -> None:
    token = h.ec.sign(kit.claims())
    run(h.build().verify(token, JWT))
    with pytest.raises(ReplayDetected):
        run(h.build().verify(token, JWT))


def test_same_jti_new_token_is_a_replay(h: Any, kit: Any) -> None:
    h.verify(h.ec.sign(kit.claims(jti="fixed-jti")))
    with pytest.raises(ReplayDetected):
        h.verify(h.rsa.sign(kit.claims(jti="fixed-jti", exp=kit.NOW + 200)))


def test_same_jti_from_two_issuers_is_not_a_replay(h: Any, kit: Any) -> None:
    h.verify(h.ec.sign(kit.claims(jti="shared")))
    assert h.verify(h.ec.sign(kit.k8s_claims(jti="shared"))).method == "kubernetes"


def test_replay_window_covers_the_leeway(h: Any, kit: Any) -> None:
    # The token stays acceptable until exp + leeway, so its jti must be remembered that long.
    token = h.ec.sign(kit.claims(iat=kit.NOW, exp=kit.NOW + 5))
    h.verify(token)
    h.clock.set(kit.NOW + 20)  # past exp, within leeway
    with pytest.raises(ReplayDetected):
        h.verify(token)


def test_refused_token_does_not_burn_its_jti(h: Any, kit: Any) -> None:
    c = kit.claims(jti="not-burnt")
    with pytest.raises(AttestationError):
        h.verify(h.ec.sign({**c, "aud": "https://other.example"}))
    assert h.verify(h.ec.sign(c)).jti == "not-burnt"


def test_require_jti_false_allows_reuse(h: Any, kit: Any) -> None:
    token = h.ec.sign(kit.claims(iss=kit.OIDC_ISS, sub="u-1"))
    h.verify(token)
    assert h.verify(token).subject == "u-1"


# ---------------------------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------------------------


def test_duplicate_issuer_refused(h: Any) -> None:
    with pytest.raises(ConfigError, match="configured twice"):
        h.build([h.configs[0], h.configs[0]])


def test_jwks_source_for_unknown_issuer_refused(h: Any) -> None:
    with pytest.raises(ConfigError, match="unconfigured issuers"):
        Attestor([], h.store, h.clock, jwks_sources={"https://x": JwksSource.from_jwks(h.jwks)})


def test_dev_issuer_without_keys_refused(h: Any, kit: Any) -> None:
    cfg = IssuerConfig(issuer="urn:dev", kind="dev", audience=kit.AUDIENCE)
    with pytest.raises(ConfigError, match="has no JWKS"):
        Attestor([cfg], h.store, h.clock)


def test_max_token_bytes_configurable(h: Any, kit: Any) -> None:
    attestor = h.build(max_token_bytes=1024)
    with pytest.raises(AttestationError, match="exceeds 1024 bytes"):
        run(attestor.verify(h.ec.sign(kit.claims(pad="a" * 1024)), JWT))
