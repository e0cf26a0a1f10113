"""MCP tools whose calls carry their intent: the real `mcp` client against the orders MCP server over HTTP
on loopback, with task tokens from a live broker. Every refusal names its reason; no refused call runs."""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
import uvicorn
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from nhi_broker_client import AccessDeniedError, AsyncBrokerClient, IntentMismatchError, TaskToken, ToolIntent
from nhi_broker_client.mcp import INTENT_REFUSED, TOKEN_REFUSED, IntentMCPClient, ToolCallPending

from broker.attest.dev import DevIssuer, DevUserIssuer
from broker.clock import SystemClock
from scripts.demo import prove
from scripts.orders_mcp import OrdersBook, create_orders_mcp
from tests.helpers import POLICIES, REPO, SUPPORT, LiveBroker, free_port

APPROVER = secrets.token_urlsafe(32)
ORDER = {"customer": "c-42", "order": "ord-1001"}


def refund(amount: float, **override: Any) -> dict[str, Any]:
    return {**ORDER, "amount": amount, "currency": "EUR", **override}


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveBroker]:
    """A broker on the sample policies without their limits (many refunds here), with one approver."""
    root = Path(tmp_path_factory.mktemp("mcp"))
    policies = root / "policies"
    shutil.copytree(POLICIES, policies)
    (policies / "limits.toml").unlink()
    config = root / "broker.toml"
    config.write_text(
        "[approvals]\npoll_interval = 1\n\n"
        '[[operators]]\nname = "april"\nrole = "approver"\ngroups = ["refund-approvers"]\n'
        f'token_sha256 = "{hashlib.sha256(APPROVER.encode()).hexdigest()}"\n'
    )
    live = LiveBroker(root / "data", policies=policies, config=config)
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="module")
def identity(broker: LiveBroker) -> Callable[[], str]:
    issuer = DevIssuer.load_or_create(broker.data_dir)
    return lambda: issuer.mint(SUPPORT, "nhi-broker", clock=SystemClock())


@dataclass
class Orders:
    url: str
    book: OrdersBook
    metadata_url: str


def serve(broker_url: str, **verifier_options: Any) -> Generator[Orders, None, None]:
    """The example orders MCP server on a free loopback port (uvicorn in a thread), stopped after."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    book = OrdersBook()
    app, guard = create_orders_mcp(broker_url, url, book=book, verifier_options=verifier_options or None)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the orders MCP server did not start"
        time.sleep(0.02)
    try:
        yield Orders(url, book, guard.metadata_url)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        guard.close()


@pytest.fixture(scope="module")
def orders(broker: LiveBroker) -> Iterator[Orders]:
    yield from serve(broker.url)


@pytest.fixture(scope="module")
def orders_ten_minutes_later(broker: LiveBroker) -> Iterator[Orders]:
    """The same server whose clock runs 10 minutes ahead: every task token it sees has expired."""
    yield from serve(broker.url, clock=lambda: time.time() + 600)


@pytest.fixture(autouse=True)
def _fresh_book(request: pytest.FixtureRequest) -> None:
    for name in ("orders", "orders_ten_minutes_later"):
        if name in request.fixturenames:
            request.getfixturevalue(name).book.refunds.clear()


@asynccontextmanager
async def assistant(broker: LiveBroker, identity: Callable[[], str], url: str,
                    **client_options: Any) -> AsyncIterator[IntentMCPClient]:
    # The assistant acts for the signed-in customer c-42 (delegated: the sample refund rules need it).
    users = DevUserIssuer.load_or_create(broker.data_dir)
    customer = partial(users.mint_user, "c-42", "nhi-broker", clock=SystemClock())
    async with (
        AsyncBrokerClient(broker.url, actor=identity, user_token=customer, **client_options) as tokens,
        IntentMCPClient(url, tokens, session_context={"customer": "c-42"}) as client,
    ):
        yield client


class FixedHeaders(httpx2.Auth):
    """Puts the same headers on every tools/call POST (to replay a proof, or to send none)."""

    requires_request_body = True

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers

    def auth_flow(self, request: httpx2.Request) -> Generator[httpx2.Request, httpx2.Response, None]:
        if request.method == "POST" and b'"tools/call"' in request.content:
            request.headers.update(self.headers)
        yield request


@asynccontextmanager
async def plain_session(url: str, headers: dict[str, str] | None = None) -> AsyncIterator[ClientSession]:
    """The `mcp` SDK's own client, without the intent wrapper."""
    async with httpx2.AsyncClient(auth=FixedHeaders(headers or {})) as http, streamable_http_client(
        url, http_client=http
    ) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


def ledger_entry(broker: LiveBroker, leaf_hash: str) -> dict[str, Any]:
    """The entry with this leaf hash, proven included under the broker's signed checkpoint."""
    return prove(broker.url, leaf_hash).entry


# --- discovery and unauthenticated calls ------------------------------------------------------------


def test_protected_resource_metadata_names_the_broker(orders: Orders, broker: LiveBroker) -> None:
    r = httpx.get(orders.metadata_url)
    assert r.status_code == 200
    meta = r.json()
    assert orders.metadata_url.endswith("/.well-known/oauth-protected-resource/mcp")  # RFC 9728 §3.1
    assert meta["resource"] == orders.url
    assert meta["authorization_servers"] == [broker.url]  # the issuer, spelled exactly (RFC 8414 §3.3)
    assert meta["authorization_details_types_supported"] == ["intent"]
    assert meta["dpop_signing_alg_values_supported"] == ["ES256", "EdDSA"]


@pytest.mark.parametrize(("tool", "schemes"), [
    ("get_order", ["Bearer", "DPoP"]),
    ("refund_order", ["DPoP"]),  # its tokens must be DPoP-bound: no Bearer challenge
])
def test_call_without_token_is_401_with_metadata(orders: Orders, tool: str, schemes: list[str]) -> None:
    r = httpx.post(orders.url, headers={"Accept": "application/json, text/event-stream"},
                   json={"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                         "params": {"name": tool, "arguments": refund(20)}})
    assert r.status_code == 401
    challenges = r.headers.get_list("www-authenticate")
    assert [c.split(" ", 1)[0] for c in challenges] == schemes
    for challenge in challenges:
        assert f'resource_metadata="{orders.metadata_url}"' in challenge
        assert "error=" not in challenge  # RFC 6750 §3.1: no error code when no credentials were sent
    body = r.json()
    assert body["id"] == 7 and body["error"]["code"] == TOKEN_REFUSED
    assert body["error"]["data"]["resource_metadata"] == orders.metadata_url

    async def through_the_mcp_client() -> None:
        async with plain_session(orders.url) as session:
            tools = await session.list_tools()  # discovery needs no token
            assert {t.name for t in tools.tools} == {"get_order", "refund_order"}
            with pytest.raises(MCPError) as refused:
                await session.call_tool(tool, refund(20))
            assert refused.value.code == TOKEN_REFUSED
            assert "needs a task token" in refused.value.message

    asyncio.run(through_the_mcp_client())
    assert orders.book.refunds == []


# --- the four cases of the demo --------------------------------------------------------------------


def test_refund_within_the_rule_runs_with_its_own_token(
    orders: Orders, broker: LiveBroker, identity: Callable[[], str]
) -> None:
    async def scenario() -> tuple[dict[str, Any], str]:
        async with assistant(broker, identity, orders.url) as client:
            assert client.intents["refund_order"].require_dpop  # learnt from the tool's _meta
            result = await client.call_tool("refund_order", refund(20))
            assert not result.is_error, result
            assert client.broker.dpop_key is not None
            return dict(result.structured_content or {}), client.broker.dpop_key.jkt

    body, jkt = asyncio.run(scenario())
    assert body["refunded"] == 20 and body["by"] == "c-42" and body["owner"].startswith("Dana Reyes")
    assert [r["amount"] for r in orders.book.refunds] == [20]
    entry = ledger_entry(broker, body["txn"])  # the token the tool saw points at its issuance entry
    assert entry["kind"] == "issuance" and entry["decision"]["rule"] == "refund-small-eur"
    assert entry["intent"]["resource"] == "customers/c-42/orders/ord-1001"
    assert entry["intent"]["context"] == {"customer": "c-42", "amount": 20, "currency": "EUR"}
    assert entry["credential"]["cnf_jkt"] == jkt


def test_refund_for_another_customer_is_denied_by_policy(
    orders: Orders, broker: LiveBroker, identity: Callable[[], str]
) -> None:
    async def scenario() -> None:
        async with assistant(broker, identity, orders.url) as client:
            with pytest.raises(AccessDeniedError) as denied:
                await client.call_tool("refund_order", refund(20, customer="c-77", order="ord-7001"))
            assert denied.value.status == 403
            assert "customers/c-77/orders/ord-7001" in denied.value.description

    asyncio.run(scenario())
    assert orders.book.refunds == []


@dataclass(frozen=True)
class Misuse:
    name: str
    token_for: tuple[str, dict[str, Any]]
    call: tuple[str, dict[str, Any]]
    code: int
    reason: str


MISUSES = [
    Misuse("arguments altered after issue (prompt injection)", ("refund_order", refund(20)),
           ("refund_order", refund(95)), INTENT_REFUSED, "context 'amount' differs from the grant"),
    Misuse("another order of the same customer", ("refund_order", refund(20)),
           ("refund_order", refund(20, order="ord-1002")), INTENT_REFUSED,
           "the request's resource is not the granted resource"),
    Misuse("intent narrower than the call: a smaller amount", ("refund_order", refund(10)),
           ("refund_order", refund(40)), INTENT_REFUSED, "context 'amount' differs from the grant"),
    Misuse("intent narrower than the call: an argument the grant does not cover", ("refund_order", refund(20)),
           ("refund_order", refund(20, note="and ship a gift")), INTENT_REFUSED,
           "argument 'note' is not part of the tool's intent"),
    Misuse("token for another tool", ("get_order", dict(ORDER)), ("refund_order", refund(20)),
           TOKEN_REFUSED, "the token is for another audience"),
]


@pytest.mark.parametrize("case", MISUSES, ids=[m.name for m in MISUSES])
def test_call_that_is_not_the_granted_intent_is_refused_before_the_tool_runs(
    orders: Orders, broker: LiveBroker, identity: Callable[[], str], case: Misuse
) -> None:
    async def scenario() -> None:
        async with assistant(broker, identity, orders.url) as client:
            token = await client.token_for(*case.token_for)
            with pytest.raises(MCPError) as refused:
                await client.call_tool_with_token(case.call[0], case.call[1], token)
            assert refused.value.code == case.code
            assert case.reason in refused.value.message
            assert refused.value.data["error"] == ("insufficient_scope" if case.code == INTENT_REFUSED
                                                   else "invalid_token")

    asyncio.run(scenario())
    assert orders.book.refunds == []


def test_held_refund_is_reported_then_completed_after_approval(
    orders: Orders, broker: LiveBroker, identity: Callable[[], str]
) -> None:
    async def scenario() -> dict[str, Any]:
        async with assistant(broker, identity, orders.url) as client:
            with pytest.raises(ToolCallPending) as held:
                await client.call_tool("refund_order", refund(120))
            pending = held.value
            assert pending.rule_id == "refund-review-eur"
            assert pending.tool == "refund_order" and pending.arguments == refund(120)
            assert orders.book.refunds == []  # nothing ran while held
            r = await asyncio.to_thread(
                httpx.post, f"{broker.url}/v1/admin/approvals/{pending.auth_req_id}/approve",
                json={"reason": "photos of the damage"}, headers={"Authorization": f"Bearer {APPROVER}"})
            assert r.status_code == 200, r.text
            result = await client.complete(pending, timeout=30)
            return dict(result.structured_content or {})

    body = asyncio.run(scenario())
    assert body["refunded"] == 120
    entry = ledger_entry(broker, body["txn"])
    assert entry["kind"] == "issuance" and entry["decision"]["rule"] == "refund-review-eur"
    assert entry["approval"]["approvers"] == ["april"]


# --- token and proof failures ----------------------------------------------------------------------


def test_expired_token_is_refused(
    orders_ten_minutes_later: Orders, broker: LiveBroker, identity: Callable[[], str]
) -> None:
    async def scenario() -> None:
        async with assistant(broker, identity, orders_ten_minutes_later.url) as client:
            with pytest.raises(MCPError) as refused:
                await client.call_tool("get_order", dict(ORDER))
            assert refused.value.code == TOKEN_REFUSED
            assert refused.value.message == "invalid_token: the token has expired"

    asyncio.run(scenario())


def test_replayed_dpop_proof_is_refused(orders: Orders, broker: LiveBroker, identity: Callable[[], str]) -> None:
    async def scenario() -> None:
        async with AsyncBrokerClient(broker.url, identity) as tokens:
            token: TaskToken = await tokens.get_token("orders-api", "orders.read", "customers/c-42/orders/ord-1001",
                                                      {"customer": "c-42"})
        headers = token.headers("POST", orders.url)  # one proof, sent twice
        async with plain_session(orders.url, headers) as session:
            first = await session.call_tool("get_order", dict(ORDER))
            assert not first.is_error and (first.structured_content or {})["order"] == "ord-1001"
            with pytest.raises(MCPError) as refused:
                await session.call_tool("get_order", dict(ORDER))
            assert refused.value.code == TOKEN_REFUSED
            assert refused.value.message == "invalid_dpop_proof: DPoP proof has already been used"

    asyncio.run(scenario())


def test_dpop_is_required_where_the_tool_says_so(
    orders: Orders, broker: LiveBroker, identity: Callable[[], str]
) -> None:
    async def scenario() -> None:
        async with assistant(broker, identity, orders.url, dpop=False) as client:
            read = await client.call_tool("get_order", dict(ORDER))  # a bearer token is enough to read
            assert not read.is_error
            with pytest.raises(MCPError) as refused:
                await client.call_tool("refund_order", refund(20))
            assert refused.value.message == "invalid_token: this tool accepts DPoP-bound tokens only"

    asyncio.run(scenario())
    assert orders.book.refunds == []


def test_a_token_rides_only_on_its_own_call(broker: LiveBroker, identity: Callable[[], str]) -> None:
    """The client attaches a bound token to the POST of that very tools/call, never to another message."""
    from nhi_broker_client._mcp_client import _bound_call, _canonical_call, _TaskTokenAuth

    sent: list[tuple[str, str | None, str | None]] = []

    def record(request: httpx2.Request) -> httpx2.Response:
        sent.append((request.content.decode(), request.headers.get("authorization"), request.headers.get("dpop")))
        return httpx2.Response(200, json={})

    async def scenario() -> None:
        async with AsyncBrokerClient(broker.url, identity) as tokens:
            token = await tokens.get_token("orders-api", "orders.read", "customers/c-42/orders/ord-1001",
                                           {"customer": "c-42"})
        call = {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                "params": {"name": "get_order", "arguments": dict(ORDER)}}
        other_call = {**call, "params": {"name": "get_order", "arguments": {**ORDER, "order": "ord-1002"}}}
        listing = {"jsonrpc": "2.0", "id": 4, "method": "tools/list"}
        async with httpx2.AsyncClient(auth=_TaskTokenAuth(), transport=httpx2.MockTransport(record)) as http:
            reset = _bound_call.set((_canonical_call("get_order", dict(ORDER)), token))
            try:
                for message in (listing, other_call, call, call):
                    await http.post("http://127.0.0.1:9/mcp", json=message)
            finally:
                _bound_call.reset(reset)
            await http.post("http://127.0.0.1:9/mcp", json=call)  # no call bound any more

    asyncio.run(scenario())
    attached = [(auth is not None, proof is not None) for _, auth, proof in sent]
    assert attached == [(False, False), (False, False), (True, True), (True, True), (False, False)]
    assert sent[2][2] != sent[3][2]  # a fresh DPoP proof per request


# --- the mapping itself ----------------------------------------------------------------------------


REFUND_INTENT = ToolIntent(audience="payments-api", action="payments.refund",
                           resource="customers/{customer}/orders/{order}",
                           context={"amount": "{amount}", "currency": "{currency}"}, session_context=("customer",))


@pytest.mark.parametrize(("arguments", "reason"), [
    ({**refund(20), "order": "../ord-1"}, "argument 'order' cannot name a resource"),
    ({**refund(20), "order": "ord-1/refunds"}, "argument 'order' cannot name a resource"),
    ({**refund(20), "order": True}, "argument 'order' cannot name a resource"),
    ({**refund(20), "order": ""}, "argument 'order' cannot name a resource"),
    ({k: v for k, v in refund(20).items() if k != "currency"}, "does not state argument 'currency'"),
    ({**refund(20), "reason": "x"}, "argument 'reason' is not part of the tool's intent"),
])
def test_calls_that_cannot_be_an_intent(arguments: dict[str, Any], reason: str) -> None:
    with pytest.raises(IntentMismatchError) as refused:
        REFUND_INTENT.intent_for(arguments, {"customer": "c-42"})
    assert reason in refused.value.description


def test_intent_of_a_call_and_its_grant() -> None:
    intent = REFUND_INTENT.intent_for(refund(20), {"customer": "c-42"})
    assert intent.to_json() == {"type": "intent", "action": "payments.refund",
                                "resource": "customers/c-42/orders/ord-1001",
                                "context": {"amount": 20, "currency": "EUR", "customer": "c-42"}}
    REFUND_INTENT.require_granted(intent, refund(20))
    with pytest.raises(IntentMismatchError, match="'customer', which the tool needs"):
        REFUND_INTENT.require_granted(REFUND_INTENT.intent_for(refund(20), {"customer": "c-42"}).__class__(
            intent.action, intent.resource, {"amount": 20, "currency": "EUR"}), refund(20))
    with pytest.raises(IntentMismatchError, match="comes from the conversation"):
        REFUND_INTENT.intent_for(refund(20))
    assert ToolIntent.from_meta({"org.nhi-broker/intent": REFUND_INTENT.to_meta()}) == REFUND_INTENT


@pytest.mark.parametrize(("declaration", "error"), [
    ({"resource": "customers/{customer}x/orders"}, "a placeholder must be a whole segment"),
    ({"resource": "customers/{customer!r}"}, "plain {argument} names"),
    ({"resource": "customers/../orders"}, "segment '..' is not allowed"),
    ({"resource": "customers//orders"}, "segment '' is not allowed"),
    ({"resource": "customers/*/orders"}, "segment '*' is not allowed"),
    ({"action": "Refund"}, "is not a dotted name"),
    ({"context": {"customer": "{customer}"}, "session_context": ("customer",)}, "either from the arguments"),
    ({"unbound": ("amount",)}, "cannot also be unbound"),
])
def test_bad_declarations_are_refused(declaration: dict[str, Any], error: str) -> None:
    fields: dict[str, Any] = {"audience": "payments-api", "action": "payments.refund",
                              "resource": "customers/{customer}/orders/{order}",
                              "context": {"amount": "{amount}"}, **declaration}
    with pytest.raises(ValueError, match=re.escape(error)):
        ToolIntent(**fields)


def test_importing_the_sdk_does_not_import_mcp_or_pydantic_ai() -> None:
    code = ("import sys, nhi_broker_client, nhi_broker_client.fastapi; "
            "heavy = sorted(m for m in sys.modules "
            "               if m.split('.')[0] in ('mcp', 'mcp_types', 'httpx2', 'pydantic_ai'));"
            "print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


# --- pydantic-ai: a framework's tool call goes through the same path (no LLM: a scripted FunctionModel) ---


def scripted_model(calls: list[tuple[str, dict[str, Any]]]) -> Any:
    """A model that makes ``calls`` on its first turn, then answers with what the tools returned."""
    from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart
    from pydantic_ai.models.function import AgentInfo, FunctionModel

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        assert {t.name for t in info.function_tools} == {"get_order", "refund_order"}
        refund_schema = next(t for t in info.function_tools if t.name == "refund_order").parameters_json_schema
        assert set(refund_schema["properties"]) == {"customer", "order", "amount", "currency"}
        if len(messages) == 1:
            return ModelResponse(parts=[ToolCallPart(name, args) for name, args in calls])
        outcomes = [getattr(p, "content", None) for p in messages[-1].parts]
        return ModelResponse(parts=[TextPart(repr(outcomes))])

    return FunctionModel(model)


def test_pydantic_ai_agent_tool_calls_carry_their_intent(
    orders: Orders, broker: LiveBroker, identity: Callable[[], str]
) -> None:
    from nhi_broker_client.pydantic_ai import IntentToolset
    from pydantic_ai import Agent, DeferredToolRequests

    async def scenario() -> tuple[str, str, Any]:
        async with assistant(broker, identity, orders.url) as client:
            toolset = IntentToolset(client)
            done = await Agent(scripted_model([("refund_order", refund(20))]), toolsets=[toolset]).run("20 back")
            denied = await Agent(scripted_model([("refund_order", refund(20, customer="c-77", order="ord-7001"))]),
                                 toolsets=[toolset]).run("refund the other order")
            agent = Agent(scripted_model([("refund_order", refund(120))]), toolsets=[toolset],
                          output_type=[str, DeferredToolRequests])
            held = await agent.run("120 back")
            assert isinstance(held.output, DeferredToolRequests)
            [call] = held.output.calls
            assert call.tool_name == "refund_order"
            meta = held.output.metadata[call.tool_call_id]
            assert meta["rule_id"] == "refund-review-eur"
            assert [r["amount"] for r in orders.book.refunds] == [20]  # nothing ran while held
            r = await asyncio.to_thread(
                httpx.post, f"{broker.url}/v1/admin/approvals/{meta['auth_req_id']}/approve",
                json={"reason": "ok"}, headers={"Authorization": f"Bearer {APPROVER}"})
            assert r.status_code == 200, r.text
            results = await toolset.resolve(held.output, timeout=30)
            resumed = await agent.run(message_history=held.all_messages(), deferred_tool_results=results)
            return str(done.output), str(denied.output), resumed.output

    done, denied, resumed = asyncio.run(scenario())
    assert "'refunded': 20" in done
    assert "the broker refused this call (access_denied)" in denied and "customers/c-77" in denied
    assert "'refunded': 120" in str(resumed)
    assert [r["amount"] for r in orders.book.refunds] == [20, 120]
