"""Human approval of intents a policy marks for ``review`` (OpenID CIBA poll mode at the token endpoint).

- :class:`ApprovalDesk` holds a reviewed intent as a pending request in the shared state store,
  records each approver's decision (and expiry) as an ``approval`` ledger entry, and releases an
  approved request once to its own workload's poll (:meth:`ApprovalDesk.claim` -> :class:`Approval`).
- :class:`WebhookNotifier` tells approvers about new requests (signed, in the background).
- :mod:`broker.approvals.errors`: the CIBA answers (``authorization_pending``, ``slow_down``,
  ``expired_token``, ``access_denied``).

See docs/approvals.md.
"""

from broker.approvals.desk import Approval, ApprovalDesk, PendingApproval, is_owner
from broker.approvals.errors import AlreadyDecided, ApprovalDenied, AuthorizationPending, ExpiredToken, SlowDown
from broker.approvals.settings import ApprovalSettings
from broker.approvals.webhook import WebhookNotifier, sign, verify_signature

__all__ = [
    "AlreadyDecided",
    "Approval",
    "ApprovalDenied",
    "ApprovalDesk",
    "ApprovalSettings",
    "AuthorizationPending",
    "ExpiredToken",
    "PendingApproval",
    "SlowDown",
    "WebhookNotifier",
    "is_owner",
    "sign",
    "verify_signature",
]
