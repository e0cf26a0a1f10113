"""Discovery: the JWKS (RFC 7517) and authorization-server metadata (RFC 8414).

Both are answered on the event loop from memory: no thread, no backend, so they answer while any
backend hangs (anyio's shared thread pool, which sync routes would wait for, is never needed).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from broker.api.deps import RuntimeDep
from broker.api.routes.token import CIBA_GRANT, TOKEN_EXCHANGE_GRANT
from broker.mint.keys import JWKS_MAX_AGE

__all__ = ["router"]

router = APIRouter()


@router.get("/.well-known/jwks.json", summary="Public keys that verify task tokens (kid = RFC 7638 thumbprint)")
async def jwks(runtime: RuntimeDep) -> JSONResponse:
    return JSONResponse(runtime.keys.jwks(), headers={"Cache-Control": f"public, max-age={JWKS_MAX_AGE}"})


@router.get("/.well-known/oauth-authorization-server", summary="RFC 8414 authorization server metadata")
async def metadata(runtime: RuntimeDep) -> dict[str, Any]:
    base = runtime.settings.issuer_url
    return {
        "issuer": base,
        "token_endpoint": f"{base}/v1/token",
        "jwks_uri": f"{base}/.well-known/jwks.json",
        "introspection_endpoint": f"{base}/v1/introspect",
        "revocation_endpoint": f"{base}/v1/revoke",
        # Resource servers may also present their workload identity token (Bearer); RFC 8414 has no name for it.
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic"],
        "revocation_endpoint_auth_methods_supported": ["client_secret_basic"],
        "grant_types_supported": [TOKEN_EXCHANGE_GRANT, CIBA_GRANT],
        # OpenID CIBA discovery: intents held for review are collected by polling (docs/approvals.md).
        "backchannel_token_delivery_modes_supported": ["poll"],
        "token_endpoint_auth_methods_supported": ["none"],
        "authorization_details_types_supported": ["intent"],
        "response_types_supported": [],
        "token_endpoint_auth_signing_alg_values_supported": [runtime.keys.alg],
        "subject_token_types_supported": [
            "urn:ietf:params:oauth:token-type:jwt",
            "urn:ietf:params:oauth:token-type:id_token",
        ],
        "dpop_signing_alg_values_supported": list(runtime.dpop.algorithms) if runtime.dpop else [],
        "ledger_checkpoint_endpoint": f"{base}/v1/ledger/checkpoint",
        "ledger_verifier_key": runtime.ledger_verifier_key,
    }
