"""pydantic-ai agents whose tool calls carry their intent (needs the ``pydantic-ai`` extra).

:class:`IntentToolset` exposes the tools of an MCP server through an :class:`~nhi_broker_client.mcp.IntentMCPClient`
as a pydantic-ai toolset: every call the model makes goes through the same path as a hand-written one (a
task token for exactly that call's intent, DPoP proof for that POST). A refusal, by the broker's policy or
by the tool's server, is a failed tool result the model sees and can explain; a held intent ends the run
with the call deferred (pydantic-ai's ``DeferredToolRequests``, metadata ``auth_req_id`` / ``rule_id``) so
the chatbot can tell the user that a person must approve, and :meth:`IntentToolset.resolve` completes it.

    async with IntentMCPClient(url, broker, session_context={"customer": "c-42"}) as orders:
        toolset = IntentToolset(orders)
        agent = Agent(model, toolsets=[toolset], output_type=[str, DeferredToolRequests])
        run = await agent.run("refund 120 EUR on ord-1001")
        if isinstance(run.output, DeferredToolRequests):
            results = await toolset.resolve(run.output, timeout=600)   # waits for the approver
            run = await agent.run(message_history=run.all_messages(), deferred_tool_results=results)
"""

from __future__ import annotations

from typing import Any

from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, TextContent
from pydantic_ai import DeferredToolRequests, DeferredToolResults, RunContext, ToolDefinition
from pydantic_ai.exceptions import CallDeferred, ToolFailed
from pydantic_ai.toolsets import AbstractToolset, ToolsetTool
from pydantic_core import SchemaValidator, core_schema

from ._errors import ApprovalPending, BrokerResponseError, IntentMismatchError
from ._mcp_client import IntentMCPClient, ToolCallPending

__all__ = ["IntentToolset"]

# The MCP server validates arguments against its own schema; the toolset passes the model's JSON on.
_ANY_ARGS = SchemaValidator(core_schema.dict_schema(core_schema.str_schema(), core_schema.any_schema()))


def _result_value(result: CallToolResult) -> Any:
    if result.is_error:
        raise ToolFailed(_text(result) or "the tool failed")
    if result.structured_content is not None:
        return result.structured_content
    return _text(result)


def _text(result: CallToolResult) -> str:
    return "\n".join(part.text for part in result.content if isinstance(part, TextContent))


class IntentToolset(AbstractToolset[Any]):
    """The intent-declaring tools of ``client``'s MCP server, as a pydantic-ai toolset.

    Only tools with an intent mapping are offered to the model. ``wait_for_approval`` (``True`` or
    seconds) makes a held call wait inside the run instead of deferring it.
    """

    def __init__(self, client: IntentMCPClient, *, id: str | None = None, max_retries: int = 1,
                 wait_for_approval: bool | float = False) -> None:
        self.client = client
        self._id = id
        self._max_retries = max_retries
        self._wait = wait_for_approval
        self._pending: dict[str, ToolCallPending] = {}

    @property
    def id(self) -> str | None:
        """The toolset's id among an agent's toolsets."""
        return self._id

    async def get_tools(self, ctx: RunContext[Any]) -> dict[str, ToolsetTool[Any]]:
        """The server's tools that declare an intent."""
        tools: dict[str, ToolsetTool[Any]] = {}
        for name, tool in self.client.tools.items():
            if name not in self.client.intents:
                continue
            definition = ToolDefinition(name=name, description=tool.description,
                                        parameters_json_schema=dict(tool.input_schema))
            tools[name] = ToolsetTool(toolset=self, tool_def=definition, max_retries=self._max_retries,
                                      args_validator=_ANY_ARGS)
        return tools

    async def call_tool(self, name: str, tool_args: dict[str, Any], ctx: RunContext[Any],
                        tool: ToolsetTool[Any]) -> Any:
        """Call the tool through the client: a task token for exactly this call, or a reason why not."""
        try:
            result = await self.client.call_tool(name, tool_args, wait_for_approval=self._wait)
        except ToolCallPending as pending:
            if ctx.tool_call_id is None:
                raise ToolFailed(f"held for approval by rule {pending.rule_id}, and this run cannot defer") from None
            self._pending[ctx.tool_call_id] = pending
            raise CallDeferred(metadata={"auth_req_id": pending.auth_req_id, "rule_id": pending.rule_id,
                                         "expires_at": pending.expires_at}) from None
        except ApprovalPending as pending:  # waited, and nobody decided in time
            raise ToolFailed(f"still waiting for approval by rule {pending.rule_id}") from None
        except BrokerResponseError as exc:
            raise ToolFailed(f"the broker refused this call ({exc.code}): {exc.description}") from None
        except IntentMismatchError as exc:
            raise ToolFailed(f"this call cannot be expressed as an intent: {exc.description}") from None
        except MCPError as exc:
            raise ToolFailed(f"the tool's server refused this call: {exc.message}") from None
        return _result_value(result)

    async def resolve(self, requests: DeferredToolRequests, *, timeout: float | None = None) -> DeferredToolResults:
        """Wait for the approvals of the calls this toolset deferred, make them, and return their results
        (a denial or an expiry becomes a failed result the model sees)."""
        results = DeferredToolResults()
        for call in requests.calls:
            pending = self._pending.get(call.tool_call_id)
            if pending is None:
                continue
            try:
                value: Any = _result_value(await self.client.complete(pending, timeout=timeout))
            except ApprovalPending:
                continue  # still undecided: stays pending for a later resolve()
            except ToolFailed as failed:
                value = failed
            except BrokerResponseError as exc:
                value = ToolFailed(f"not approved ({exc.code}): {exc.description}")
            except MCPError as exc:
                value = ToolFailed(f"the tool's server refused this call: {exc.message}")
            self._pending.pop(call.tool_call_id, None)
            results.calls[call.tool_call_id] = value
        return results

