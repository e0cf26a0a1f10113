"""Delegation and agent-to-agent attenuation over real HTTP against ``nhi-broker serve``.

A delegated exchange (RFC 8693 §2.1: ``actor_token`` = the workload, ``subject_token`` = a verified
end user) yields ``sub`` = the user, ``sub_id`` = RFC 9493 ``iss_sub`` and ``act.sub`` = the SPIFFE ID,
checked with an independent JOSE library (jwcrypto). A refund for another customer than the verified
user is denied by the named rule. A sub-agent narrows its parent's token: wider requests are refused
with ``invalid_target``, a narrower one gets the nested ``act`` and a ledger entry pointing at the
parent's. Each attack input names the status and ``error`` it must get.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jwcrypto import jwk as jwcrypto_jwk
from jwcrypto import jwt as jwcrypto_jwt

from broker.attest.dev import DEV_USER_ISSUER, DevIssuer, DevUserIssuer
from broker.clock import SystemClock
from tests.helpers import SUPPORT, TRIAGE, LiveBroker, exchange_form, intent, run

NHI = str(Path(sys.executable).with_name("nhi-broker"))
EXECUTOR = "spiffe://example.org/ns/payments/sa/refund-executor"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ORDER = "customers/c-42/orders/ord-1001"
REFUND = {"customer": "c-42", "amount": 40, "currency": "EUR"}
CLOCK = SystemClock()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveBroker]:
    live = LiveBroker(tmp_path_factory.mktemp("deleg") / "data")
    try:
        yield live
    finally:
        live.stop()


def workload(broker: LiveBroker, spiffe_id: str = SUPPORT) -> str:
    return DevIssuer.load_or_create(broker.data_dir).mint(spiffe_id, "nhi-broker", clock=CLOCK)


def user(broker: LiveBroker, subject: str = "c-42", **kw: Any) -> str:
    return DevUserIssuer.load_or_create(broker.data_dir).mint_user(subject, "nhi-broker", clock=CLOCK, **kw)


def delegated(subject_token: str, actor_token: str, details: str, audience: str = "payments-api",
              subject_type: str = JWT_TYPE, **extra: str) -> dict[str, str]:
    form = exchange_form(subject_token, audience, details, actor_token=actor_token, actor_token_type=JWT_TYPE,
                         **extra)
    form["subject_token_type"] = subject_type
    return form


def verify_independently(broker: LiveBroker, token: str, audience: str = "payments-api") -> dict[str, Any]:
    jwks = httpx.get(broker.url + "/.well-known/jwks.json").json()
    keyset = jwcrypto_jwk.JWKSet.from_json(json.dumps(jwks))
    verified = jwcrypto_jwt.JWT(jwt=token, key=keyset, algs=["ES256"],
                                check_claims={"iss": broker.url, "aud": audience, "exp": None})
    claims: dict[str, Any] = json.loads(verified.claims)
    return claims


def entry_at(broker: LiveBroker, index: int) -> dict[str, Any]:
    body = httpx.get(broker.url + "/v1/ledger/entries", params={"start": index, "end": index + 1}).json()
    parsed: dict[str, Any] = json.loads(base64.b64decode(body["entries"][0]["leaf"]))
    return parsed


def post(broker: LiveBroker, form: dict[str, str]) -> httpx.Response:
    return httpx.post(broker.url + "/v1/token", data=form, timeout=30)


def refund_context(**changes: Any) -> dict[str, Any]:
    """A refund context in a conversation of its own (the sample budget is per conversation per day)."""
    return {**REFUND, "conversation": uuid.uuid4().hex, **changes}


def parent_token(broker: LiveBroker, context: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    r = post(broker, delegated(user(broker), workload(broker),
                               intent("payments.refund", ORDER, **(context or refund_context()))))
    assert r.status_code == 200, r.text
    return r.json()["access_token"], r.json()


def test_delegated_exchange_names_the_user_and_the_actor(broker: LiveBroker) -> None:
    r = post(broker, delegated(user(broker), workload(broker), intent("payments.refund", ORDER, **refund_context())))
    assert r.status_code == 200, r.text
    claims = verify_independently(broker, r.json()["access_token"])
    assert claims["sub"] == "c-42"
    assert claims["sub_id"] == {"format": "iss_sub", "iss": DEV_USER_ISSUER, "sub": "c-42"}
    assert claims["act"] == {"sub": SUPPORT}
    assert claims["client_id"] == "support-assistant"  # client_id and owner stay the workload's
    assert claims["owner"].startswith("Dana Reyes")
    entry = entry_at(broker, r.json()["receipt"]["index"])
    assert entry["user"]["iss"] == DEV_USER_ISSUER and entry["user"]["sub"] == "c-42"
    assert entry["user"]["evidence_digest"].startswith("sha256:")
    assert entry["workload"]["spiffe_id"] == SUPPORT


def test_plain_exchange_is_unchanged(broker: LiveBroker) -> None:
    details = intent("orders.read", ORDER, customer="c-42")
    r = post(broker, exchange_form(workload(broker), "orders-api", details))
    assert r.status_code == 200, r.text
    claims = verify_independently(broker, r.json()["access_token"], audience="orders-api")
    assert claims["sub"] == SUPPORT and "act" not in claims and "sub_id" not in claims
    assert "user" not in entry_at(broker, r.json()["receipt"]["index"])


def test_a_refund_without_a_verified_user_is_denied_by_its_rule(broker: LiveBroker) -> None:
    # A plain exchange: the customer in the context is only the bot's word, so no refund is issued.
    r = post(broker, exchange_form(workload(broker), "payments-api", intent("payments.refund", ORDER,
                                                                           **refund_context())))
    assert r.status_code == 403, r.text
    assert r.json()["error"] == "access_denied"
    assert r.json()["error_description"] == "denied by rule refund-requires-verified-user"
    assert r.json()["rule_id"] == "refund-requires-verified-user"
    checkpoint = httpx.get(broker.url + "/v1/ledger/checkpoint").text.splitlines()
    denial = entry_at(broker, int(checkpoint[1]) - 1)
    assert denial["kind"] == "denial" and denial["decision"]["rule"] == "refund-requires-verified-user"
    assert "user" not in denial


def test_cross_customer_refund_is_denied_because_the_user_is_verified(broker: LiveBroker) -> None:
    other = intent("payments.refund", "customers/c-77/orders/ord-9", customer="c-77", amount=20, currency="EUR")
    r = post(broker, delegated(user(broker, "c-42"), workload(broker), other))
    assert r.status_code == 403, r.text
    assert r.json()["error"] == "access_denied"
    assert r.json()["rule_id"] == "refund-other-customer"
    # The denial is in the ledger with the verified user.
    checkpoint = httpx.get(broker.url + "/v1/ledger/checkpoint").text.splitlines()
    denial = entry_at(broker, int(checkpoint[1]) - 1)
    assert denial["kind"] == "denial" and denial["decision"]["rule"] == "refund-other-customer"
    assert denial["user"]["sub"] == "c-42"


def test_dev_user_cli_prints_a_usable_user_token(broker: LiveBroker) -> None:
    out = subprocess.run([NHI, "dev", "user", "c-42", "--data-dir", str(broker.data_dir)],
                         capture_output=True, text=True, check=True, timeout=60)
    details = intent("payments.refund", ORDER, **refund_context())
    r = post(broker, delegated(out.stdout.strip(), workload(broker), details))
    assert r.status_code == 200, r.text


# Attack inputs on the delegated exchange, each with the status and error it must get.
def _hs256_user(broker: LiveBroker) -> str:
    import jwt as pyjwt

    now = int(CLOCK.now())
    return pyjwt.encode({"iss": DEV_USER_ISSUER, "sub": "c-42", "aud": "nhi-broker", "iat": now, "exp": now + 60},
                        "k" * 32, algorithm="HS256")


def _none_user(broker: LiveBroker) -> str:
    now = int(CLOCK.now())
    seg = [base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode() for part in (
        {"alg": "none", "typ": "JWT"},
        {"iss": DEV_USER_ISSUER, "sub": "c-42", "aud": "nhi-broker", "iat": now, "exp": now + 60})]
    return f"{seg[0]}.{seg[1]}.AAAA"


def _replayed_user(broker: LiveBroker) -> str:
    token = user(broker, jti="replayed-once")
    first = post(broker, delegated(token, workload(broker), intent("payments.refund", ORDER, **refund_context())))
    assert first.status_code == 200, first.text
    return token


def _foreign_issuer_user(broker: LiveBroker) -> str:
    # A workload identity token (the trial workload issuer) presented as the end user.
    return workload(broker, TRIAGE)


DELEGATION_ATTACKS = [
    ("user token of an unknown issuer", lambda b: (_foreign_issuer_user(b), workload(b)), 400, "invalid_grant",
     "unknown user issuer"),
    ("user token for another audience", lambda b: (
        DevUserIssuer.load_or_create(b.data_dir).mint_user("c-42", "someone-else", clock=CLOCK), workload(b)),
     400, "invalid_grant", "audience mismatch"),
    ("expired user token", lambda b: (
        DevUserIssuer.load_or_create(b.data_dir).mint_user("c-42", "nhi-broker", clock=_Past(), ttl=60),
        workload(b)), 400, "invalid_grant", "has expired"),
    ("replayed user token jti", lambda b: (_replayed_user(b), workload(b)), 400, "invalid_grant",
     "already been used"),
    ("user token with alg none", lambda b: (_none_user(b), workload(b)), 400, "invalid_grant",
     "algorithm none is not allowed"),
    ("user token with HS256", lambda b: (_hs256_user(b), workload(b)), 400, "invalid_grant",
     "algorithm HS256 is not allowed"),
    ("actor_token that is a user token", lambda b: (user(b), user(b)), 400, "invalid_grant", "unknown issuer"),
    ("actor_token of an unregistered workload", lambda b: (
        user(b), workload(b, "spiffe://example.org/ns/x/sa/nobody")), 403, "access_denied", "not registered"),
]


class _Past:
    def now(self) -> float:
        return CLOCK.now() - 3600


@pytest.mark.parametrize(("name", "make", "status", "error", "says"), DELEGATION_ATTACKS,
                         ids=[a[0] for a in DELEGATION_ATTACKS])
def test_delegation_attacks(broker: LiveBroker, name: str, make: Any, status: int, error: str, says: str) -> None:
    subject, actor = make(broker)
    r = post(broker, delegated(subject, actor, intent("payments.refund", ORDER, **refund_context())))
    assert r.status_code == status, r.text
    assert r.json()["error"] == error
    assert says in r.json()["error_description"]


def test_actor_token_without_its_type_is_refused(broker: LiveBroker) -> None:
    form = exchange_form(user(broker), "payments-api", intent("payments.refund", ORDER, **refund_context()),
                         actor_token=workload(broker))
    r = post(broker, form)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_request")
    assert "actor_token_type is required" in r.json()["error_description"]


# --- agent-to-agent attenuation -----------------------------------------------------------------

def child_form(parent: str, details: str, audience: str = "payments-api", actor: str | None = None,
               broker: LiveBroker | None = None) -> dict[str, str]:
    assert broker is not None
    return delegated(parent, actor or workload(broker, EXECUTOR), details, audience=audience,
                     subject_type=ACCESS_TOKEN_TYPE)


def test_narrower_child_gets_nested_act_and_points_at_the_parent(broker: LiveBroker) -> None:
    context = refund_context()
    parent, parent_body = parent_token(broker, context)
    parent_claims = verify_independently(broker, parent)
    narrower = intent("payments.refund", ORDER, **{**context, "amount": 25})
    r = post(broker, child_form(parent, narrower, broker=broker))
    assert r.status_code == 200, r.text
    claims = verify_independently(broker, r.json()["access_token"])
    assert claims["sub"] == "c-42"
    assert claims["sub_id"] == parent_claims["sub_id"]
    assert claims["act"] == {"sub": EXECUTOR, "act": {"sub": SUPPORT}}
    assert claims["client_id"] == "refund-executor"
    assert claims["exp"] <= parent_claims["exp"]  # never outlives its parent
    assert claims["authorization_details"] == json.loads(narrower)
    entry = entry_at(broker, r.json()["receipt"]["index"])
    assert entry["parent"] == {"jti": parent_claims["jti"], "txn": parent_body["receipt"]["leaf_hash"],
                               "client_id": "support-assistant"}
    assert entry["user"] == {"iss": DEV_USER_ISSUER, "sub": "c-42"}


def _change(**changes: Any) -> Any:
    return lambda ctx: {**ctx, **changes}


def _drop(key: str) -> Any:
    return lambda ctx: {k: v for k, v in ctx.items() if k != key}


def _same(ctx: dict[str, Any]) -> dict[str, Any]:
    return ctx


# (name, parent maker, action, resource, context change, audience, child actor (None: refund-executor),
#  status, error, what the description says)
CHILD_ATTACKS: list[tuple[str, Any, str, str, Any, str, str | None, int, str, str]] = [
    ("numeric limit raised", parent_token, "payments.refund", ORDER, _change(amount=41), "payments-api", None,
     400, "invalid_target", "context.amount"),
    ("resource widened", parent_token, "payments.refund", "customers/c-42/orders", _same, "payments-api", None,
     400, "invalid_target", "resource"),
    ("resource moved to another customer", parent_token, "payments.refund", "customers/c-77/orders/ord-1", _same,
     "payments-api", None, 400, "invalid_target", "resource"),
    ("action changed", parent_token, "orders.cancel", ORDER, _same, "payments-api", None,
     400, "invalid_target", "action"),
    ("audience changed", parent_token, "payments.refund", ORDER, _same, "orders-api", None,
     400, "invalid_target", "audience"),
    ("string context changed", parent_token, "payments.refund", ORDER, _change(amount=10, currency="USD"),
     "payments-api", None, 400, "invalid_target", "context.currency"),
    # (Dropping currency while keeping amount is refused earlier: an amount needs its currency.)
    ("context key dropped", parent_token, "payments.refund", ORDER, _drop("conversation"), "payments-api", None,
     400, "invalid_target", "context keys"),
    ("context key added", parent_token, "payments.refund", ORDER, _change(note="x"), "payments-api", None,
     400, "invalid_target", "context keys"),
    ("task token of a workload the child takes no sub-tasks from", parent_token, "payments.refund", ORDER, _same,
     "payments-api", TRIAGE, 403, "access_denied", "does not take sub-tasks"),
    ("DPoP-bound parent", "dpop", "payments.refund", ORDER, _same, "payments-api", None,
     400, "invalid_grant", "DPoP-bound"),
    ("revoked parent", "revoked", "payments.refund", ORDER, _same, "payments-api", None,
     400, "invalid_grant", "no longer active"),
    ("tampered parent", "tampered", "payments.refund", ORDER, _same, "payments-api", None,
     400, "invalid_grant", "not a valid task token"),
]


def _make_parent(broker: LiveBroker, how: Any, context: dict[str, Any]) -> str:
    if how == "dpop":
        return _dpop_bound_parent(broker, context)
    token = parent_token(broker, context)[0]
    if how == "revoked":
        _revoke(broker, token)
    elif how == "tampered":
        token = token[:-4] + "AAAA"
    return token


def _dpop_bound_parent(broker: LiveBroker, context: dict[str, Any]) -> str:
    from nhi_broker_client import DPoPKey

    key = DPoPKey.generate()
    proof = key.proof("POST", broker.url + "/v1/token")
    r = httpx.post(broker.url + "/v1/token", headers={"DPoP": proof},
                   data=delegated(user(broker), workload(broker), intent("payments.refund", ORDER, **context)))
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"])


def _revoke(broker: LiveBroker, token: str) -> None:
    from broker.config import Settings
    from broker.runtime import Runtime

    claims = verify_independently(broker, token)
    runtime = Runtime.open(Settings(data_dir=broker.data_dir))
    try:
        assert runtime.state is not None
        run(runtime.state.tokens.revoke_token(claims["jti"], claims["exp"]))
    finally:
        runtime.close()


@pytest.mark.parametrize(("name", "how", "action", "resource", "change", "audience", "actor", "status", "error",
                          "says"), CHILD_ATTACKS, ids=[a[0] for a in CHILD_ATTACKS])
def test_child_attacks(broker: LiveBroker, name: str, how: Any, action: str, resource: str, change: Any,
                       audience: str, actor: str | None, status: int, error: str, says: str) -> None:
    context = refund_context()
    parent = _make_parent(broker, how, context)
    details = intent(action, resource, **change(context))
    r = post(broker, child_form(parent, details, audience=audience,
                                actor=workload(broker, actor) if actor else None, broker=broker))
    assert r.status_code == status, r.text
    assert r.json()["error"] == error
    assert says in r.json()["error_description"]


def test_parent_token_type_must_be_an_access_token_or_jwt(broker: LiveBroker) -> None:
    parent, _ = parent_token(broker)
    form = child_form(parent, intent("payments.refund", ORDER, **refund_context()), broker=broker)
    form["subject_token_type"] = "urn:ietf:params:oauth:token-type:id_token"
    r = post(broker, form)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_request")


# --- the SDK speaks it (sync and async) ----------------------------------------------------------

def test_sdk_delegation_and_child_exchange_sync(broker: LiveBroker) -> None:
    from nhi_broker_client import BrokerClient, BrokerResponseError

    context = refund_context()
    with BrokerClient(broker.url, actor=lambda: workload(broker), user_token=lambda: user(broker), dpop=False) as bot:
        parent = bot.get_token("payments-api", "payments.refund", ORDER, context)
        assert verify_independently(broker, parent.access_token)["act"] == {"sub": SUPPORT}
        with pytest.raises(BrokerResponseError) as refused:
            bot.get_token("payments-api", "payments.refund", "customers/c-77/orders/o-1",
                          {**context, "customer": "c-77"})
        assert (refused.value.code, refused.value.rule_id) == ("access_denied", "refund-other-customer")
    with BrokerClient(broker.url, lambda: workload(broker, EXECUTOR)) as sub_agent:
        child = sub_agent.narrow(parent, "payments-api", "payments.refund", ORDER, {**context, "amount": 10})
        claims = verify_independently(broker, child.access_token)
        assert claims["act"] == {"sub": EXECUTOR, "act": {"sub": SUPPORT}}
        with pytest.raises(BrokerResponseError) as wider:
            sub_agent.narrow(parent.access_token, "payments-api", "payments.refund", ORDER, {**context, "amount": 99})
        assert wider.value.code == "invalid_target"


def test_sdk_delegation_and_child_exchange_async(broker: LiveBroker) -> None:
    import asyncio

    from nhi_broker_client import AsyncBrokerClient

    async def run() -> dict[str, Any]:
        context = refund_context()

        async def fresh_user() -> str:
            return user(broker)

        async with AsyncBrokerClient(broker.url, actor=lambda: workload(broker), user_token=fresh_user,
                                     dpop=False) as bot:
            parent = await bot.get_token("payments-api", "payments.refund", ORDER, context)
        async with AsyncBrokerClient(broker.url, lambda: workload(broker, EXECUTOR)) as sub_agent:
            child = await sub_agent.narrow(parent, "payments-api", "payments.refund", ORDER, context)
        return verify_independently(broker, child.access_token)

    claims = asyncio.run(run())
    assert claims["sub"] == "c-42" and claims["act"]["act"] == {"sub": SUPPORT}


def test_a_single_use_parent_hands_on_its_one_use(broker: LiveBroker) -> None:
    """refund-small-eur tokens are single use (limits.toml): a child takes that use over, once."""
    context = refund_context()
    parent, _ = parent_token(broker, context)
    assert verify_independently(broker, parent)["num_uses"] == 1
    wider = post(broker, child_form(parent, intent("payments.refund", ORDER, **{**context, "amount": 99}),
                                    broker=broker))
    assert (wider.status_code, wider.json()["error"]) == (400, "invalid_target")  # a refusal spends nothing
    first = post(broker, child_form(parent, intent("payments.refund", ORDER, **context), broker=broker))
    assert first.status_code == 200, first.text
    assert verify_independently(broker, first.json()["access_token"])["num_uses"] == 1
    second = post(broker, child_form(parent, intent("payments.refund", ORDER, **context), broker=broker))
    assert (second.status_code, second.json()["error"]) == (400, "invalid_grant")
    assert "no uses left" in second.json()["error_description"]
    # ... and the parent itself is spent at the resource server's introspection too.
    from broker.config import Settings
    from broker.runtime import Runtime

    runtime = Runtime.open(Settings(data_dir=broker.data_dir))
    try:
        assert runtime.state is not None
        claims = verify_independently(broker, parent)
        assert run(runtime.state.tokens.status(claims, consume_use=True)).active is False
    finally:
        runtime.close()
