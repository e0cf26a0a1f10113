"""``POST /v1/token``: RFC 8693 token exchange with RFC 9396 intents.

The form is read by :mod:`broker.api.forms` (415, 413, repeated or undecodable parameters); this
module checks the exchange's own parameters, each with a precise error: unknown grant types,
actor tokens without their type, audiences, requested token types, the intent and the DPoP header.

With ``actor_token`` (RFC 8693 §2.1) the request is delegated: the actor token is the workload's
identity and the subject token an end user's token from a configured user issuer, or the parent
task token a sub-agent narrows (docs/delegation.md).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from broker.api.deps import RuntimeDep
from broker.api.errors import NO_STORE
from broker.api.forms import read_form, required
from broker.attest.evidence import Evidence
from broker.attest.methods.wimse import WIT_TOKEN_TYPE, WPT_HEADER
from broker.attest.methods.x509_svid import X509_SVID_TOKEN_TYPE, XFCC_HEADER
from broker.csprng import random_bytes
from broker.dpop import CheckedDPoPProof, InvalidDPoPProof
from broker.errors import (
    InvalidRequest,
    InvalidTarget,
    UnsupportedGrantType,
)
from broker.intent import parse_authorization_details
from broker.mint.jwt import ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE
from broker.models import Held, Issued
from broker.pipeline import ExchangeRequest, PollRequest
from broker.tls import peer_chain
from broker.tracing import current_trace_id
from broker.vault.kinds import TOKEN_TYPES

__all__ = ["CIBA_GRANT", "TOKEN_EXCHANGE_GRANT", "router"]

router = APIRouter()

TOKEN_EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
#: OpenID CIBA poll mode: collect an intent held for review (docs/approvals.md).
CIBA_GRANT = "urn:openid:params:grant-type:ciba"
_ISSUABLE = {ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE, *TOKEN_TYPES.values()}
_POLL_FIXED = ("actor_token", "actor_token_type")

_FORM_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/x-www-form-urlencoded": {
                "schema": {
                    "type": "object",
                    "required": ["grant_type", "subject_token", "subject_token_type", "audience",
                                 "authorization_details"],
                    "properties": {
                        "grant_type": {"type": "string", "enum": [TOKEN_EXCHANGE_GRANT, CIBA_GRANT]},
                        "auth_req_id": {"type": "string", "description": "CIBA polls: the held request."},
                        "subject_token": {
                            "type": "string",
                            "description": "The workload identity JWT; with actor_token, the end user's token "
                                           "or the parent task token of a sub-agent.",
                        },
                        "subject_token_type": {
                            "type": "string",
                            "enum": ["urn:ietf:params:oauth:token-type:jwt",
                                     "urn:ietf:params:oauth:token-type:id_token",
                                     "urn:ietf:params:oauth:token-type:access_token",
                                     X509_SVID_TOKEN_TYPE, WIT_TOKEN_TYPE],
                        },
                        "actor_token": {"type": "string", "description": "Delegation: the workload identity JWT."},
                        "actor_token_type": {"type": "string", "enum": ["urn:ietf:params:oauth:token-type:jwt",
                                                                        X509_SVID_TOKEN_TYPE, WIT_TOKEN_TYPE]},
                        "audience": {"type": "string", "description": "The target service."},
                        "authorization_details": {
                            "type": "string",
                            "description": 'JSON array with one {"type":"intent","action","resource","context"}.',
                        },
                        "requested_token_type": {"type": "string", "enum": sorted(_ISSUABLE)},
                        "scope": {"type": "string"},
                    },
                }
            }
        },
    }
}


def _dpop_proof(request: Request, runtime: RuntimeDep) -> CheckedDPoPProof | None:
    """The checked DPoP proof of this request (RFC 9449 §4.3), ``None`` when it carries none.

    Its ``jti`` is consumed by the pipeline once the subject token is attested, so a caller without
    a valid identity writes no state."""
    proofs = request.headers.getlist("dpop")
    if not proofs:
        return None
    if len(proofs) > 1:
        raise InvalidDPoPProof("more than one DPoP header")
    if runtime.dpop is None:
        raise InvalidDPoPProof("DPoP is not enabled on this broker")
    # htu is the token endpoint under the issuer URL: what clients read from the RFC 8414 metadata.
    htu = runtime.settings.issuer_url + request.scope["path"]
    # On the event loop, like the decision itself: a signature check, no state (the jti is consumed
    # by the pipeline once the identity is attested).
    return runtime.dpop.check(proofs[0], htm=request.method, htu=htu)


def _evidence(request: Request, runtime: RuntimeDep) -> Evidence:
    """What the transport carries besides the form, for request methods (X.509-SVID, WIMSE).

    Repeated header fields are combined with ``,`` (RFC 9110 §5.3), so a method sees every value: two
    Workload-Proof-Token fields, or an XFCC header of several hops, are refused rather than half-read.
    The peer address is the transport's (``nhi-broker serve`` runs uvicorn without proxy headers), so
    an X-Forwarded-For header cannot make a caller look like a trusted proxy.
    """
    headers: dict[str, str] = {}
    for name in (XFCC_HEADER, WPT_HEADER):
        values = request.headers.getlist(name)
        if values:
            headers[name] = ",".join(values)
    return Evidence(
        token=None, token_type=None, http_method=request.method,
        http_url=runtime.settings.issuer_url + request.scope["path"], headers=headers,
        peer_chain=peer_chain(request.scope), peer_address=request.client.host if request.client else None,
    )


# json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")) without a new encoder per call.
_ANSWER_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
_NO_STORE_RAW = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in NO_STORE.items()]


class JsonAnswer(Response):
    """A 200 JSON answer built in one step: what Starlette's ``JSONResponse`` sends (compact UTF-8
    JSON, no NaN), without its header plumbing, which the token endpoint paid on every exchange.
    Its headers: ``Cache-Control``/``Pragma`` (:data:`~broker.api.errors.NO_STORE`), ``X-Request-Id``
    and, when given, ``DPoP-Nonce``."""

    media_type = "application/json"

    def __init__(self, content: dict[str, Any], request_id: str, dpop_nonce: str | None = None) -> None:
        self.status_code = 200
        self.background = None
        self.body = _ANSWER_ENCODER.encode(content).encode()
        self.raw_headers = [(b"content-length", str(len(self.body)).encode("latin-1")),
                            (b"content-type", b"application/json"), *_NO_STORE_RAW,
                            (b"x-request-id", request_id.encode("latin-1"))]
        if dpop_nonce is not None:
            self.raw_headers.append((b"dpop-nonce", dpop_nonce.encode("latin-1")))


def _request_id() -> str:
    """A random (version 4) UUID as 32 hex digits: ``uuid.UUID(bytes=random_bytes(16), version=4).hex``
    (the version nibble and the RFC 4122 variant bits set), without building the UUID."""
    raw = bytearray(random_bytes(16))
    raw[6] = raw[6] & 0x0F | 0x40
    raw[8] = raw[8] & 0x3F | 0x80
    return raw.hex()


def _poll_request(form: dict[str, str], request_id: str) -> PollRequest:
    """A CIBA poll: ``auth_req_id`` plus a fresh identity token of the workload that was held."""
    for name in ("audience", "authorization_details", "requested_token_type", *_POLL_FIXED):
        if name in form:
            raise InvalidRequest(f"{name} is not a parameter of a CIBA poll; the held intent is fixed")
    auth_req_id = required(form, "auth_req_id")
    if len(auth_req_id) > 64:
        raise InvalidRequest("auth_req_id is too long")
    return PollRequest(
        auth_req_id=auth_req_id,
        subject_token=required(form, "subject_token"),
        subject_token_type=required(form, "subject_token_type"),
        request_id=request_id,
    )


def _exchange_request(form: dict[str, str], request_id: str, evidence: Evidence, trace_id: str | None
                      ) -> ExchangeRequest:
    grant_type = required(form, "grant_type")
    if grant_type != TOKEN_EXCHANGE_GRANT:
        raise UnsupportedGrantType(f"grant_type must be {TOKEN_EXCHANGE_GRANT} or {CIBA_GRANT}")
    actor_token = form.get("actor_token")
    actor_token_type = form.get("actor_token_type")
    if actor_token is not None and actor_token_type is None:
        raise InvalidRequest("actor_token_type is required with actor_token (RFC 8693 §2.1)")
    if actor_token is None and actor_token_type is not None:
        raise InvalidRequest("actor_token_type without actor_token")
    if actor_token == "":
        raise InvalidRequest("actor_token is empty")
    subject_token = required(form, "subject_token")
    subject_token_type = required(form, "subject_token_type")
    audience = required(form, "audience")
    if len(audience) > 256 or not audience.isprintable() or " " in audience:
        raise InvalidTarget("audience must be one service name without spaces")
    requested = form.get("requested_token_type")
    if requested is not None and requested not in _ISSUABLE:
        raise InvalidTarget("requested_token_type is not one this broker issues")
    intent = parse_authorization_details(form.get("authorization_details"))
    return ExchangeRequest(
        subject_token=subject_token,
        subject_token_type=subject_token_type,
        audience=audience,
        intent=intent,
        request_id=request_id,
        requested_token_type=requested,
        actor_token=actor_token,
        actor_token_type=actor_token_type,
        evidence=evidence,
        trace_id=trace_id,
    )


@router.post(
    "/v1/token",
    openapi_extra=_FORM_SCHEMA,
    summary="Exchange a workload identity and an intent for a task token (RFC 8693, RFC 9396)",
    responses={400: {"description": "RFC 6749 error"}, 403: {"description": "access_denied"},
               503: {"description": "a backend is unavailable; nothing was issued"}},
)
async def token(request: Request, runtime: RuntimeDep) -> Response:
    """RFC 8693 token exchange. Answers the RFC 8693 §2.2.1 response plus the ledger receipt.

    An intent held for review is answered as OpenID CIBA acknowledges a request (``auth_req_id``,
    ``expires_in``, ``interval``); poll with ``grant_type=urn:openid:params:grant-type:ciba``.
    """
    request_id = _request_id()
    form = await read_form(request, runtime.settings.max_body_bytes)
    outcome: Issued | Held
    if form.get("grant_type") == CIBA_GRANT:
        poll = dataclasses.replace(_poll_request(form, request_id), evidence=_evidence(request, runtime),
                                   trace_id=current_trace_id())
        proof = _dpop_proof(request, runtime)
        outcome = await runtime.broker.redeem(dataclasses.replace(poll, dpop_checked=proof) if proof else poll)
    else:
        # The form's parameters are checked before the DPoP header, as they always were.
        exchange = _exchange_request(form, request_id, _evidence(request, runtime), current_trace_id())
        proof = _dpop_proof(request, runtime)
        if proof is not None:
            exchange = dataclasses.replace(exchange, dpop_checked=proof)
        outcome = await runtime.broker.exchange(exchange)
    if isinstance(outcome, Held):
        held = {"auth_req_id": outcome.auth_req_id, "expires_in": outcome.expires_in, "interval": outcome.interval,
                "rule_id": outcome.grant.rule_id}
        return JsonAnswer(held, request_id)
    issued = outcome
    payload = {
        "access_token": issued.access_token,
        "issued_token_type": issued.issued_token_type,
        "token_type": issued.token_type,
        "expires_in": issued.expires_in,
        "authorization_details": [issued.grant.intent.to_json()],
        **issued.extra,
        "receipt": {"index": issued.receipt.index, "leaf_hash": issued.receipt.leaf_hash},
    }
    nonce = runtime.dpop.fresh_nonce() if runtime.dpop else None
    return JsonAnswer(payload, request_id, nonce)
