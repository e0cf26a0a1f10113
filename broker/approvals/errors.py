"""Errors of the approval flow: the OpenID CIBA token-endpoint answers and operator conflicts.

    BrokerError
    ├── AuthorizationPending     authorization_pending   400   (CIBA §11: not decided yet; poll again)
    ├── SlowDown                 slow_down               400   (polled faster than ``interval``; +5 s)
    ├── ExpiredToken             expired_token           400   (the request expired undecided)
    ├── AccessDenied
    │   └── ApprovalDenied       access_denied           403   (an approver denied it)
    └── AlreadyDecided           already_decided         409   (console/admin: decided or expired)

``access_denied`` keeps the broker's 403 (as every other ``access_denied`` of the token endpoint).
"""

from __future__ import annotations

from broker.errors import AccessDenied, BrokerError

__all__ = ["AlreadyDecided", "ApprovalDenied", "AuthorizationPending", "ExpiredToken", "SlowDown"]


class AuthorizationPending(BrokerError):
    """Nobody has decided the request yet (or the decision is still being recorded)."""

    code = "authorization_pending"
    status = 400


class SlowDown(BrokerError):
    """The client polled before ``interval`` passed; the interval grew by 5 seconds."""

    code = "slow_down"
    status = 400


class ExpiredToken(BrokerError):
    """The ``auth_req_id`` expired before it was approved (or before its token was collected)."""

    code = "expired_token"
    status = 400


class ApprovalDenied(AccessDenied):
    """An approver denied the held intent: nothing will ever be issued for it."""


class AlreadyDecided(BrokerError):
    """The request is no longer pending (approved, denied, expired, or decided by this approver)."""

    code = "already_decided"
    status = 409
