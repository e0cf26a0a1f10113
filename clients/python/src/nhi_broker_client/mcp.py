"""MCP tools whose calls carry their intent (needs the ``mcp`` extra: ``pip install 'nhi-broker-client[mcp]'``).

Resource side: :class:`TaskTokenGuard` protects an ``mcp`` server's tools; each tool declares a
:class:`~nhi_broker_client.ToolIntent`. Assistant side: :class:`IntentMCPClient` obtains a task token per
call for exactly that call's intent and attaches it; a held intent is a :class:`ToolCallPending`.
"""

from ._mcp_client import IntentMCPClient, ToolCallPending
from ._mcp_server import INTENT_REFUSED, TOKEN_REFUSED, TaskTokenGuard, current_task_token

__all__ = ["INTENT_REFUSED", "TOKEN_REFUSED", "IntentMCPClient", "TaskTokenGuard", "ToolCallPending",
           "current_task_token"]
__all__.sort()
