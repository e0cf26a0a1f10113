#!/usr/bin/env python3
"""An example orders MCP server (streamable HTTP) whose tools need a task token for each call.

    python scripts/orders_mcp.py --broker http://127.0.0.1:8080 --port 8000

Two tools, each declaring its intent (``nhi_broker_client.ToolIntent``): ``get_order`` is
``orders.read`` at audience ``orders-api``; ``refund_order`` is ``payments.refund`` at ``payments-api``
with the amount and currency in the context, and needs a DPoP-bound token. The customer in both intents
is the one the assistant is serving (``session_context``): the broker's policy ties the order's customer
to it, so an assistant cannot act on another customer's order. ``scripts/mcp_demo.py`` drives it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from mcp.server.mcpserver import MCPServer
from nhi_broker_client import ToolIntent
from nhi_broker_client.mcp import TaskTokenGuard, current_task_token
from starlette.types import ASGIApp

TOOLS = {
    "get_order": ToolIntent(
        audience="orders-api", action="orders.read", resource="customers/{customer}/orders/{order}",
        session_context=("customer",),
    ),
    "refund_order": ToolIntent(
        audience="payments-api", action="payments.refund", resource="customers/{customer}/orders/{order}",
        context={"amount": "{amount}", "currency": "{currency}"}, session_context=("customer",), require_dpop=True,
    ),
}


@dataclass
class OrdersBook:
    """The example's data: a few orders and the refunds made on them (in memory)."""

    orders: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "ord-1001": {"customer": "c-42", "total": 189.0, "currency": "EUR", "status": "delivered",
                     "items": ["espresso machine"]},
        "ord-1002": {"customer": "c-42", "total": 35.5, "currency": "EUR", "status": "shipped", "items": ["mugs"]},
        "ord-7001": {"customer": "c-77", "total": 640.0, "currency": "EUR", "status": "delivered",
                     "items": ["road bike"]},
    })
    refunds: list[dict[str, Any]] = field(default_factory=list)


def create_orders_mcp(
    broker_url: str, resource_url: str, *, book: OrdersBook | None = None,
    verifier_options: dict[str, Any] | None = None,
) -> tuple[ASGIApp, TaskTokenGuard]:
    """The orders MCP server as an ASGI app (endpoint = the path of ``resource_url``), and its guard."""
    book = book or OrdersBook()
    guard = TaskTokenGuard(broker_url, resource_url, TOOLS, resource_name="orders (example)",
                           verifier_options=verifier_options)
    server = MCPServer("orders", instructions="Orders of the customer you are serving.", extensions=[guard])

    @server.tool(meta=guard.tool_meta("get_order"))
    def get_order(customer: str, order: str) -> dict[str, Any]:
        """Read one order of a customer."""
        found = book.orders.get(order)
        if found is None or found["customer"] != customer:
            raise ValueError(f"customer {customer} has no order {order}")
        return {"order": order, **found}

    @server.tool(meta=guard.tool_meta("refund_order"))
    def refund_order(customer: str, order: str, amount: float, currency: str) -> dict[str, Any]:
        """Refund part or all of an order to the customer."""
        found = book.orders.get(order)
        if found is None or found["customer"] != customer:
            raise ValueError(f"customer {customer} has no order {order}")
        refunded = sum(r["amount"] for r in book.refunds if r["order"] == order)
        if currency != found["currency"] or amount <= 0 or refunded + amount > found["total"]:
            raise ValueError(f"cannot refund {amount} {currency} on {order}")
        token = current_task_token()
        assert token is not None  # the guard runs every call with its verified token
        refund = {"order": order, "amount": int(amount) if float(amount).is_integer() else amount,
                  "currency": currency, "by": token.subject,
                  "owner": token.owner, "txn": token.txn}
        book.refunds.append(refund)
        return {"refunded": refund["amount"], **refund}

    return guard.asgi(server.streamable_http_app()), guard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", required=True, help="the broker's URL (issuer of task tokens)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--public-url", help="the MCP endpoint as clients reach it (default http://HOST:PORT/mcp)")
    args = parser.parse_args()
    app, guard = create_orders_mcp(args.broker, args.public_url or f"http://{args.host}:{args.port}/mcp")
    try:
        uvicorn.run(app, host=args.host, port=args.port)
    finally:
        guard.close()


if __name__ == "__main__":
    main()
