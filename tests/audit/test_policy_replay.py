"""`nhi-broker policy replay`: a candidate policy set re-decides every request a verified ledger recorded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from broker.audit import BundleLedgerSource
from broker.policy import load_policies
from broker.policy.replay import ReplayReport, replay_entries, replay_ledger
from tests.audit.conftest import Ledger
from tests.audit.test_audit_cli import nhi
from tests.helpers import POLICIES

SMALL = ('"amount > 0 && amount <= 50 && currency == \'EUR\' && customer == user.sub", allow, refund-small-eur',
         '"amount > 0 && amount <= 10 && currency == \'EUR\' && customer == user.sub", allow, refund-small-eur')
REVIEW = ('"amount > 50 && amount < 500 && currency == \'EUR\' && customer == user.sub", review, refund-review-eur',
          '"amount > 10 && amount < 500 && currency == \'EUR\' && customer == user.sub", review, refund-review-eur')
# The recorded refunds are delegated (ledger member `user`): a candidate that no longer checks the
# customer against the verified user must not change them, one that needs another user must deny them.


def _candidate(tmp_path: Path, *edits: tuple[str, str]) -> Path:
    target = tmp_path / "candidate"
    shutil.copytree(POLICIES, target)
    text = (target / "policy.csv").read_text()
    for old, new in edits:
        assert old in text
        text = text.replace(old, new)
    (target / "policy.csv").write_text(text)
    return target


def _bundle(ledger: Ledger, tmp_path: Path) -> Path:
    out = tmp_path / "ledger.bundle"
    r = nhi("ledger", "export", str(out), "--data-dir", str(ledger.data_dir))
    assert r.returncode == 0, r.stderr
    return out


def test_replay_reports_review_added_per_rule_with_examples(ledger_copy: Ledger, tmp_path: Path) -> None:
    bundle = _bundle(ledger_copy, tmp_path)
    candidate = _candidate(tmp_path, SMALL, REVIEW)
    report = replay_ledger(BundleLedgerSource(bundle), ledger_copy.verifier_key, load_policies(candidate))
    issued = {i.index for i in ledger_copy.issued}
    # The six 20 EUR refunds were allowed; under the candidate they would wait for an approver.
    assert report.transitions == {"allow → review": 6}
    rule = report.by_rule["refund-review-eur"]
    assert rule.counts == {"allow → review": 6}
    assert {c.index for c in rule.examples["allow → review"]} <= issued
    assert report.not_replayable == {}
    assert report.replayed == 6 + 2 and report.unchanged == 2  # the two denials stay denials

    args = ["policy", "replay", "--ledger", str(bundle), "--verifier-key", ledger_copy.verifier_key,
            "--policies", str(candidate)]
    over = nhi(*args, "--max-changes", "5")
    assert over.returncode == 5, over.stderr
    assert "rule refund-review-eur: allow → review 6" in over.stdout
    assert "more than --max-changes 5" in over.stderr
    within = nhi(*args, "--max-changes", "6", "--json")
    assert within.returncode == 0, within.stderr
    assert json.loads(within.stdout)["changed"] == 6


def test_replay_of_the_recorded_policies_changes_nothing(ledger_copy: Ledger, tmp_path: Path) -> None:
    bundle = _bundle(ledger_copy, tmp_path)
    r = nhi("policy", "replay", "--ledger", str(bundle), "--verifier-key", ledger_copy.verifier_key,
            "--policies", str(POLICIES), "--max-changes", "0")
    assert r.returncode == 0, r.stderr
    assert "unchanged 8, changed 0" in r.stdout


def test_replay_decides_with_the_recorded_verified_user(ledger_copy: Ledger, tmp_path: Path) -> None:
    bundle = _bundle(ledger_copy, tmp_path)
    source = BundleLedgerSource(bundle)
    # The six refunds were for the verified user c-42 of the trial user issuer: a rule that wants
    # another issuer's users no longer allows them ...
    other_issuer = (SMALL[0], SMALL[0].replace("customer == user.sub", "user.iss == 'https://login.example.org'"))
    report = replay_ledger(source, ledger_copy.verifier_key, load_policies(_candidate(tmp_path / "a", other_issuer)))
    assert report.transitions == {"allow → deny": 6}
    # ... and one that asks for the same user, spelled differently, changes nothing.
    same_user = (SMALL[0], SMALL[0].replace("customer == user.sub", "user.sub == 'c-42' && user.delegated == true"))
    report = replay_ledger(BundleLedgerSource(bundle), ledger_copy.verifier_key,
                           load_policies(_candidate(tmp_path / "b", same_user)))
    assert report.transitions == {} and report.replayed == 8


def test_replay_refuses_an_unverified_ledger_and_bad_input(ledger_copy: Ledger, tmp_path: Path) -> None:
    import base64

    bundle = _bundle(ledger_copy, tmp_path)
    lines = bundle.read_bytes().split(b"\n")
    idx, recorded, encoded = lines[1 + 6].split(b" ")
    lines[1 + 6] = b" ".join([idx, recorded, base64.b64encode(base64.b64decode(encoded).replace(b"20", b"99", 1))])
    bundle.write_bytes(b"\n".join(lines))
    args = ["policy", "replay", "--ledger", str(bundle), "--policies", str(POLICIES)]
    for extra, code, said in [
        (["--verifier-key", ledger_copy.verifier_key], 1, "ledger does NOT verify: index 6"),
        (["--verifier-key", "not-a-key"], 2, "malformed verifier key"),
        (["--verifier-key", ledger_copy.verifier_key, "--since", "yesterday"], 2, "--since must be"),
    ]:
        r = nhi(*args, *extra)
        assert r.returncode == code and said in r.stderr, (extra, r.returncode, r.stderr)


def _refund(index: int, customer: str, user_sub: str | None, kind: str, rule: str | None) -> dict[str, object]:
    """A recorded refund request as the broker writes it (delegated when ``user_sub`` is given)."""
    entry: dict[str, object] = {
        "v": 1, "kind": kind, "time": f"2026-11-01T00:00:{index:02d}Z", "request_id": f"req-{index}",
        "audience": "payments-api",
        "workload": {"spiffe_id": "spiffe://example.org/ns/support/sa/support-assistant", "attestation": "kubernetes",
                     "issuer": "https://k8s.example.org", "evidence_digest": "sha256:" + f"{index:064x}",
                     "name": "support-assistant"},
        "intent": {"type": "intent", "action": "payments.refund", "resource": f"customers/{customer}/orders/o-1",
                   "context": {"customer": customer, "amount": 20, "currency": "EUR"}},
        "decision": {"effect": "allow" if kind == "issuance" else "deny", "rule": rule, "policy_version": "sha256:x",
                     **({} if kind == "issuance" else {"error": "access_denied"})},
    }
    if user_sub is not None:
        entry["user"] = {"iss": "https://login.example.org", "sub": user_sub}
    return entry


RULE_REQUIRES_USER = ('p, refund-agent, payments-api, payments.refund, **, "user.delegated == false", deny, '
                      'refund-requires-verified-user, -, -\n')
DELEGATED = [
    _refund(0, "c-42", "c-42", "issuance", "refund-small-eur"),        # the verified customer's own refund
    _refund(1, "c-42", "c-99", "denial", "refund-other-customer"),     # another customer's refund: denied
    _refund(2, "c-42", None, "issuance", "refund-small-eur"),          # recorded without a user
]


def _replay(policies_dir: Path, entries: list[dict[str, object]]) -> ReplayReport:
    report = ReplayReport(candidate_version="candidate")
    return replay_entries(load_policies(policies_dir), ((i, bytes(32), e) for i, e in enumerate(entries)), report)


def test_replay_decides_delegated_requests_with_the_recorded_user(tmp_path: Path) -> None:
    # The sample policy requires the verified customer: the delegated requests replay unchanged (the
    # user terms come back from the entry), the refund recorded without a user would now be denied.
    report = _replay(POLICIES, DELEGATED)
    assert (report.replayed, report.unchanged, report.changed) == (3, 2, 1), report.lines()
    assert report.transitions == {"allow → deny": 1}, report.lines()
    (change,) = report.by_rule["refund-requires-verified-user"].examples["allow → deny"]
    assert change.index == 2
    # A candidate without that requirement changes nothing: entry 1 is still another customer's refund
    # for the recorded user c-99 (refund-other-customer), entry 2 a plain refund allowed again.
    candidate = _candidate(
        tmp_path,
        (RULE_REQUIRES_USER, ""),
        ("\"amount > 0 && amount <= 50 && currency == 'EUR' && customer == user.sub\", allow, refund-small-eur",
         "\"amount > 0 && amount <= 50 && currency == 'EUR'\", allow, refund-small-eur"),
    )
    report = _replay(candidate, DELEGATED)
    assert (report.replayed, report.unchanged, report.changed) == (3, 3, 0), report.lines()


def test_replay_counts_delegated_requests_under_unrecorded_user_claims(tmp_path: Path) -> None:
    # Entries keep the user's issuer and subject, not its mapped claims: a rule reading user.tenant
    # cannot be re-decided for a delegated request, and the report says so instead of guessing.
    candidate = _candidate(tmp_path, ("&& customer == user.sub\", allow, refund-small-eur",
                                      "&& customer == user.sub && user.tenant == 'eu'\", allow, refund-small-eur"))
    report = _replay(candidate, DELEGATED)
    assert report.not_replayable == {"delegated request under rules naming user.tenant": 2}, report.lines()
    # The refund recorded without a user is replayed: denied for want of a verified user.
    assert report.replayed == 1 and report.transitions == {"allow → deny": 1}
    # Other actions' rules do not read user.tenant: their delegated requests replay as before.
    read = {"type": "intent", "action": "orders.read", "resource": "customers/c-42/orders/o-1",
            "context": {"customer": "c-42"}}
    other = dict(DELEGATED[0], intent=read,
                 audience="orders-api", decision={"effect": "allow", "rule": "orders-read-own-customer",
                                                  "policy_version": "sha256:x"})
    report = _replay(candidate, [other])
    assert (report.replayed, report.unchanged, report.not_replayable) == (1, 1, {}), report.lines()
