"""BrokerClient / AsyncBrokerClient against a live broker: exchange, DPoP binding (checked with jwcrypto),
caching, nonce retry and typed errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from jwcrypto import jwk as jwcrypto_jwk
from jwcrypto import jws as jwcrypto_jws
from jwcrypto import jwt as jwcrypto_jwt
from nhi_broker_client import (
    AccessDeniedError,
    AsyncBrokerClient,
    BrokerClient,
    DPoPKey,
    InvalidDPoPProofError,
    InvalidGrantError,
    InvalidRequestError,
    TransportError,
    access_token_hash,
)

from broker.api.app import create_app
from broker.attest.dev import DevIssuer
from broker.clock import SystemClock
from broker.config import Settings
from tests.helpers import POLICIES, SUPPORT, LiveBroker, free_port

ORDER = "customers/c-42/orders/ord-1001"
REFUND_20 = {"customer": "c-42", "amount": 20, "currency": "EUR"}


def claims_of(broker: LiveBroker, token: str) -> dict[str, Any]:
    keyset = jwcrypto_jwk.JWKSet.from_json(json.dumps(httpx.get(broker.url + "/.well-known/jwks.json").json()))
    return json.loads(jwcrypto_jwt.JWT(jwt=token, key=keyset, algs=["ES256"]).claims)


def test_exchange_gives_a_dpop_bound_token(broker: LiveBroker, identity: Callable[[], str],
                                           customer: Callable[[], str]) -> None:
    with BrokerClient(broker.url, actor=identity, user_token=customer) as client:
        token = client.get_token("payments-api", "payments.refund", ORDER, REFUND_20)
        assert token.token_type == "DPoP"
        assert "access_token" not in repr(token) and token.access_token not in repr(token)
        claims = claims_of(broker, token.access_token)
        assert client.dpop_key is not None
        assert claims["cnf"]["jkt"] == jwcrypto_jwk.JWK(**client.dpop_key.public_jwk).thumbprint()
        assert claims["authorization_details"][0]["context"] == REFUND_20
        assert claims["txn"] == token.receipt_leaf_hash
        # The resource-side proof is a valid JWS (jwcrypto), for this request and this token.
        headers = token.headers("post", "https://payments.example/refunds?x=1")
        assert headers["Authorization"] == f"DPoP {token.access_token}"
        proof = jwcrypto_jws.JWS()
        proof.deserialize(headers["DPoP"])
        proof.verify(jwcrypto_jwk.JWK(**client.dpop_key.public_jwk), alg="ES256")
        body = json.loads(proof.payload)
        assert body["htm"] == "POST" and body["htu"] == "https://payments.example/refunds"
        assert body["ath"] == access_token_hash(token.access_token)


def test_tokens_are_cached_per_intent_until_shortly_before_expiry(
    broker: LiveBroker, identity: Callable[[], str], customer: Callable[[], str]
) -> None:
    with BrokerClient(broker.url, actor=identity, user_token=customer, refresh_margin=30) as client:
        first = client.get_token("payments-api", "payments.refund", ORDER, REFUND_20)
        assert client.get_token("payments-api", "payments.refund", ORDER, dict(REFUND_20)) is first
        other = client.get_token("orders-api", "orders.read", ORDER, {"customer": "c-42"})
        assert other is not first
        assert client.get_token("payments-api", "payments.refund", ORDER, REFUND_20, fresh=True) is not first
    # The refund rule caps tokens at 120 s: with a 121 s margin every cached token is already too old.
    with BrokerClient(broker.url, actor=identity, user_token=customer, refresh_margin=121) as eager:
        token = eager.get_token("payments-api", "payments.refund", ORDER, REFUND_20)
        assert eager.get_token("payments-api", "payments.refund", ORDER, REFUND_20) is not token


def test_errors_are_typed(broker: LiveBroker, identity: Callable[[], str], customer: Callable[[], str]) -> None:
    with BrokerClient(broker.url, actor=identity, user_token=customer) as client:
        with pytest.raises(AccessDeniedError) as denied:
            client.get_token("payments-api", "payments.refund", ORDER, {**REFUND_20, "amount": 500})
        assert denied.value.code == "access_denied" and denied.value.status == 403
        assert denied.value.rule_id is None  # over every limit: no rule allows it
        with pytest.raises(InvalidRequestError) as target:
            client.get_token("tickets-api", "orders.read", ORDER, {"customer": "c-42"})
        assert target.value.code == "invalid_target"
    with BrokerClient(broker.url, identity, dpop=False) as bearer:
        with pytest.raises(AccessDeniedError) as unverified:  # a refund is only for a verified customer
            bearer.get_token("payments-api", "payments.refund", ORDER, REFUND_20)
        assert unverified.value.rule_id == "refund-requires-verified-user"
        assert bearer.get_token("orders-api", "orders.read", ORDER, {"customer": "c-42"}).token_type == "Bearer"
        with pytest.raises(InvalidDPoPProofError, match="orders-cancel-dpop") as required:
            bearer.get_token("orders-api", "orders.cancel", ORDER, {"customer": "c-42"})
        assert required.value.rule_id is None and required.value.status == 400
    spent = identity()
    with BrokerClient(broker.url, spent) as once:
        once.get_token("orders-api", "orders.read", ORDER, {"customer": "c-42"})
        with pytest.raises(InvalidGrantError, match="already been used"):
            once.get_token("orders-api", "orders.read", ORDER, {"customer": "c-9"})
    with BrokerClient(f"http://127.0.0.1:{free_port()}", identity, timeout=2) as nowhere, pytest.raises(TransportError):
        nowhere.get_token("orders-api", "orders.read", ORDER, {"customer": "c-42"})


def test_identity_bound_key(broker: LiveBroker) -> None:
    key = DPoPKey.generate()
    issuer = DevIssuer.load_or_create(broker.data_dir)

    def bound_identity() -> str:
        return issuer.mint(SUPPORT, "nhi-broker", clock=SystemClock(), cnf_jwk=key.public_jwk)

    update = ("orders-api", "customers.update", "customers/c-42", {"customer": "c-42"})
    with BrokerClient(broker.url, bound_identity, dpop_key=key) as client:
        assert client.get_token(*update).token_type == "DPoP"
    with BrokerClient(broker.url, bound_identity) as other_key, pytest.raises(InvalidDPoPProofError,
                                                                               match="identity is bound"):
        other_key.get_token(*update)


def test_async_client(broker: LiveBroker, identity: Callable[[], str], customer: Callable[[], str]) -> None:
    async def identity_async() -> str:
        return identity()

    async def customer_async() -> str:
        return customer()

    async def run() -> None:
        async with AsyncBrokerClient(broker.url, actor=identity_async, user_token=customer_async) as client:
            token = await client.get_token("payments-api", "payments.refund", ORDER, REFUND_20)
            assert token.token_type == "DPoP"
            assert await client.get_token("payments-api", "payments.refund", ORDER, REFUND_20) is token
            with pytest.raises(AccessDeniedError):
                await client.get_token("payments-api", "payments.refund", ORDER, {**REFUND_20, "amount": 500})

    asyncio.run(run())


def test_nonce_is_fetched_and_retried_once(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", policies_dir=POLICIES, dpop_nonce=True)
    with TestClient(create_app(settings), base_url=settings.issuer_url) as http:
        issuer = DevIssuer.load_or_create(settings.data_dir)
        spent: list[str] = []

        def ident() -> str:
            spent.append(issuer.mint(SUPPORT, "nhi-broker", clock=SystemClock()))
            return spent[-1]

        client = BrokerClient(settings.issuer_url, ident, http_client=http)
        first = client.get_token("orders-api", "orders.read", ORDER, {"customer": "c-42"})
        assert first.token_type == "DPoP"
        assert len(spent) == 1  # the nonce round trip did not spend a second identity
        client.get_token("orders-api", "orders.list", "customers/c-42/orders", {"customer": "c-42"})
        assert len(spent) == 2
