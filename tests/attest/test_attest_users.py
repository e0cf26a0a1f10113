"""End-user tokens of delegated exchanges get the hardening workload identities get: a table of
attack inputs, each naming the error it must raise (no mocks: a real SQLite replay store)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from broker.attest.jwks import JwksSource
from broker.attest.users import UserIssuerConfig, UserTokenVerifier
from broker.clock import FixedClock
from broker.errors import AttestationError, ConfigError, InvalidRequest, ReplayDetected
from broker.models import EndUser
from broker.state.sqlite import SqliteStateStore
from tests.helpers import run

ISS = "https://login.example.org"
AUD = "support-assistant"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"


@pytest.fixture
def setup(kit: Any, clock: FixedClock, store: SqliteStateStore) -> Any:
    signer = kit.make_signer("ES256")
    config = UserIssuerConfig(issuer=ISS, audience=AUD, kind="dev", claims={"tenant": "tid"}, max_lifetime=3600)
    verifier = UserTokenVerifier([config], store, clock, key_sources={ISS: JwksSource.from_jwks(signer.jwks())})
    return kit, signer, verifier


def user_claims(kit: Any, **overrides: Any) -> dict[str, Any]:
    base = {"iss": ISS, "sub": "c-42", "aud": AUD, "iat": kit.NOW, "exp": kit.NOW + 300, "jti": uuid.uuid4().hex,
            "tid": "acme"}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not kit.DROP}


def test_a_valid_user_token_yields_the_verified_user(setup: Any) -> None:
    kit, signer, verifier = setup
    user = run(verifier.verify(signer.sign(user_claims(kit), {"typ": "JWT"}), ID_TOKEN))
    assert isinstance(user, EndUser)
    assert (user.issuer, user.subject, user.claims) == (ISS, "c-42", {"tenant": "acme"})
    assert user.sub_id() == {"format": "iss_sub", "iss": ISS, "sub": "c-42"}
    assert user.evidence_digest is not None and user.evidence_digest.startswith("sha256:")
    # An RFC 9068 user access token (typ at+jwt) of the same issuer is a user token too.
    run(verifier.verify(signer.sign(user_claims(kit), {"typ": "at+jwt"}), JWT_TYPE))


def _other_key(kit: Any, signer: Any) -> str:
    return kit.make_signer("ES256", kid=signer.kid).sign(user_claims(kit))


ATTACKS: list[tuple[str, Any, str, type[Exception], str]] = [
    ("unknown issuer", lambda kit, s: s.sign(user_claims(kit, iss="https://evil.example")), ID_TOKEN,
     AttestationError, "unknown user issuer"),
    ("wrong audience", lambda kit, s: s.sign(user_claims(kit, aud="someone-else")), ID_TOKEN,
     AttestationError, "audience mismatch"),
    ("expired", lambda kit, s: s.sign(user_claims(kit, iat=kit.NOW - 900, exp=kit.NOW - 600)), ID_TOKEN,
     AttestationError, "subject_token has expired"),
    ("issued in the future", lambda kit, s: s.sign(user_claims(kit, iat=kit.NOW + 600, exp=kit.NOW + 900)),
     ID_TOKEN, AttestationError, "issued in the future"),
    ("lifetime above the cap", lambda kit, s: s.sign(user_claims(kit, exp=kit.NOW + 7200)), ID_TOKEN,
     AttestationError, "lifetime exceeds 3600"),
    ("exp as a string", lambda kit, s: s.sign(user_claims(kit, exp=str(kit.NOW + 300))), ID_TOKEN,
     AttestationError, "issuer key is unusable|integer NumericDate"),
    ("alg none", lambda kit, s: kit.b64url('{"alg":"none"}') + "." + kit.b64url(f'{{"iss":"{ISS}"}}') + ".AAAA",
     ID_TOKEN, AttestationError, "algorithm none is not allowed"),
    ("HS256", lambda kit, s: __import__("jwt").encode(user_claims(kit), "k" * 32, algorithm="HS256"), ID_TOKEN,
     AttestationError, "algorithm HS256 is not allowed"),
    ("signed by another key", _other_key, ID_TOKEN, AttestationError, "signature verification failed"),
    ("self-keying jwk header", lambda kit, s: s.sign(user_claims(kit), {"jwk": s.public_jwk}), ID_TOKEN,
     AttestationError, "header parameter 'jwk' is not allowed"),
    ("typ of a DPoP proof", lambda kit, s: s.sign(user_claims(kit), {"typ": "dpop+jwt"}), ID_TOKEN,
     AttestationError, "'typ' is not accepted"),
    ("token type the issuer does not accept", lambda kit, s: s.sign(user_claims(kit)), ACCESS,
     InvalidRequest, "subject_token_type must be one of"),
    ("subject with a space", lambda kit, s: s.sign(user_claims(kit, sub="c 42")), ID_TOKEN,
     AttestationError, "claim 'sub' must be"),
    ("missing sub", lambda kit, s: s.sign(user_claims(kit, sub=kit.DROP)), ID_TOKEN,
     AttestationError, "missing required claim 'sub'"),
    ("mapped claim of the wrong shape", lambda kit, s: s.sign(user_claims(kit, tid={"a": 1})), ID_TOKEN,
     AttestationError, r"\(user\.tenant\) must be"),
    ("oversized", lambda kit, s: s.sign(user_claims(kit, pad="x" * 9000)), ID_TOKEN,
     AttestationError, "exceeds 8192 bytes"),
    ("duplicate claim names", lambda kit, s: s.sign_raw(f'{{"alg":"ES256","kid":"{s.kid}"}}',
                                                        f'{{"iss":"{ISS}","sub":"c-1","sub":"c-2"}}'),
     ID_TOKEN, AttestationError, "duplicate claim 'sub'"),
    ("not a JWS", lambda kit, s: "not.a token", ID_TOKEN, AttestationError, "not a compact JWS"),
]


@pytest.mark.parametrize(("name", "make", "token_type", "error", "says"), ATTACKS, ids=[a[0] for a in ATTACKS])
def test_user_token_attacks(setup: Any, name: str, make: Any, token_type: str, error: type[Exception],
                            says: str) -> None:
    import re

    kit, signer, verifier = setup
    with pytest.raises(error) as raised:
        run(verifier.verify(make(kit, signer), token_type))
    assert re.search(says, str(raised.value.description if hasattr(raised.value, "description") else raised.value))


def test_a_user_token_with_a_jti_is_single_use(setup: Any) -> None:
    kit, signer, verifier = setup
    token = signer.sign(user_claims(kit))
    run(verifier.verify(token, ID_TOKEN))
    with pytest.raises(ReplayDetected, match="already been used"):
        run(verifier.verify(token, ID_TOKEN))


def test_a_refused_token_is_not_burnt(setup: Any, clock: FixedClock) -> None:
    kit, signer, verifier = setup
    token = signer.sign(user_claims(kit))
    with pytest.raises(InvalidRequest):
        run(verifier.verify(token, ACCESS))
    assert run(verifier.verify(token, ID_TOKEN)).subject == "c-42"


def test_session_tokens_of_a_reusing_issuer(kit: Any, clock: FixedClock, store: SqliteStateStore) -> None:
    signer = kit.make_signer("ES256")
    config = UserIssuerConfig(issuer=ISS, audience=AUD, kind="dev", single_use=False)
    verifier = UserTokenVerifier([config], store, clock, key_sources={ISS: JwksSource.from_jwks(signer.jwks())})
    token = signer.sign(user_claims(kit))
    assert run(verifier.verify(token, ID_TOKEN)) == run(verifier.verify(token, ID_TOKEN))


@pytest.mark.parametrize(("config", "says"), [
    ({"algorithms": ["HS256"]}, "symmetric algorithm"),
    ({"algorithms": ["none"]}, "never allowed"),
    ({"claims": {"sub": "x"}}, "other than sub and iss"),
    ({"claims": {"Tenant": "tid"}}, "lower-case identifier"),
    ({"token_types": ["urn:x"]}, "token_types"),
    ({"jwks_url": "http://idp.example.org/jwks"}, "https"),
    ({}, "needs jwks_file or jwks_url"),
])
def test_user_issuer_config_is_refused(config: dict[str, Any], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        UserIssuerConfig(issuer=ISS, audience=AUD, **config)


def test_a_user_issuer_cannot_be_a_workload_issuer_or_the_broker(tmp_path: Any) -> None:
    from broker.config import load_settings

    user = {"issuer": "https://spire.example.org", "audience": AUD, "jwks_url": "https://spire.example.org/k"}
    trust = {"issuer": "https://spire.example.org", "kind": "spiffe-jwt", "audience": "nhi-broker",
             "trust_domain": "example.org", "jwks_url": "https://spire.example.org/k"}
    with pytest.raises(ConfigError, match="also a workload or operator issuer"):
        load_settings(trust=[trust], user_issuers=[user], data_dir=tmp_path)
    with pytest.raises(ConfigError, match="cannot be the broker itself"):
        load_settings(public_url="https://broker.example.org", data_dir=tmp_path,
                      user_issuers=[{**user, "issuer": "https://broker.example.org"}])
