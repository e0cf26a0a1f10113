#!/usr/bin/env python3
"""Tool calls that carry their intent: a broker, an orders MCP server and a scripted assistant.

    python scripts/mcp_demo.py        (after `pip install -e . -e './clients/python[mcp]'`)

1. starts ``nhi-broker serve`` on embedded defaults (temporary data dir, trial identity and user
   issuers, the sample policies) and the example orders MCP server (scripts/orders_mcp.py) on loopback; the server
   publishes RFC 9728 metadata naming the broker and needs a task token for every tool call;
2. drives a scripted assistant (no LLM) through the real MCP client over streamable HTTP, acting for the
   signed-in customer (RFC 8693 delegation: its identity is the actor, the customer's token from the
   trial user issuer the subject; the sample policy refunds only for the verified customer). Each tool
   call gets a fresh task token for exactly its intent, DPoP-bound, attached to that call only:
   (a) a 20 EUR refund on the customer's order succeeds;
   (b) a refund on another customer's order is refused by the broker's policy: the user is verified;
   (c) a call whose arguments are altered after its token was issued (as a prompt injection would) is
       refused by the server before the tool runs;
   (d) a 120 EUR refund is held for a person, approved, and completed;
   (e) the signed ledger proves each of these.

Exit status 0 when every step behaved as described; 1 otherwise. Nothing is left running.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
from demo import Broker, Service, approve, approver_config, free_port, prove, say
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from nhi_broker_client import AccessDeniedError, AsyncBrokerClient
from nhi_broker_client.mcp import IntentMCPClient, ToolCallPending
from orders_mcp import OrdersBook, create_orders_mcp

ASSISTANT = "spiffe://example.org/ns/support/sa/support-assistant"
CUSTOMER = "c-42"


def ledger_size(broker_url: str) -> int:
    """The size of the ledger's latest checkpoint (its second line, C2SP tlog-checkpoint)."""
    return int(httpx.get(broker_url + "/v1/ledger/checkpoint").text.splitlines()[1])


def entries_since(broker_url: str, start: int) -> list[dict[str, Any]]:
    """Ledger entries from index ``start`` on (index, leaf hash, parsed entry)."""
    size = ledger_size(broker_url)
    listed = httpx.get(broker_url + "/v1/ledger/entries", params={"start": start, "end": size}).json()
    return list(listed["entries"])


async def assistant_story(broker: Broker, mcp_url: str, approver_secret: str, book: OrdersBook,
                          check: Any, identity: Any, user_token: Any) -> dict[str, str]:
    """Steps (0)-(d); returns the leaf hashes the ledger step proves."""
    proofs: dict[str, str] = {}
    order = {"customer": CUSTOMER, "order": "ord-1001", "currency": "EUR"}

    say()
    say("(0) an MCP client that brings no task token")
    r = httpx.post(mcp_url, headers={"Accept": "application/json, text/event-stream"},
                   json={"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                         "params": {"name": "refund_order", "arguments": {**order, "amount": 20}}})
    say(f"    orders   HTTP {r.status_code}, WWW-Authenticate: {r.headers.get('www-authenticate')}")
    check(r.status_code == 401 and "resource_metadata=" in r.headers.get("www-authenticate", ""),
          "an unauthenticated tool call was not answered 401 with the metadata")
    async with streamable_http_client(mcp_url) as (read, write), ClientSession(read, write) as plain:
        await plain.initialize()
        try:
            await plain.call_tool("get_order", {"customer": CUSTOMER, "order": "ord-1001"})
            check(False, "a tool ran without a task token")
        except MCPError as exc:
            say(f"    MCP client sees error {exc.code}: {exc.message}")

    async with AsyncBrokerClient(broker.url, actor=identity, user_token=user_token) as tokens, IntentMCPClient(
        mcp_url, tokens, session_context={"customer": CUSTOMER}
    ) as orders:
        say()
        say("    the assistant lists the tools; each declares the intent of its calls:")
        for name, intent in orders.intents.items():
            ctx = ", ".join(f"{k}={v}" for k, v in intent.context.items())
            say(f"      {name:13} {intent.action} on {intent.resource} at {intent.audience}"
                f"{' (' + ctx + ')' if ctx else ''}{', DPoP required' if intent.require_dpop else ''}")

        # (a)
        say()
        say("(a) the user asks for 20 EUR back on ord-1001; the assistant calls refund_order")
        result = await orders.call_tool("refund_order", {**order, "amount": 20})
        body = result.structured_content or {}
        check(not result.is_error and body.get("refunded") == 20, "the 20 EUR refund was not made")
        say("    broker   issued a DPoP-bound task token for exactly this call")
        say(f"    orders   REFUNDED {body.get('refunded')} {body.get('currency')} on {body.get('order')} "
            f"by {body.get('by')}")
        say(f"             (owner {body.get('owner')}), ledger txn {str(body.get('txn'))[:16]}...")
        proofs["a"] = str(body.get("txn"))

        # (b)
        say()
        say("(b) the model is talked into refunding 20 EUR on ord-7001, which belongs to customer c-77")
        try:
            await orders.call_tool("refund_order", {"customer": "c-77", "order": "ord-7001", "amount": 20,
                                                    "currency": "EUR"})
            check(False, "the broker issued a token for another customer's order")
        except AccessDeniedError as exc:
            say(f"    broker   DENIED {exc.status} {exc.code}: {exc.description}")
            say("    orders   never called: no token, no call")

        # (c)
        say()
        say("(c) a prompt injection rewrites the call after its token was issued: 20 EUR becomes 95 EUR")
        planned = {**order, "amount": 20}
        token = await orders.token_for("refund_order", planned)
        say(f"    broker   granted: payments.refund of 20 EUR on customers/{CUSTOMER}/orders/ord-1001 "
            f"(entry #{token.receipt_index})")
        try:
            await orders.call_tool_with_token("refund_order", {**planned, "amount": 95}, token)
            check(False, "the server ran a call that differs from its token's intent")
        except MCPError as exc:
            say(f"    orders   REFUSED (MCP error {exc.code}): {exc.message}")
        proofs["c"] = token.receipt_leaf_hash or ""

        # (d)
        say()
        say("(d) the user asks for 120 EUR back: more than the assistant may refund alone")
        try:
            await orders.call_tool("refund_order", {**order, "amount": 120})
            check(False, "a 120 EUR refund ran without an approval")
            return proofs
        except ToolCallPending as held:
            pending = held
        say(f"    broker   HELD for review by rule {pending.rule_id} (auth_req_id {pending.auth_req_id[:12]}...)")
        say('    assistant tells the user: "A colleague needs to approve this refund; I will let you know."')
        reason = "customer sent photos of the damaged parcel"
        check(approve(broker.url, approver_secret, pending.auth_req_id, reason), "the approver could not approve")
        say(f"    april    (refund-approvers) APPROVED: {reason}")
        result = await orders.complete(pending, timeout=30)
        body = result.structured_content or {}
        check(not result.is_error and body.get("refunded") == 120, "the approved refund was not made")
        say(f"    orders   REFUNDED {body.get('refunded')} {body.get('currency')} on {body.get('order')}, "
            f"ledger txn {str(body.get('txn'))[:16]}...")
        proofs["d"] = str(body.get("txn"))
    return proofs


def ledger_story(broker_url: str, proofs: dict[str, str], first_index: int, check: Any) -> None:
    with httpx.Client() as http:
        _ledger_story(http, broker_url, proofs, first_index, check)


def _ledger_story(http: httpx.Client, broker_url: str, proofs: dict[str, str], first_index: int, check: Any) -> None:
    say()
    say("(e) the ledger proves each step (signed checkpoint, RFC 6962 inclusion proof per entry)")
    # (b) and the approval of (d) are found by content: the assistant holds no receipt for a denial.
    for item in entries_since(broker_url, first_index):
        entry = item["entry"]
        resource = entry.get("intent", {}).get("resource", "")
        if entry["kind"] == "denial" and resource.startswith("customers/c-77/"):
            proofs.setdefault("b", item["leaf_hash"])
        if entry["kind"] == "approval":
            proofs.setdefault("d approval", item["leaf_hash"])
    labels = {"a": "(a) 20 EUR refund", "b": "(b) other customer", "c": "(c) the token the injection misused",
              "d approval": "(d) approval", "d": "(d) 120 EUR refund"}
    verifier_key = "?"
    for step in ("a", "b", "c", "d approval", "d"):
        if not proofs.get(step):
            check(False, f"no ledger entry for step {step}")
            continue
        proven = prove(broker_url, proofs[step], http)
        entry = proven.entry
        intent = entry.get("intent", {})
        amount = intent.get("context", {}).get("amount")
        detail = f"{intent.get('action')} {amount} EUR on {intent.get('resource')}" if intent else ""
        approval = entry.get("approval") or {}
        approver = approval.get("approver")
        approver = approver.get("name") if isinstance(approver, dict) else approver
        who = f", {approval.get('outcome')} by {approver}" if entry["kind"] == "approval" else ""
        rule = entry.get("decision", {}).get("rule") or "none matched: denied by default"
        say(f"    #{proven.index:<3} {entry['kind']:9} {labels[step]:38} {detail}{who}")
        say(f"         rule={rule}  inclusion in checkpoint of size "
            f"{proven.checkpoint.size}: VERIFIED")
        verifier_key = proven.verifier_key
    say(f"    every checkpoint signature verified with {verifier_key}")


def run(workdir: Path) -> bool:
    from broker.attest.dev import DevIssuer, DevUserIssuer
    from broker.clock import SystemClock

    ok = True

    def check(condition: bool, what: str) -> None:
        nonlocal ok
        if not condition:
            ok = False
            say(f"    !! unexpected: {what}")

    config, approver_secret = approver_config(workdir)
    broker = Broker(workdir / "broker-data", config)
    port = free_port()
    mcp_url = f"http://127.0.0.1:{port}/mcp"
    book = OrdersBook()
    app, guard = create_orders_mcp(broker.url, mcp_url, book=book)
    logging.getLogger().setLevel(logging.WARNING)  # the story is the output; library INFO logs would bury it
    service: Service | None = None
    try:
        service = Service(app, port=port)
        issuer = DevIssuer.load_or_create(workdir / "broker-data")

        def identity() -> str:
            return issuer.mint(ASSISTANT, "nhi-broker", clock=SystemClock())

        # The shop's login (here the trial user issuer) signed the customer in; the assistant passes the
        # customer's token on with each exchange, so the broker verifies who a refund is for.
        users = DevUserIssuer.load_or_create(workdir / "broker-data")

        def signed_in_customer() -> str:
            return users.mint_user(CUSTOMER, "nhi-broker", clock=SystemClock())

        metadata = httpx.get(f"http://127.0.0.1:{port}/.well-known/oauth-protected-resource/mcp").json()
        first_index = ledger_size(broker.url)
        say("== nhi-broker MCP demo ==")
        say(f"broker       {broker.url}  (embedded defaults, trial identity and user issuers)")
        say(f"orders MCP   {mcp_url}  (streamable HTTP; every tool call needs a task token)")
        say(f"             RFC 9728 metadata: authorization_servers={metadata['authorization_servers']}, "
            f"authorization_details_types_supported={metadata['authorization_details_types_supported']}")
        say(f"assistant    {ASSISTANT}, acting for the signed-in customer {CUSTOMER}")
        proofs = asyncio.run(assistant_story(broker, mcp_url, approver_secret, book, check, identity,
                                             signed_in_customer))
        ledger_story(broker.url, proofs, first_index, check)
        say()
        made = [f"{r['amount']:g} {r['currency']} on {r['order']}" for r in book.refunds]
        say(f"orders book: {len(made)} refunds made ({'; '.join(made)}); nothing else ran")
        check([r["amount"] for r in book.refunds] == [20, 120], "the refunds made are not exactly (a) and (d)")
    finally:
        if service is not None:
            service.stop()
        guard.close()
        broker.stop()
    say()
    say("demo OK" if ok else "demo FAILED")
    return ok


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="nhi-broker-mcp-demo-") as workdir:
        return 0 if run(Path(workdir)) else 1


if __name__ == "__main__":
    sys.exit(main())
