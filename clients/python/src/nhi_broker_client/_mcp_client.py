"""Assistant side of MCP: each tool call gets a task token for exactly its intent, attached to that call only.

:class:`IntentMCPClient` is an MCP client (the ``mcp`` SDK's ``ClientSession`` over streamable HTTP)
that, per ``call_tool``, maps the call to its intent with the tool's :class:`ToolIntent` (published by
the server in the tool's ``_meta``, or given locally), exchanges a fresh workload identity for a task
token for that intent through :class:`AsyncBrokerClient` (DPoP-bound by default), and sends the call
with the token and a DPoP proof made for that very POST. A held intent becomes a
:class:`ToolCallPending` the chatbot can report and later :meth:`IntentMCPClient.complete`.

The token rides on the HTTP request of its own ``tools/call`` message and no other: an ``httpx2``
``Auth`` reads the call the caller bound in a context variable (the MCP transport sends each message in
its sender's context) and attaches the token only if the request body is that call.
"""

from __future__ import annotations

import contextvars
import json
from collections.abc import Generator, Mapping
from contextlib import AsyncExitStack
from typing import Any

import httpx2
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult, PaginatedRequestParams, Tool

from ._client import AsyncBrokerClient, TaskToken
from ._errors import ApprovalPending, IntentMismatchError
from ._intent import Intent
from ._tool_intent import ToolIntent

__all__ = ["IntentMCPClient", "ToolCallPending"]

_bound_call: contextvars.ContextVar[tuple[str, TaskToken] | None] = contextvars.ContextVar(
    "nhi_bound_call", default=None
)


def _canonical_call(name: str, arguments: Mapping[str, Any]) -> str:
    return json.dumps([name, arguments], sort_keys=True, separators=(",", ":"))


class ToolCallPending(ApprovalPending):
    """A tool call whose intent a review rule holds for a person's approval: nothing was called yet.

    Report it to the user, then pass it to :meth:`IntentMCPClient.complete` to wait for the decision
    and make the call (or to the broker client's ``collect`` to poll once). ``tool`` and ``arguments``
    are the held call.
    """

    def __init__(self, held: ApprovalPending, tool: str, arguments: Mapping[str, Any]) -> None:
        super().__init__(held.auth_req_id, held.expires_at, held.interval, held.rule_id, held.audience, held.intent)
        self.description = f"tool call {tool} held for review by rule {held.rule_id or '?'}"
        self.args = (self.description,)
        self.tool = tool
        self.arguments = dict(arguments)


class _TaskTokenAuth(httpx2.Auth):
    """Adds the bound call's ``Authorization`` and a fresh ``DPoP`` proof to that call's POST only."""

    requires_request_body = True

    def auth_flow(self, request: httpx2.Request) -> Generator[httpx2.Request, httpx2.Response, None]:
        bound = _bound_call.get()
        if bound is not None and request.method == "POST":
            canonical, token = bound
            try:
                message = json.loads(request.content)
            except ValueError:
                message = None
            params = message.get("params") if isinstance(message, dict) else None
            if (
                isinstance(message, dict) and message.get("method") == "tools/call" and isinstance(params, dict)
                and _canonical_call(str(params.get("name")), params.get("arguments") or {}) == canonical
            ):
                request.headers.update(token.headers("POST", str(request.url)))
        yield request


class IntentMCPClient:
    """An MCP client whose every tool call carries a task token for exactly that call.

    ``url`` is the MCP endpoint (streamable HTTP). ``broker`` exchanges identities for tokens (give it
    an identity callable: each exchange spends a fresh identity). ``session_context`` supplies the
    intent context the conversation decides (the customer being served); ``intents`` overrides or
    completes what the server declares in its tools' ``_meta``.

        async with IntentMCPClient(url, broker, session_context={"customer": "c-42"}) as orders:
            result = await orders.call_tool("refund_order", {...})
    """

    def __init__(
        self,
        url: str,
        broker: AsyncBrokerClient,
        *,
        session_context: Mapping[str, Any] | None = None,
        intents: Mapping[str, ToolIntent] | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.url = url
        self.broker = broker
        self.session_context: dict[str, Any] = dict(session_context or {})
        self._local_intents = dict(intents or {})
        self._timeout = timeout
        self._stack: AsyncExitStack | None = None
        self._session: ClientSession | None = None
        self.tools: dict[str, Tool] = {}
        self.intents: dict[str, ToolIntent] = dict(self._local_intents)

    async def __aenter__(self) -> IntentMCPClient:
        stack = AsyncExitStack()
        try:
            http = await stack.enter_async_context(
                httpx2.AsyncClient(auth=_TaskTokenAuth(), timeout=httpx2.Timeout(self._timeout, read=300.0))
            )
            read, write = await stack.enter_async_context(streamable_http_client(self.url, http_client=http))
            self._session = await stack.enter_async_context(ClientSession(read, write))
            await self._session.initialize()
            self._stack = stack
            await self.refresh_tools()
        except BaseException:
            await stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        stack, self._stack, self._session = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    @property
    def session(self) -> ClientSession:
        """The underlying ``mcp`` ``ClientSession`` (open inside ``async with``)."""
        if self._session is None:
            raise RuntimeError("use IntentMCPClient inside 'async with'")
        return self._session

    async def refresh_tools(self) -> list[Tool]:
        """List the server's tools and learn each one's intent mapping from its ``_meta``."""
        tools: list[Tool] = []
        cursor: str | None = None
        while True:
            page = await self.session.list_tools(params=PaginatedRequestParams(cursor=cursor) if cursor else None)
            tools.extend(page.tools)
            cursor = page.next_cursor
            if not cursor:
                break
        self.tools = {tool.name: tool for tool in tools}
        intents: dict[str, ToolIntent] = {}
        for tool in tools:
            declared = ToolIntent.from_meta(tool.meta)
            if declared is not None:
                intents[tool.name] = declared
        intents.update(self._local_intents)
        self.intents = intents
        return tools

    def intent_for(self, name: str, arguments: Mapping[str, Any]) -> tuple[ToolIntent, Intent]:
        """The tool's mapping and the intent of this call; raises IntentMismatchError if it has none."""
        tool = self.intents.get(name)
        if tool is None:
            raise IntentMismatchError(f"tool '{name}' declares no intent")
        return tool, tool.intent_for(arguments, self.session_context)

    async def token_for(
        self, name: str, arguments: Mapping[str, Any], *, wait_for_approval: bool | float = False
    ) -> TaskToken:
        """A new task token for exactly this call (a fresh exchange, never a cached token).

        Raises :class:`ToolCallPending` when the intent is held for review (unless ``wait_for_approval``),
        and the broker client's errors otherwise (``AccessDeniedError`` when the policy says no).
        """
        tool, intent = self.intent_for(name, arguments)
        try:
            return await self.broker.get_token(tool.audience, intent.action, intent.resource, dict(intent.context),
                                               fresh=True, wait_for_approval=wait_for_approval)
        except ToolCallPending:
            raise
        except ApprovalPending as held:
            raise ToolCallPending(held, name, arguments) from None

    async def call_tool(
        self, name: str, arguments: Mapping[str, Any] | None = None, *, wait_for_approval: bool | float = False
    ) -> CallToolResult:
        """Obtain a task token for this call's intent and make the call with it.

        A refusal by the server raises the ``mcp`` SDK's ``MCPError`` (``code`` ``TOKEN_REFUSED`` or
        ``INTENT_REFUSED``, ``data["error_description"]`` says why).
        """
        args = dict(arguments or {})
        token = await self.token_for(name, args, wait_for_approval=wait_for_approval)
        return await self.call_tool_with_token(name, args, token)

    async def complete(self, pending: ToolCallPending, *, timeout: float | None = None) -> CallToolResult:
        """Wait for the held call's approval (polling the broker), then make the call with the token."""
        token = await self.broker.wait_for_approval(pending, timeout=timeout)
        return await self.call_tool_with_token(pending.tool, pending.arguments, token)

    async def call_tool_with_token(self, name: str, arguments: Mapping[str, Any], token: TaskToken) -> CallToolResult:
        """Send ``tools/call`` with a token obtained elsewhere (its DPoP proof is made for this POST)."""
        args = dict(arguments)
        reset = _bound_call.set((_canonical_call(name, args), token))
        try:
            return await self.session.call_tool(name, args)
        finally:
            _bound_call.reset(reset)
