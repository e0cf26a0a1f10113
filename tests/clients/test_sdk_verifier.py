"""TaskTokenVerifier and the FastAPI dependency: a real resource service (in process) verifying task
tokens minted by a live broker, with the broker's JWKS fetched over HTTP. Each attack names its error."""

# No `from __future__ import annotations`: FastAPI must see the route's Annotated dependency as an object.

import base64
import json
import time
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import httpx
import jwt
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from nhi_broker_client import (
    BrokerClient,
    DPoPKey,
    IntentMismatchError,
    InvalidDPoPError,
    InvalidTokenError,
    KeysUnavailableError,
    TaskToken,
    TaskTokenVerifier,
    VerifiedTaskToken,
)
from nhi_broker_client.fastapi import TaskTokenDependency, install_exception_handlers
from pydantic import BaseModel

from tests.helpers import LiveBroker, free_port

ORDER = "customers/c-42/orders/ord-1001"
REFUND_20 = {"customer": "c-42", "amount": 20, "currency": "EUR"}
SERVICE = "http://payments.test"
URL = f"{SERVICE}/customers/c-42/orders/ord-1001/refunds"


class Refund(BaseModel):
    amount: float
    currency: str


def payments_app(verifier: TaskTokenVerifier) -> FastAPI:
    app = FastAPI()
    install_exception_handlers(app)
    token_dep = Annotated[VerifiedTaskToken, Depends(TaskTokenDependency(verifier))]

    @app.post("/customers/{customer}/orders/{order}/refunds")
    def refund(customer: str, order: str, body: Refund, token: token_dep) -> dict[str, Any]:
        amount: float | int = int(body.amount) if body.amount.is_integer() else body.amount
        token.require_intent("payments.refund", f"customers/{customer}/orders/{order}",
                             {"customer": customer, "amount": amount, "currency": body.currency})
        return {"refunded": amount, "by": token.subject, "txn": token.txn}

    return app


@pytest.fixture(scope="module")
def client(broker: LiveBroker, identity: Callable[[], str], customer: Callable[[], str]) -> Iterator[BrokerClient]:
    # Refunds are delegated: the assistant acts for the verified customer c-42.
    with BrokerClient(broker.url, actor=identity, user_token=customer) as c:
        yield c


@pytest.fixture
def verifier(broker: LiveBroker) -> Iterator[TaskTokenVerifier]:
    with TaskTokenVerifier(broker.url, "payments-api") as v:
        yield v


@pytest.fixture
def service(verifier: TaskTokenVerifier) -> Iterator[TestClient]:
    with TestClient(payments_app(verifier), base_url=SERVICE, raise_server_exceptions=False) as c:
        yield c


def refund_token(client: BrokerClient, **context: Any) -> TaskToken:
    return client.get_token("payments-api", "payments.refund", ORDER, {**REFUND_20, **context}, fresh=True)


def test_refund_with_a_fresh_dpop_token(client: BrokerClient, service: TestClient) -> None:
    token = refund_token(client)
    r = service.post(URL, json={"amount": 20, "currency": "EUR"}, headers=token.headers("POST", URL))
    assert r.status_code == 200, r.text
    assert r.json()["refunded"] == 20 and r.json()["txn"] == token.receipt_leaf_hash


def _swap_key(token: TaskToken) -> dict[str, str]:
    """A copied token presented with a proof made by another key (the thief's)."""
    thief = DPoPKey.generate()
    return {"Authorization": f"DPoP {token.access_token}",
            "DPoP": thief.proof("POST", URL, access_token=token.access_token)}


def _bearer(token: TaskToken) -> dict[str, str]:
    return {"Authorization": f"Bearer {token.access_token}"}


def _no_proof(token: TaskToken) -> dict[str, str]:
    return {"Authorization": f"DPoP {token.access_token}"}


def _other_url(token: TaskToken) -> dict[str, str]:
    return token.headers("POST", f"{SERVICE}/customers/c-42/orders/ord-1001/other")


def _get_proof(token: TaskToken) -> dict[str, str]:
    return token.headers("GET", URL)


def _no_ath(token: TaskToken) -> dict[str, str]:
    assert token.dpop_key is not None
    return {"Authorization": f"DPoP {token.access_token}", "DPoP": token.dpop_key.proof("POST", URL)}


def _old_proof(token: TaskToken) -> dict[str, str]:
    assert token.dpop_key is not None
    return {"Authorization": f"DPoP {token.access_token}",
            "DPoP": token.dpop_key.proof("POST", URL, access_token=token.access_token, now=time.time() - 120)}


def _tampered(token: TaskToken) -> dict[str, str]:
    header, payload, signature = token.access_token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["authorization_details"][0]["context"]["amount"] = 500
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return {"Authorization": f"DPoP {header}.{forged}.{signature}",
            "DPoP": token.dpop_key.proof("POST", URL, access_token=f"{header}.{forged}.{signature}")}  # type: ignore


def _not_a_jwt(token: TaskToken) -> dict[str, str]:
    return {"Authorization": "DPoP not-a-token"}


def _no_header(token: TaskToken) -> dict[str, str]:
    return {}


ATTACKS = [
    ("token replayed from another key", _swap_key, 401, "invalid_dpop_proof", "not the key the token is bound to"),
    ("bound token sent as bearer", _bearer, 401, "invalid_token", "must be sent with the DPoP scheme"),
    ("bound token without proof", _no_proof, 401, "invalid_dpop_proof", "needs a DPoP proof"),
    ("proof for another URL", _other_url, 401, "invalid_dpop_proof", "'htu' does not match"),
    ("proof for another method", _get_proof, 401, "invalid_dpop_proof", "'htm' does not match"),
    ("proof without ath", _no_ath, 401, "invalid_dpop_proof", "missing claim 'ath'"),
    ("stale proof", _old_proof, 401, "invalid_dpop_proof", "older than 60 s"),
    ("tampered claims", _tampered, 401, "invalid_token", "signature verification failed"),
    ("not a JWT", _not_a_jwt, 401, "invalid_token", "not a compact JWS"),
    ("no Authorization", _no_header, 401, "invalid_token", "no Authorization header"),
]


@pytest.mark.parametrize(("name", "make", "status", "error", "why"), ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attacks_are_refused(client: BrokerClient, service: TestClient, name: str, make: Any, status: int,
                             error: str, why: str) -> None:
    r = service.post(URL, json={"amount": 20, "currency": "EUR"}, headers=make(refund_token(client)))
    assert r.status_code == status, r.text
    assert r.json()["detail"]["error"] == error
    assert why in r.json()["detail"]["error_description"]
    assert r.headers["WWW-Authenticate"].startswith(f'DPoP error="{error}"')


def test_a_proof_is_accepted_once(client: BrokerClient, service: TestClient) -> None:
    token = refund_token(client)
    headers = token.headers("POST", URL)
    assert service.post(URL, json={"amount": 20, "currency": "EUR"}, headers=headers).status_code == 200
    again = service.post(URL, json={"amount": 20, "currency": "EUR"}, headers=headers)
    assert again.status_code == 401
    assert "already been used" in again.json()["detail"]["error_description"]


@pytest.mark.parametrize(("body", "why"), [
    ({"amount": 500, "currency": "EUR"}, "context 'amount' differs from the grant"),
    ({"amount": 20, "currency": "USD"}, "context 'currency' differs from the grant"),
])
def test_the_request_must_be_the_granted_intent(client: BrokerClient, service: TestClient, body: dict[str, Any],
                                               why: str) -> None:
    token = refund_token(client)
    r = service.post(URL, json=body, headers=token.headers("POST", URL))
    assert r.status_code == 403
    assert r.json() == {"error": "insufficient_scope", "error_description": why}


def test_intent_helper_compares_json_values_strictly(client: BrokerClient, verifier: TaskTokenVerifier) -> None:
    token = refund_token(client)
    h = token.headers("POST", URL)
    verified = verifier.verify_request(h["Authorization"], h["DPoP"], "POST", URL)
    verified.require_intent("payments.refund", ORDER, {"customer": "c-42", "amount": 20.0, "currency": "EUR"})
    for action, resource, context, why in [
        ("payments.refund", ORDER, {**REFUND_20, "amount": "20"}, "'amount' differs"),
        ("payments.refund", ORDER, {**REFUND_20, "amount": True}, "'amount' differs"),
        ("payments.refund", ORDER, {"customer": "c-42", "amount": 20}, "does not state context 'currency'"),
        ("payments.refund", ORDER, {**REFUND_20, "reason": "x"}, "'reason' is not part of the grant"),
        ("payments.refund", "customers/c-42/orders/ord-9", REFUND_20, "resource"),
        ("orders.cancel", ORDER, REFUND_20, "action"),
    ]:
        with pytest.raises(IntentMismatchError, match=why):
            verified.require_intent(action, resource, context)
    with pytest.raises(TypeError):
        VerifiedTaskToken(**{f: getattr(verified, f) for f in ("issuer", "subject", "audience", "client_id", "owner",
                                                             "jti", "issued_at", "expires_at", "intent", "txn",
                                                             "cnf_jkt", "claims", "token")})


def _verify(verifier: TaskTokenVerifier, token: TaskToken) -> VerifiedTaskToken:
    h = token.headers("POST", URL)
    return verifier.verify_request(h["Authorization"], h.get("DPoP"), "POST", URL)


def test_audience_issuer_expiry_and_typ(broker: LiveBroker, client: BrokerClient, identity: Callable[[], str]) -> None:
    token = refund_token(client)
    with TaskTokenVerifier(broker.url, "orders-api") as orders, pytest.raises(InvalidTokenError, match="audience"):
        _verify(orders, token)
    with TaskTokenVerifier("http://127.0.0.1:1", "payments-api", jwks_url=broker.url + "/.well-known/jwks.json") as v:
        with pytest.raises(InvalidTokenError, match="another issuer"):
            _verify(v, token)
    late = time.time() + 121 + 30
    with TaskTokenVerifier(broker.url, "payments-api", clock=lambda: late) as v:
        with pytest.raises(InvalidTokenError, match="expired"):
            _verify(v, token)
    within_leeway = time.time() + 121 + 20
    with TaskTokenVerifier(broker.url, "payments-api", clock=lambda: within_leeway, dpop_max_age=600) as v:
        _verify(v, token)
    with TaskTokenVerifier(broker.url, "nhi-broker") as v:
        with pytest.raises(InvalidTokenError, match="typ is not at\\+jwt"):
            v.verify(identity(), scheme="Bearer")  # a workload identity JWT is not a task token


def test_bearer_tokens_and_require_dpop(broker: LiveBroker, identity: Callable[[], str],
                                        customer: Callable[[], str]) -> None:
    with BrokerClient(broker.url, actor=identity, user_token=customer, dpop=False) as bearer_client:
        token = refund_token(bearer_client)
    with TaskTokenVerifier(broker.url, "payments-api") as v:
        assert _verify(v, token).cnf_jkt is None
        with pytest.raises(InvalidTokenError, match="not DPoP-bound"):
            v.verify(token.access_token, scheme="DPoP")
    with TaskTokenVerifier(broker.url, "payments-api", require_dpop=True) as strict:
        with pytest.raises(InvalidTokenError, match="DPoP-bound tokens only"):
            _verify(strict, token)


def test_introspection_hook_can_revoke(broker: LiveBroker, client: BrokerClient) -> None:
    revoked: set[str] = set()
    with TaskTokenVerifier(broker.url, "payments-api", introspect=lambda t: t.jti not in revoked) as v:
        token = refund_token(client)
        verified = _verify(v, token)
        revoked.add(verified.jti)
        with pytest.raises(InvalidTokenError, match="no longer active"):
            _verify(v, token)


def test_jwks_is_cached_and_refetched_on_unknown_kid_rate_limited(broker: LiveBroker, client: BrokerClient) -> None:
    fetches: list[str] = []
    http = httpx.Client(event_hooks={"request": [lambda request: fetches.append(str(request.url))]})
    now = [time.time()]
    with http, TaskTokenVerifier(broker.url, "payments-api", http_client=http, clock=lambda: now[0]) as v:
        _verify(v, refund_token(client))
        _verify(v, refund_token(client))
        assert len(fetches) == 1
        token = refund_token(client)
        header, payload, signature = token.access_token.split(".")
        hdr = json.loads(base64.urlsafe_b64decode(header + "=="))
        hdr["kid"] = "rotated-key"
        unknown = base64.urlsafe_b64encode(json.dumps(hdr).encode()).rstrip(b"=").decode() + f".{payload}.{signature}"
        now[0] += 31  # past the minimum interval between fetches
        for _ in range(3):
            with pytest.raises(InvalidTokenError, match="no broker key matches"):
                v.verify(unknown, scheme="Bearer")
        assert len(fetches) == 2  # one refetch for the unknown kid, then rate limited
    with TaskTokenVerifier(f"http://127.0.0.1:{free_port()}", "payments-api") as offline:
        with pytest.raises(KeysUnavailableError):
            _verify(offline, token)


def test_verifier_refuses_symmetric_algorithms(broker: LiveBroker) -> None:
    with pytest.raises(ValueError, match="asymmetric"):
        TaskTokenVerifier(broker.url, "payments-api", algorithms=("HS256",))
    forged = jwt.encode({"iss": broker.url}, "s" * 32, algorithm="HS256", headers={"typ": "at+jwt", "kid": "k"})
    with TaskTokenVerifier(broker.url, "payments-api") as v, pytest.raises(InvalidTokenError, match="alg"):
        v.verify(forged, scheme="Bearer")


def test_a_bound_token_needs_its_proof_whatever_the_scheme(client: BrokerClient, verifier: TaskTokenVerifier) -> None:
    token = refund_token(client)
    with pytest.raises(InvalidDPoPError, match="needs a DPoP proof"):
        verifier.verify(token.access_token)
    proof = token.headers("POST", URL)["DPoP"]
    verified = verifier.verify(token.access_token, dpop_proof=proof, method="POST", url=URL)
    assert token.dpop_key is not None and verified.cnf_jkt == token.dpop_key.jkt
