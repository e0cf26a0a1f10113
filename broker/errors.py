"""One error root for the broker, with stable OAuth error codes.

Every failure the broker reports derives from :class:`BrokerError`. Its ``code`` is the RFC 6749
§5.2 / RFC 8693 / RFC 9396 error string put on the wire, ``status`` the HTTP status, and
``description`` a short human text that never contains a token, a secret or a stack trace.
The API maps errors to responses in one handler (``broker.api.errors``).

    BrokerError                         server_error             500
    ├── InvalidRequest                  invalid_request          400
    │   ├── RequestTooLarge             invalid_request          413
    │   └── UnsupportedMediaType        invalid_request          415
    ├── UnsupportedGrantType            unsupported_grant_type   400
    ├── UnsupportedTokenType            unsupported_token_type   400
    ├── InvalidGrant                    invalid_grant            400
    │   ├── AttestationError            invalid_grant            400   (identity not proven)
    │   └── ReplayDetected              invalid_grant            400   (single-use value seen)
    ├── InvalidTarget                   invalid_target           400
    ├── InvalidAuthorizationDetails     invalid_authorization_details 400
    ├── AccessDenied                    access_denied            403
    │   ├── UnregisteredWorkload        access_denied            403
    │   ├── WorkloadSuspended           workload_suspended       403   (kill switch)
    │   ├── InsufficientRole            access_denied            403   (operator lacks the role)
    │   └── PolicyDenied                access_denied            403   (carries the rule id)
    │       ├── RateLimited             rate_limit_exceeded      429
    │       └── BudgetExceeded          budget_exceeded          403
    ├── InvalidClient                   invalid_client           401   (introspection/revocation caller)
    ├── InvalidOperatorToken            invalid_token            401   (admin API caller)
    ├── NotFound                        not_found                404
    ├── PolicySetRefused                invalid_policy           422   (a live reload refused; old set serves)
    └── TemporarilyUnavailable          temporarily_unavailable  503
        ├── LedgerUnavailable           temporarily_unavailable  503
        └── StoreUnavailable            temporarily_unavailable  503

    PolicyLoadError   refused policy set (the broker does not start; a live reload answers PolicySetRefused)
    VerificationError a proof, signature or ledger failed offline verification
    ConfigError       refused configuration
"""

from __future__ import annotations

__all__ = [
    "AccessDenied",
    "AttestationError",
    "BrokerError",
    "BudgetExceeded",
    "ConfigError",
    "InsufficientRole",
    "InvalidAuthorizationDetails",
    "InvalidClient",
    "InvalidGrant",
    "InvalidOperatorToken",
    "InvalidRequest",
    "InvalidTarget",
    "LedgerUnavailable",
    "NotFound",
    "PolicyDenied",
    "PolicyLoadError",
    "PolicySetRefused",
    "RateLimited",
    "ReplayDetected",
    "RequestTooLarge",
    "StoreUnavailable",
    "TemporarilyUnavailable",
    "UnregisteredWorkload",
    "UnsupportedGrantType",
    "UnsupportedMediaType",
    "UnsupportedTokenType",
    "VerificationError",
    "WorkloadSuspended",
]


class BrokerError(Exception):
    """Root of every error the broker raises on purpose."""

    code: str = "server_error"
    status: int = 500

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description

    def to_json(self) -> dict[str, str]:
        """The RFC 6749 §5.2 error object."""
        return {"error": self.code, "error_description": self.description}


class InvalidRequest(BrokerError):
    code = "invalid_request"
    status = 400


class RequestTooLarge(InvalidRequest):
    status = 413


class UnsupportedMediaType(InvalidRequest):
    status = 415


class UnsupportedGrantType(BrokerError):
    code = "unsupported_grant_type"
    status = 400


class UnsupportedTokenType(BrokerError):
    code = "unsupported_token_type"
    status = 400


class InvalidGrant(BrokerError):
    code = "invalid_grant"
    status = 400


class AttestationError(InvalidGrant):
    """The subject token does not prove a workload identity we trust."""


class ReplayDetected(InvalidGrant):
    """A single-use value (identity ``jti``, DPoP ``jti``) was presented again."""


class InvalidTarget(BrokerError):
    code = "invalid_target"
    status = 400


class InvalidAuthorizationDetails(BrokerError):
    code = "invalid_authorization_details"
    status = 400


class AccessDenied(BrokerError):
    code = "access_denied"
    status = 403


class UnregisteredWorkload(AccessDenied):
    """The attested workload is not in the registry: it gets nothing."""


class PolicyDenied(AccessDenied):
    """The intent policy denied the request.

    ``rule_id`` names the deciding rule (``None`` when no rule allowed it: default deny).
    The description carries the rule id, never the rule text.
    """

    def __init__(self, description: str, *, rule_id: str | None, policy_version: str) -> None:
        super().__init__(description)
        self.rule_id = rule_id
        self.policy_version = policy_version

    def to_json(self) -> dict[str, str]:
        body = super().to_json()
        if self.rule_id is not None:
            body["rule_id"] = self.rule_id
        return body


class WorkloadSuspended(AccessDenied):
    """An operator suspended the workload: nothing is issued to it until it is resumed."""

    code = "workload_suspended"


class InsufficientRole(AccessDenied):
    """The authenticated operator's role does not allow this admin call."""


class RateLimited(PolicyDenied):
    """The rule's request rate for (workload, action) is used up for the current window.

    ``retry_after`` is the number of seconds until the window frees, sent as ``Retry-After``
    (RFC 9110 §10.2.3; RFC 6585 §4).
    """

    code = "rate_limit_exceeded"
    status = 429

    def __init__(self, description: str, *, rule_id: str | None, policy_version: str, retry_after: int = 1) -> None:
        super().__init__(description, rule_id=rule_id, policy_version=policy_version)
        self.retry_after = retry_after
        self.http_headers = {"Retry-After": str(retry_after)}


class BudgetExceeded(PolicyDenied):
    """The intent's value would take the rule's cumulative budget over its limit for the period."""

    code = "budget_exceeded"


class InvalidClient(BrokerError):
    """The introspection or revocation caller did not authenticate (RFC 6749 §5.2)."""

    code = "invalid_client"
    status = 401
    www_authenticate = 'Basic realm="nhi-broker"'


class InvalidOperatorToken(BrokerError):
    """The admin API caller presented no valid operator credential (RFC 6750 §3.1)."""

    code = "invalid_token"
    status = 401
    www_authenticate = 'Bearer realm="nhi-broker-admin", error="invalid_token"'


class NotFound(BrokerError):
    code = "not_found"
    status = 404


class PolicySetRefused(BrokerError):
    """A live reload refused the policy directory; the old set keeps serving. ``problems`` names each
    problem as ``nhi-broker policy lint`` does (file, line, what is wrong)."""

    code = "invalid_policy"
    status = 422

    def __init__(self, problems: list[str], serving: str) -> None:
        super().__init__(f"policy set refused, still serving {serving}: " + "; ".join(problems))
        self.problems = problems
        self.serving = serving

    def to_json(self) -> dict[str, str]:
        return {**super().to_json(), "problems": self.problems, "serving": self.serving}  # type: ignore[dict-item]


class TemporarilyUnavailable(BrokerError):
    code = "temporarily_unavailable"
    status = 503


class LedgerUnavailable(TemporarilyUnavailable):
    """The ledger could not make an entry durable; nothing was issued."""


class StoreUnavailable(TemporarilyUnavailable):
    """The shared state store could not be reached; the broker fails closed."""


class PolicyLoadError(Exception):
    """A policy set was refused at load time. ``problems`` lists every bad line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("policy set refused:\n  " + "\n  ".join(problems))
        self.problems = problems


class VerificationError(Exception):
    """Offline verification failed (Merkle proof, checkpoint signature, ledger entry)."""


class ConfigError(Exception):
    """The configuration was refused."""
