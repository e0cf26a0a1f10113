"""scripts/demo.py runs from the repository in one command and shows every step it promises."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO


def test_demo_runs_and_shows_each_step() -> None:
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py")], capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for line in [
        "(a) refund 20 EUR",
        "issued a DPoP-bound task token",
        "200 REFUNDED 20 EUR on ord-1001",
        "by c-42 (owner Dana Reyes",  # the verified customer the refund is for
        "(b) refund 500 EUR",
        "broker  DENIED 403 access_denied",
        "403 insufficient_scope: context 'amount' differs from the grant",
        "(c) the 20 EUR token leaks",
        "401 invalid_dpop_proof: DPoP proof key is not the key the token is bound to",
        "(d) ledger proof of (a)",
        "kind=issuance rule=refund-small-eur",
        "to the signed root: VERIFIED",
        "(e) refund 120 EUR",
        "HELD for review by rule refund-review-eur",
        "(refund-approvers) APPROVED",
        "issued after approval by april",
        "orders  200 REFUNDED 120 EUR on ord-1001",
        "(f) act for the verified end user c-42",
        "DENIED 403 access_denied by rule refund-requires-verified-user",
        'broker  issued: sub=c-42 act={"sub": "spiffe://example.org/ns/support/sa/support-assistant"}',
        "DENIED 403 access_denied by rule refund-other-customer: the user is verified as c-42",
        '"act": {"sub": "spiffe://example.org/ns/support/sa/support-assistant"}}',
        "400 invalid_target: context.amount must be a number no greater than the parent's",
        "demo OK",
    ]:
        assert line in out, f"missing {line!r} in:\n{out}"
    assert "Traceback" not in result.stderr


def test_mcp_demo_tells_the_story_and_proves_it() -> None:
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "mcp_demo.py")], capture_output=True, text=True,
                            timeout=180, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for line in [
        "(0) an MCP client that brings no task token",
        "orders   HTTP 401, WWW-Authenticate: DPoP",
        "resource_metadata=",
        "refund_order  payments.refund on customers/{customer}/orders/{order} at payments-api",
        "(a) the user asks for 20 EUR back",
        "orders   REFUNDED 20 EUR on ord-1001",
        "(b) the model is talked into refunding",
        "broker   DENIED 403 access_denied: no rule allows payments.refund on customers/c-77/orders/ord-7001",
        "(c) a prompt injection rewrites the call",
        "REFUSED (MCP error -32051): refused before the tool ran: context 'amount' differs from the grant",
        "HELD for review by rule refund-review-eur",
        "(refund-approvers) APPROVED",
        "orders   REFUNDED 120 EUR on ord-1001",
        "(e) the ledger proves each step",
        "issuance  (a) 20 EUR refund",
        "denial    (b) other customer",
        "issuance  (c) the token the injection misused",
        "approval  (d) approval",
        "approved by april",
        "issuance  (d) 120 EUR refund",
        "orders book: 2 refunds made (20 EUR on ord-1001; 120 EUR on ord-1001); nothing else ran",
        "demo OK",
    ]:
        assert line in out, f"missing {line!r} in:\n{out}"
    assert out.count(": VERIFIED") == 5
    assert "Traceback" not in result.stderr
