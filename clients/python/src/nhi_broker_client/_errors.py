"""One error root for the SDK, with stable codes.

    NhiBrokerError                    code                         where
    ├── TransportError                transport_error              the broker could not be reached
    ├── BrokerResponseError           the broker's RFC 6749 error  the broker refused (.status, .rule_id)
    │   ├── InvalidRequestError       invalid_request, invalid_target, unsupported_*, invalid_authorization_details
    │   ├── InvalidGrantError         invalid_grant                the identity was not accepted
    │   ├── InvalidDPoPProofError     invalid_dpop_proof, use_dpop_nonce
    │   ├── AccessDeniedError         access_denied                the intent policy said no (.rule_id)
    │   └── BrokerUnavailableError    temporarily_unavailable, 5xx nothing was issued; retry later
    └── TokenVerificationError        resource side; .status and .www_authenticate() for the response
        ├── InvalidTokenError         invalid_token            401
        │   └── TokenInactiveError    invalid_token            401  revoked or already used (introspection)
        ├── InvalidDPoPError          invalid_dpop_proof       401
        ├── IntentMismatchError       insufficient_scope       403  the request is not what was granted
        └── KeysUnavailableError      temporarily_unavailable  503  the broker's JWKS cannot be fetched

Descriptions never contain a token, a proof or a key.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AccessDeniedError",
    "BrokerResponseError",
    "BrokerUnavailableError",
    "IntentMismatchError",
    "InvalidDPoPError",
    "InvalidDPoPProofError",
    "InvalidGrantError",
    "InvalidRequestError",
    "InvalidTokenError",
    "KeysUnavailableError",
    "NhiBrokerError",
    "TokenInactiveError",
    "TokenVerificationError",
    "TransportError",
]


class NhiBrokerError(Exception):
    """Root of every error the SDK raises on purpose."""

    code: str = "error"

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description


class TransportError(NhiBrokerError):
    """The broker (or its JWKS) could not be reached; nothing was issued."""

    code = "transport_error"


class BrokerResponseError(NhiBrokerError):
    """The broker answered with an RFC 6749 error."""

    def __init__(self, code: str, description: str, *, status: int, rule_id: str | None = None) -> None:
        super().__init__(description)
        self.code = code
        self.status = status
        self.rule_id = rule_id

    def __str__(self) -> str:
        return f"{self.code} ({self.status}): {self.description}"


class InvalidRequestError(BrokerResponseError):
    """The request was malformed, named an audience the workload may not use, or an unsupported type."""


class InvalidGrantError(BrokerResponseError):
    """The identity (subject token) was not accepted: expired, replayed, unknown issuer, ..."""


class InvalidDPoPProofError(BrokerResponseError):
    """The DPoP proof was refused, or the policy demands one (or one made with the identity's key)."""


class AccessDeniedError(BrokerResponseError):
    """The intent policy denied the request; ``rule_id`` names the deciding rule, if any."""


class BrokerUnavailableError(BrokerResponseError):
    """A broker backend is unavailable; nothing was issued. Safe to retry later."""


class ApprovalExpiredError(BrokerResponseError):
    """Nobody approved the held intent in time (CIBA ``expired_token``); ask again if still needed."""


class ApprovalPending(NhiBrokerError):
    """The intent is held for human review (OpenID CIBA poll mode); nothing is issued yet.

    Pass it to ``collect()`` to poll once, or to ``wait_for_approval()`` to poll until a person decided.
    ``interval`` is the broker's polling interval in seconds; ``expires_at`` the clock time after which
    the request can no longer be approved.
    """

    def __init__(self, auth_req_id: str, expires_at: float, interval: float, rule_id: str | None,
                 audience: str, intent: Any) -> None:
        super().__init__(f"intent held for review by rule {rule_id or '?'}; poll with its auth_req_id")
        self.auth_req_id = auth_req_id
        self.expires_at = expires_at
        self.interval = interval
        self.rule_id = rule_id
        self.audience = audience
        self.intent = intent


_BY_CODE: dict[str, type[BrokerResponseError]] = {
    "invalid_request": InvalidRequestError,
    "invalid_target": InvalidRequestError,
    "unsupported_grant_type": InvalidRequestError,
    "unsupported_token_type": InvalidRequestError,
    "invalid_authorization_details": InvalidRequestError,
    "invalid_grant": InvalidGrantError,
    "invalid_dpop_proof": InvalidDPoPProofError,
    "use_dpop_nonce": InvalidDPoPProofError,
    "access_denied": AccessDeniedError,
    "temporarily_unavailable": BrokerUnavailableError,
    "expired_token": ApprovalExpiredError,
}


def error_from_response(status: int, body: Any) -> BrokerResponseError:
    """The typed exception for an error response (the one place wire errors become exceptions)."""
    code = body.get("error") if isinstance(body, dict) else None
    description = body.get("error_description") if isinstance(body, dict) else None
    rule_id = body.get("rule_id") if isinstance(body, dict) else None
    if not isinstance(code, str):
        code = "temporarily_unavailable" if status >= 500 else "invalid_request"
    if not isinstance(description, str):
        description = f"HTTP {status}"
    cls = _BY_CODE.get(code) or (BrokerUnavailableError if status >= 500 else BrokerResponseError)
    return cls(code, description[:500], status=status, rule_id=rule_id if isinstance(rule_id, str) else None)


class TokenVerificationError(NhiBrokerError):
    """A task token (or its DPoP proof) was refused by the resource-side verifier."""

    code = "invalid_token"
    status = 401

    def www_authenticate(self, dpop: bool = True) -> str:
        """The ``WWW-Authenticate`` challenge for the error response (RFC 6750 §3, RFC 9449 §7.1)."""
        scheme = "DPoP" if dpop else "Bearer"
        desc = self.description.replace("\\", "").replace('"', "'")
        challenge = f'{scheme} error="{self.code}", error_description="{desc}"'
        return challenge + (', algs="ES256 EdDSA"' if dpop else "")


class InvalidTokenError(TokenVerificationError):
    """The token is malformed, expired, for another audience, not signed by the broker, ..."""


class TokenInactiveError(InvalidTokenError):
    """Introspection says the token is no longer active (revoked, suspended or already used)."""


class InvalidDPoPError(TokenVerificationError):
    """The DPoP proof is missing, malformed, replayed, for another request, or made with another key."""

    code = "invalid_dpop_proof"


class IntentMismatchError(TokenVerificationError):
    """The request is not what the token grants (action, resource or context such as the amount)."""

    code = "insufficient_scope"
    status = 403


class KeysUnavailableError(TokenVerificationError):
    """The broker's keys cannot be fetched and none are cached: fail closed."""

    code = "temporarily_unavailable"
    status = 503
