"""nhi-broker client SDK.

Chatbot backends: :class:`BrokerClient` / :class:`AsyncBrokerClient` exchange a workload identity and an
intent for a short-lived task token, DPoP-bound to a key only this process holds (:class:`DPoPKey`).
Resource servers: :class:`TaskTokenVerifier` verifies a task token and its DPoP proof with the broker's
JWKS and returns a :class:`VerifiedTaskToken`, whose :meth:`~VerifiedTaskToken.require_intent` compares
the grant with the actual request. FastAPI: :mod:`nhi_broker_client.fastapi`. MCP tools whose calls
carry their intent (:class:`ToolIntent`): :mod:`nhi_broker_client.mcp`; pydantic-ai agents:
:mod:`nhi_broker_client.pydantic_ai`.
"""

from ._client import AsyncBrokerClient, BrokerClient, TaskToken
from ._dpop import DPoPKey, InMemoryReplayCache, ReplayCache, access_token_hash
from ._errors import (
    AccessDeniedError,
    ApprovalExpiredError,
    ApprovalPending,
    BrokerResponseError,
    BrokerUnavailableError,
    IntentMismatchError,
    InvalidDPoPError,
    InvalidDPoPProofError,
    InvalidGrantError,
    InvalidRequestError,
    InvalidTokenError,
    KeysUnavailableError,
    NhiBrokerError,
    TokenInactiveError,
    TokenVerificationError,
    TransportError,
)
from ._intent import Intent
from ._jose import jwk_thumbprint
from ._tool_intent import ToolIntent
from ._verify import Introspector, TaskTokenVerifier, VerifiedTaskToken

__version__ = "0.1.0"

__all__ = [
    "AccessDeniedError",
    "ApprovalExpiredError",
    "ApprovalPending",
    "AsyncBrokerClient",
    "BrokerClient",
    "BrokerResponseError",
    "BrokerUnavailableError",
    "DPoPKey",
    "InMemoryReplayCache",
    "Intent",
    "IntentMismatchError",
    "Introspector",
    "InvalidDPoPError",
    "InvalidDPoPProofError",
    "InvalidGrantError",
    "InvalidRequestError",
    "InvalidTokenError",
    "KeysUnavailableError",
    "NhiBrokerError",
    "ReplayCache",
    "TaskToken",
    "TaskTokenVerifier",
    "TokenInactiveError",
    "TokenVerificationError",
    "ToolIntent",
    "TransportError",
    "VerifiedTaskToken",
    "__version__",
    "access_token_hash",
    "jwk_thumbprint",
]
