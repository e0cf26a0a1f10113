"""The web console served by the broker at ``/console``: approvers decide intents held for review,
auditors search the ledger, open an entry with its attribution and inclusion proof, and see whether
the latest signed checkpoint verified. Server-rendered HTML, no script; see docs/approvals.md.
"""

from broker.console.routes import router

__all__ = ["router"]
