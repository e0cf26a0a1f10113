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
        'broker  issued: sub=c-42 act={"sub": "spiffe://example.org/ns/support/sa/support-assistant"}',
        "DENIED 403 access_denied by rule refund-other-customer: the user is verified as c-42",
        '"act": {"sub": "spiffe://example.org/ns/support/sa/support-assistant"}}',
        "400 invalid_target: context.amount must be a number no greater than the parent's",
        "demo OK",
    ]:
        assert line in out, f"missing {line!r} in:\n{out}"
    assert "Traceback" not in result.stderr
