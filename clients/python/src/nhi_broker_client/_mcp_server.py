"""Resource side of MCP: every ``tools/call`` carries a task token whose granted intent is this call.

Two layers, each with the SDK hook that fits it:

* HTTP (:meth:`TaskTokenGuard.asgi`): serves the RFC 9728 Protected Resource Metadata naming the broker,
  and authenticates the POST that carries a ``tools/call``: the task token (and its DPoP proof for this
  POST) is verified with the broker's JWKS at the tool's audience. No token, a bad or expired one, a
  replayed proof: HTTP 401 with ``WWW-Authenticate`` naming the metadata (MCP authorization spec,
  RFC 9728 §5.1, RFC 6750 §3, RFC 9449 §7.1) and a JSON-RPC error body the MCP client surfaces.
  The SDK's own bearer middleware only reads ``Bearer`` tokens and sees neither the request nor the
  call, so it cannot check a DPoP proof or an intent.
* MCP (the :class:`TaskTokenGuard` is an ``mcp`` server ``Extension``; its ``intercept_tool_call`` runs
  before the tool): the call's name and arguments, mapped by the tool's :class:`ToolIntent`, must be
  exactly the granted intent; otherwise an MCP error saying why, and the tool never runs.

Discovery (``initialize``, ``tools/list``, ``ping``, notifications) needs no token: the assistant asks
for a token per call, for that call's intent only.
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import anyio.to_thread
from mcp.server.auth.handlers.metadata import ProtectedResourceMetadataHandler
from mcp.server.auth.routes import build_resource_metadata_url, cors_middleware
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import Extension
from mcp.shared.auth import ProtectedResourceMetadata
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolRequestParams
from pydantic import AnyHttpUrl
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._dpop import InMemoryReplayCache
from ._errors import IntentMismatchError, InvalidTokenError, TokenVerificationError
from ._tool_intent import META_KEY, ToolIntent
from ._verify import TaskTokenVerifier, VerifiedTaskToken

__all__ = ["INTENT_REFUSED", "TOKEN_REFUSED", "TaskTokenGuard", "current_task_token"]

logger = logging.getLogger("nhi_broker_client.mcp")

#: JSON-RPC error code: the HTTP request carried no valid task token for this call (HTTP 401 or 503).
TOKEN_REFUSED = -32050
#: JSON-RPC error code: the call is not what the token grants (or the tool declares no intent).
INTENT_REFUSED = -32051

_SCOPE_KEY = "nhi_broker.task_token"
_DPOP_ALGS = ["ES256", "EdDSA"]
_current: contextvars.ContextVar[VerifiedTaskToken | None] = contextvars.ContextVar("nhi_task_token", default=None)


def current_task_token() -> VerifiedTaskToken | None:
    """Inside a guarded tool: the verified task token that authorised this very call (``subject``,
    ``owner``, ``txn`` = its ledger entry), or None outside one."""
    return _current.get()


class _MissingToken(InvalidTokenError):
    """The request carried no ``Authorization`` header (RFC 6750 §3.1: the challenge names no error)."""


def _jsonrpc_error(request_id: Any, code: int, message: str, data: dict[str, Any]) -> bytes:
    rid = request_id if isinstance(request_id, str | int) and not isinstance(request_id, bool) else None
    return json.dumps({"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": message, "data": data}}).encode()


async def _send_json(send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"cache-control", b"no-store"), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class TaskTokenGuard(Extension):
    """Protects an ``mcp`` server's tools with task tokens from the broker at ``broker_url``.

    ``resource_url`` is the MCP endpoint as clients reach it (the ``htu`` of their DPoP proofs and the
    ``resource`` of the metadata). ``tools`` maps each tool name to its :class:`ToolIntent`; a tool without
    one is refused. ``verifier_options`` are passed to each :class:`TaskTokenVerifier` (one per audience,
    sharing one DPoP replay cache): ``clock``, ``introspect``, ``http_client``, ``leeway``, ...

        guard = TaskTokenGuard(broker_url, "https://orders.example/mcp", {"refund_order": ToolIntent(...)})
        server = MCPServer("orders", extensions=[guard])

        @server.tool(meta=guard.tool_meta("refund_order"))
        def refund_order(customer: str, order: str, amount: float, currency: str) -> dict: ...

        app = guard.asgi(server.streamable_http_app())
    """

    identifier = "org.nhi-broker/task-tokens"

    def __init__(
        self,
        broker_url: str,
        resource_url: str,
        tools: Mapping[str, ToolIntent],
        *,
        resource_name: str | None = None,
        verifier_options: Mapping[str, Any] | None = None,
        max_body_bytes: int = 1_048_576,
    ) -> None:
        parts = urlsplit(resource_url)
        if parts.scheme not in ("https", "http") or not parts.netloc or parts.query or parts.fragment:
            raise ValueError("resource_url must be an absolute http(s) URL without query or fragment")
        self.broker_url = broker_url.rstrip("/")
        self.resource_url = resource_url
        self.tool_intents: dict[str, ToolIntent] = dict(tools)
        self.metadata_url = str(build_resource_metadata_url(AnyHttpUrl(resource_url)))
        self._path = parts.path or "/"
        self._metadata_path = urlsplit(self.metadata_url).path
        self._max_body = max_body_bytes
        options = dict(verifier_options or {})
        if "replay_cache" not in options:
            options["replay_cache"] = InMemoryReplayCache(options.get("clock", time.time))
        self._verifiers = {
            audience: TaskTokenVerifier(self.broker_url, audience, **options)
            for audience in sorted({tool.audience for tool in self.tool_intents.values()})
        }
        # Validated from plain strings so the issuer keeps its exact spelling (RFC 8414 §3.3 compares it
        # character by character); AnyHttpUrl("http://host") alone would add a "/".
        self.metadata = ProtectedResourceMetadata.model_validate({
            "resource": resource_url,
            "authorization_servers": [self.broker_url],
            "resource_name": resource_name,
            "authorization_details_types_supported": ["intent"],
            "dpop_signing_alg_values_supported": list(_DPOP_ALGS),
            "dpop_bound_access_tokens_required": bool(self.tool_intents)
            and all(t.require_dpop for t in self.tool_intents.values()),
        })
        self._metadata_app = cors_middleware(ProtectedResourceMetadataHandler(self.metadata).handle, ["GET", "OPTIONS"])

    def close(self) -> None:
        """Close the verifiers' HTTP clients."""
        for verifier in self._verifiers.values():
            verifier.close()

    def settings(self) -> dict[str, Any]:
        """Advertised under ``capabilities.extensions``: where the metadata and the broker are."""
        return {"broker": self.broker_url, "resource_metadata": self.metadata_url}

    def tool_meta(self, name: str) -> dict[str, Any]:
        """The ``_meta`` to register tool ``name`` with: its intent mapping, so assistants can ask for it."""
        return {META_KEY: self.tool_intents[name].to_meta()}

    def asgi(self, app: ASGIApp) -> ASGIApp:
        """``app`` (the server's streamable HTTP app) behind the metadata route and token authentication."""
        guard = self

        async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
            await guard._handle(app, scope, receive, send)

        return guarded

    # --- HTTP layer ---------------------------------------------------------------------------

    async def _handle(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        scope.pop(_SCOPE_KEY, None)
        if scope["path"] == self._metadata_path:
            await self._metadata_app(scope, receive, send)
            return
        if scope["path"] != self._path or scope["method"] != "POST":
            await app(scope, receive, send)
            return
        body = await self._read_body(receive)
        if body is None:
            await _send_json(send, 413, _jsonrpc_error(None, -32600, "request body too large", {}))
            return
        replay = _replayer(body, receive)
        try:
            message = json.loads(body)
        except ValueError:
            await app(scope, replay, send)  # the SDK answers a parse error
            return
        if isinstance(message, list):
            if any(isinstance(m, dict) and m.get("method") == "tools/call" for m in message):
                await _send_json(send, 400, _jsonrpc_error(None, -32600, "a tools/call cannot be batched", {}))
                return
        elif isinstance(message, dict) and message.get("method") == "tools/call":
            params = message.get("params")
            name = params.get("name") if isinstance(params, dict) else None
            tool = self.tool_intents.get(name) if isinstance(name, str) else None
            if tool is not None:
                assert isinstance(name, str)
                try:
                    verified = await self._authenticate(scope, tool)
                except TokenVerificationError as exc:
                    logger.info("refused tools/call %s: %s", name, exc.description)
                    await self._refuse(send, exc, message.get("id"), tool)
                    return
                scope[_SCOPE_KEY] = (name, verified)
            # An undeclared tool goes on without a token: the interceptor refuses it by name.
        await app(scope, replay, send)

    async def _read_body(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _authenticate(self, scope: Scope, tool: ToolIntent) -> VerifiedTaskToken:
        authorizations = [v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"]
        proofs = [v.decode("latin-1") for k, v in scope["headers"] if k == b"dpop"]
        if not authorizations:
            raise _MissingToken("this tool call needs a task token for its intent, from the broker in the "
                                "resource metadata")
        if len(authorizations) > 1 or len(proofs) > 1:
            raise InvalidTokenError("repeated Authorization or DPoP header")
        verifier = self._verifiers[tool.audience]
        verify = functools.partial(verifier.verify_request, authorizations[0], proofs[0] if proofs else None,
                                   "POST", self.resource_url)
        # The verifier is synchronous (a JWKS fetch on an unknown kid): off the event loop.
        verified = await anyio.to_thread.run_sync(verify)
        if tool.require_dpop and verified.cnf_jkt is None:
            raise InvalidTokenError("this tool accepts DPoP-bound tokens only")
        return verified

    async def _refuse(self, send: Send, exc: TokenVerificationError, request_id: Any, tool: ToolIntent) -> None:
        resource_metadata = f'resource_metadata="{self.metadata_url}"'
        if isinstance(exc, _MissingToken):
            challenges = [f'DPoP algs="{" ".join(_DPOP_ALGS)}", {resource_metadata}']
            if not tool.require_dpop:
                challenges.insert(0, f"Bearer {resource_metadata}")
        else:
            challenges = [f"{exc.www_authenticate(dpop=True)}, {resource_metadata}"]
            if not tool.require_dpop:
                challenges.insert(0, f"{exc.www_authenticate(dpop=False)}, {resource_metadata}")
        data = {"error": exc.code, "error_description": exc.description, "resource_metadata": self.metadata_url}
        body = _jsonrpc_error(request_id, TOKEN_REFUSED, f"{exc.code}: {exc.description}", data)
        await _send_json(send, exc.status, body, [(b"www-authenticate", c.encode()) for c in challenges])

    # --- MCP layer ----------------------------------------------------------------------------

    async def intercept_tool_call(
        self, params: CallToolRequestParams, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        """Run the tool only if this call is exactly the intent its verified task token grants."""
        tool = self.tool_intents.get(params.name)
        if tool is None:
            raise MCPError(INTENT_REFUSED, f"refused: tool '{params.name}' declares no intent",
                           {"error": "insufficient_scope", "tool": params.name})
        scope = getattr(ctx.request, "scope", None)
        held = scope.get(_SCOPE_KEY) if isinstance(scope, dict) else None
        if held is None or held[0] != params.name:
            raise MCPError(TOKEN_REFUSED, "invalid_token: no verified task token for this call",
                           {"error": "invalid_token", "tool": params.name})
        verified: VerifiedTaskToken = held[1]
        try:
            tool.require_granted(verified.intent, params.arguments or {})
        except IntentMismatchError as exc:
            logger.info("refused tools/call %s (token %s): %s", params.name, verified.jti, exc.description)
            raise MCPError(INTENT_REFUSED, f"refused before the tool ran: {exc.description}",
                           {"error": exc.code, "error_description": exc.description, "tool": params.name}) from None
        reset = _current.set(verified)
        try:
            return await call_next(ctx)
        finally:
            _current.reset(reset)


def _replayer(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the already-read body to the app once, then the client's own messages."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
