"""Why a ledger entry records a refusal, in words an auditor can act on.

A ``denial`` entry's ``decision.rule`` is the rule that *allowed* the intent when something after
the policy refused it (Vault or the state store down, a rate or budget, the kill switch, a missing
DPoP proof): reading every denial as "deny by rule R" would blame the policy for an outage.
:func:`denial_cause` names the check that refused, from the entry's error code and reason.
"""

from __future__ import annotations

from typing import Any

__all__ = ["denial_cause"]


def denial_cause(entry: dict[str, Any]) -> dict[str, str] | None:
    """Why an entry records a refusal: ``{label, detail, rule}`` (``None`` if it is no refusal).

    The label says which check refused, so a backend outage never reads as a policy decision: a
    denial entry names the rule that *allowed* the intent when Vault, the store or a limit refused it.
    """
    kind = entry.get("kind")
    if kind == "approval":
        approval = entry.get("approval") or {}
        outcome = approval.get("outcome")
        approver = (approval.get("approver") or {}).get("name", "")
        if outcome == "denied":
            return {"label": f"Denied by approver {approver}", "detail": str(approval.get("reason") or ""),
                    "rule": ""}
        if outcome == "expired":
            return {"label": "Expired: nobody decided in time", "detail": f"group {approval.get('group')}",
                    "rule": ""}
        return None
    if kind != "denial":
        return None
    decision = entry.get("decision") or {}
    error, rule, reason = str(decision.get("error", "")), decision.get("rule"), str(decision.get("reason", ""))
    rule_text = str(rule or "")
    if error == "temporarily_unavailable":
        allowed = f" (rule {rule} allowed it; nothing was issued)" if rule else ""
        label = "Backend unavailable, failed closed" + allowed
    elif error == "workload_suspended":
        label = "Workload suspended by an operator (kill switch)"
    elif error == "rate_limit_exceeded":
        label = f"Rate limit of rule {rule} exceeded"
    elif error == "budget_exceeded":
        label = f"Budget of rule {rule} exceeded"
    elif error in ("invalid_dpop_proof", "use_dpop_nonce"):
        label = "Proof of possession (DPoP) missing or wrong" + (f" (rule {rule})" if rule else "")
    elif error == "invalid_target":
        label = "Audience or delegation not allowed for this workload"
    elif error == "invalid_grant":
        label = "Identity or delegation not accepted"
    elif error == "access_denied" and reason.startswith("Vault refused"):
        label = f"Vault refused the credential (rule {rule} allowed it)"
    elif error == "access_denied" and rule and reason == f"denied by rule {rule}":
        label = f"Denied by rule {rule}"
    elif error == "access_denied" and rule is None and reason.startswith("no rule allows"):
        label = "No rule allows it (default deny)"
    elif error == "access_denied" and rule is None:
        label = "Refused before any rule applied"
    elif error == "access_denied":
        label = f"Refused under rule {rule}"
    else:
        label = f"Refused ({error})"
    return {"label": label, "detail": reason, "rule": rule_text}
