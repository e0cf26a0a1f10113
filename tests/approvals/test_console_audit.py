"""The auditors' and approvers' console pages in process: validated filters, every search criterion,
the cause of every denial, revocation and suspension summaries, the downloaded entry proof (verified
offline by ``audit prove --entry-proof``), and what an approver sees beside a held request.

A real broker (SQLite ledger and state), with a Vault nobody listens on: its outage is a real one.
The browser side (both widths, screenshots) is test_console_day_two.py.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from broker.api.app import create_app
from broker.audit import AuditFailure, prove_attribution
from broker.audit.entry_proof import EntryProofSource
from broker.cli.main import main as nhi_main
from broker.clock import FixedClock
from broker.config import Settings
from broker.console.ledger_view import SearchFilter, SearchProblems
from broker.operators import hash_secret
from tests.approvals.harness import ADA, APRIL, AUDREY, OPERATORS, Harness, bearer, refund
from tests.approvals.test_console_pages import csrf_of, sign_in
from tests.helpers import POLICIES, TRIAGE, exchange_form, free_port, intent

DB_CREDS = "urn:nhi-broker:token-type:vault-db-creds"
RS_SECRET = "payments-api-client-secret-0123456789"


@dataclass
class Scenario:
    """A broker whose ledger holds one entry of every interesting kind, and their indices."""

    h: Harness
    index: dict[str, int]
    jti: str
    held: str


def ledger_entries(h: Harness) -> list[dict[str, Any]]:
    runtime = h.client.app.state.runtime  # type: ignore[attr-defined]
    size = runtime.ledger.size()
    return [json.loads(leaf) for leaf in runtime.ledger.entries(0, size)]


def last_index(h: Harness) -> int:
    """The newest entry's index, from the signed checkpoint (in process or against a live broker)."""
    return int(h.client.get("/v1/ledger/checkpoint").text.split("\n")[1]) - 1


def make_settings(tmp_path: Path) -> Settings:
    secret_id = tmp_path / "secret-id"
    secret_id.write_text("not-a-real-secret-id")
    return Settings(
        data_dir=tmp_path / "data", policies_dir=POLICIES, operators=OPERATORS, approvals={"poll_interval": 1},
        vault={"addr": f"http://127.0.0.1:{free_port()}", "approle_role_id": "nobody",
               "approle_secret_id_file": str(secret_id), "timeout": 1.0},
        introspection_clients=[{"client_id": "payments-api", "secret_sha256": hash_secret(RS_SECRET),
                                "audiences": ["payments-api"]}],
    )


def build_scenario(h: Harness) -> Scenario:
    """Issuance, a held request, a default deny, a deny rule, a Vault outage, revocations, a suspension."""
    index: dict[str, int] = {}
    r = h.exchange(refund(20))  # refund-small-eur: 20 of the conversation's 200 EUR a day
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    jti = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))["jti"]
    index["issuance"] = last_index(h)
    held = h.hold(120)
    r = h.exchange(refund(600))
    assert r.json()["error"] == "access_denied", r.text
    index["default_deny"] = last_index(h)
    r = h.client.post("/v1/token", data=exchange_form(h.identity(TRIAGE), "tickets-api", refund(10)))
    assert r.json()["error"] == "access_denied", r.text
    index["deny_rule"] = last_index(h)
    orders = intent("orders.query", "customers/c-42/orders", customer="c-42", conversation="conv-7")
    r = h.client.post("/v1/token", data=exchange_form(h.identity(), "orders-db", orders,
                                                      requested_token_type=DB_CREDS))
    assert (r.status_code, r.json()["error"]) == (503, "temporarily_unavailable"), r.text
    index["vault_outage"] = last_index(h)
    r = h.client.post("/v1/revoke", data={"token": token}, auth=("payments-api", RS_SECRET))
    assert r.status_code == 200, r.text
    index["revoke_token"] = last_index(h)
    r = h.client.post("/v1/admin/revocations", headers=bearer(ADA),
                      json={"scope": "conversation", "value": "conv-7", "reason": "customer reported fraud"})
    assert r.status_code == 200, r.text
    index["revoke_conversation"] = last_index(h)
    r = h.client.post("/v1/admin/workloads/ticket-triage/suspend", headers=bearer(ADA),
                      json={"reason": "prompt injection suspected"})
    assert r.status_code == 200, r.text
    index["suspend"] = last_index(h)
    r = h.client.post("/v1/token", data=exchange_form(h.identity(TRIAGE), "tickets-api",
                                                      intent("tickets.create", "queues/general", priority="low")))
    assert r.json()["error"] == "workload_suspended", r.text
    index["suspended_denial"] = last_index(h)
    return Scenario(h, index, jti, held)


@pytest.fixture
def scenario(tmp_path: Path) -> Iterator[Scenario]:
    settings = make_settings(tmp_path)
    clock = FixedClock(time.time())
    with TestClient(create_app(settings, clock=clock), raise_server_exceptions=False) as client:
        yield build_scenario(Harness(client, settings, clock))


# -- filters -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "field", "says"),
    [
        ({"since": "yesterday"}, "since", "is not a UTC date or time"),
        ({"since": "2026-02-30"}, "since", "is not a real date"),
        ({"until": "2026-13-01T10:00"}, "until", "is not a real date"),
        ({"since": "2026-11-24", "until": "2026-11-23"}, "until", "is before since"),
        ({"kind": "issuanse"}, "kind", "is not an entry kind"),
        ({"kind": "denials"}, "kind", "is not an entry kind"),
        ({"decision": "denied"}, "decision", "is not a decision"),
        ({"error": "Vault down"}, "error", "is not an error code"),
        ({"rule": "refund small"}, "rule", "is not a rule id"),
        ({"leaf_hash": "xyz"}, "leaf_hash", "is not 8 to 64 hex digits"),
        ({"leaf_hash": "abc"}, "leaf_hash", "is not 8 to 64 hex digits"),
        ({"jti": "a b"}, "jti", "is not a token id"),
        ({"owner": "x" * 300}, "owner", "too long"),
        ({"customer": "c-42\x00"}, "customer", "control characters"),
        ({"before": "-1"}, "before", "is not an entry index"),
        ({"after": "1e9"}, "after", "is not an entry index"),
        ({"before": "\u00b2"}, "before", "is not an entry index"),  # a Unicode digit int() refuses
        ({"before": "9" * 20}, "before", "is not an entry index"),
        ({"before": "1", "after": "2"}, "before", "not both"),
    ],
)
def test_bad_filters_are_visible_errors_not_empty_results(
    scenario: Scenario, query: dict[str, str], field: str, says: str
) -> None:
    h = scenario.h
    sign_in(h, AUDREY)
    page = h.client.get("/console/ledger", params=query)
    assert page.status_code == 400
    assert 'id="results"' not in page.text  # no (empty) result table that could read as "nothing found"
    assert 'id="problem"' in page.text and "The search was not run" in page.text
    if field in SearchFilter.fields():
        error = re.search(rf'<small id="e-{field}" class="field-error">([^<]*)</small>', page.text)
        assert error is not None and says in error.group(1), page.text
        assert f'id="f-{field}"' in page.text and 'aria-invalid="true"' in page.text
    else:
        assert says in page.text


def test_time_filters_cover_what_they_name() -> None:
    f = SearchFilter.from_query({"since": "2026-11-23T10:00", "until": "2026-11-23"})
    inside = {"kind": "issuance", "time": "2026-11-23T23:59:59Z"}
    assert f.matches(inside, "00" * 32)
    assert not f.matches({"kind": "issuance", "time": "2026-11-23T09:59:59Z"}, "00" * 32)
    assert not f.matches({"kind": "issuance", "time": "2026-11-24T00:00:00Z"}, "00" * 32)
    with pytest.raises(SearchProblems) as raised:
        SearchFilter.from_query({"kind": "nope", "since": "soon"})
    assert set(raised.value.fields) == {"kind", "since"}


def search(h: Harness, **query: str) -> list[int]:
    page = h.client.get("/console/ledger", params=query)
    assert page.status_code == 200, page.text
    return [int(i) for i in re.findall(r'class="entry-link">(\d+)</a>', page.text)]


def test_every_search_criterion_finds_its_entries(scenario: Scenario) -> None:
    h, index = scenario.h, scenario.index
    sign_in(h, AUDREY)
    entries = ledger_entries(h)
    issuance_hash = re.search(r'id="leaf-hash">([0-9a-f]{64})<', h.client.get(
        f"/console/ledger/{index['issuance']}").text)
    assert issuance_hash is not None
    cases: list[tuple[dict[str, str], set[int]]] = [
        ({"resource": "customers/c-42/orders"}, {i for i, e in enumerate(entries)
                                                 if "customers/c-42/orders" in (e.get("intent") or {}).get(
                                                     "resource", "")}),
        ({"customer": "c-42"}, {i for i, e in enumerate(entries)
                                if ((e.get("intent") or {}).get("context") or {}).get("customer") == "c-42"}),
        ({"conversation": "conv-7", "kind": "revocation"}, {index["revoke_conversation"]}),
        ({"rule": "triage-no-payments"}, {index["deny_rule"]}),
        ({"rule": "orders-db-read", "decision": "deny"}, {index["vault_outage"]}),
        ({"error": "temporarily_unavailable"}, {index["vault_outage"]}),
        ({"error": "workload_suspended"}, {index["suspended_denial"]}),
        ({"decision": "allow"}, {index["issuance"]}),
        ({"jti": scenario.jti}, {index["issuance"], index["revoke_token"]}),
        ({"leaf_hash": issuance_hash.group(1)}, {index["issuance"]}),
        ({"leaf_hash": issuance_hash.group(1)[:10]}, {index["issuance"]}),
        ({"workload": "ticket-triage", "kind": "suspension"}, {index["suspend"]}),
        ({"kind": "denial", "owner": "dana"}, {index["default_deny"], index["vault_outage"]}),
        ({"since": "2000-01-01", "until": "2000-01-02"}, set()),
    ]
    for query, expected in cases:
        assert set(search(h, **query)) == expected, query


def test_previous_and_next_pages(scenario: Scenario, monkeypatch: pytest.MonkeyPatch) -> None:
    import broker.console.ledger_view as view

    monkeypatch.setattr(view, "PAGE_SIZE", 3)
    h = scenario.h
    sign_in(h, AUDREY)
    size = last_index(h) + 1
    first = h.client.get("/console/ledger").text
    shown = [int(i) for i in re.findall(r'class="entry-link">(\d+)</a>', first)]
    assert shown == [size - 1, size - 2, size - 3]
    assert 'id="newer"' not in first
    older = re.search(r'href="/console/ledger\?([^"]*)" id="older"', first)
    assert older is not None and older.group(1) == f"before={size - 3}"
    second = h.client.get(f"/console/ledger?{older.group(1)}").text
    assert [int(i) for i in re.findall(r'class="entry-link">(\d+)</a>', second)] == [size - 4, size - 5, size - 6]
    newer = re.search(r'href="/console/ledger\?([^"]*)" id="newer"', second)
    assert newer is not None
    back = h.client.get(f"/console/ledger?{newer.group(1).replace('&amp;', '&')}").text
    assert [int(i) for i in re.findall(r'class="entry-link">(\d+)</a>', back)] == shown
    # Paging keeps the criteria.
    filtered = h.client.get("/console/ledger", params={"kind": "denial"}).text
    older = re.search(r'href="/console/ledger\?([^"]*)" id="older"', filtered)
    assert older is not None and "kind=denial" in older.group(1)


def test_the_cause_of_every_denial(scenario: Scenario) -> None:
    h, index = scenario.h, scenario.index
    sign_in(h, AUDREY)
    expected = {
        "vault_outage": "Backend unavailable, failed closed (rule orders-db-read allowed it; nothing was issued)",
        "default_deny": "No rule allows it (default deny)",
        "deny_rule": "Denied by rule triage-no-payments",
        "suspended_denial": "Workload suspended by an operator (kill switch)",
    }
    for name, label in expected.items():
        page = h.client.get(f"/console/ledger/{index[name]}").text
        cause = re.search(r'<strong class="cause-label">([^<]*)</strong>', page)
        assert cause is not None and cause.group(1) == label, (name, page)
    outage = h.client.get(f"/console/ledger/{index['vault_outage']}").text
    assert "Vault is unreachable" in outage and "Denied by rule" not in outage
    # The attribution printout (as `audit prove` prints it) names the cause too, not "deny by rule".
    assert "deny by rule" not in outage
    assert "decision         deny: Backend unavailable, failed closed (rule orders-db-read allowed it" in outage
    rule_deny = h.client.get(f"/console/ledger/{index['deny_rule']}").text
    assert "decision         deny: Denied by rule triage-no-payments (access_denied" in rule_deny


def test_revocation_and_suspension_summaries_link_to_their_subjects(scenario: Scenario) -> None:
    h, index = scenario.h, scenario.index
    sign_in(h, AUDREY)
    page = h.client.get("/console/ledger", params={"kind": "revocation"}).text
    token = f'Token <a href="/console/ledger?jti={scenario.jti}" class="find">{scenario.jti}</a> of workload ' \
            '<a href="/console/ledger?workload=support-assistant" class="find">support-assistant</a> revoked by ' \
            "resource server payments-api"
    assert token in page
    conversation = ('Every token of conversation <a href="/console/ledger?conversation=conv-7" class="find">conv-7</a>'
                    " revoked by operator ada (admin): “customer reported fraud”")
    assert conversation in page
    page = h.client.get(f"/console/ledger/{index['suspend']}").text
    assert ('Workload <a href="/console/ledger?workload=ticket-triage" class="find">ticket-triage</a> '
            "<strong>suspended</strong> by operator ada (admin): “prompt injection suspected”") in page


def test_downloaded_entry_proof_verifies_offline(scenario: Scenario, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    h, index = scenario.h, scenario.index
    sign_in(h, AUDREY)
    key = h.client.app.state.runtime.ledger_verifier_key  # type: ignore[attr-defined]
    r = h.client.get(f"/console/ledger/{index['vault_outage']}/proof.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.headers["content-disposition"] == (
        f'attachment; filename="nhi-broker-entry-{index["vault_outage"]}.proof.json"')
    document = r.json()
    assert document["entry"]["decision"]["error"] == "temporarily_unavailable"
    path = tmp_path / "entry.proof.json"
    path.write_text(r.text)
    capsys.readouterr()
    assert nhi_main(["audit", "prove", "--entry-proof", str(path), "--verifier-key", key]) == 0
    out = capsys.readouterr().out
    assert f"entry            {index['vault_outage']} (denial)" in out
    assert "decision         deny: Backend unavailable, failed closed" in out
    # Tampered: the leaf, the path or the checkpoint; and another key.
    other = "other.example/ledger+00000000+" + base64.b64encode(b"\x01" * 32).decode()
    leaf = json.loads(base64.b64decode(document["leaf"]))
    leaf["decision"]["error"] = "access_denied"
    tampered_leaf = {**document, "leaf": base64.b64encode(json.dumps(leaf).encode()).decode()}
    tampered_path = {**document, "audit_path": ["0" * 64, *document["audit_path"][1:]]}
    tampered_note = {**document, "checkpoint": document["checkpoint"].replace("\n" + str(document["tree_size"]) + "\n",
                                                                              f"\n{document['tree_size'] + 1}\n")}
    for bad, says in ((tampered_leaf, "no entry with leaf hash"), (tampered_path, "inclusion proof does not verify"),
                      (tampered_note, "does not verify")):
        with pytest.raises(AuditFailure, match=says):
            source = EntryProofSource.from_document(bad)
            prove_attribution(source, key, leaf_hash_hex=document["leaf_hash"])
    with pytest.raises(AuditFailure, match="does not verify"):
        prove_attribution(EntryProofSource.from_document(document), other, leaf_hash_hex=document["leaf_hash"])
    bad_file = tmp_path / "tampered.proof.json"
    bad_file.write_text(json.dumps(tampered_path))
    assert nhi_main(["audit", "prove", "--entry-proof", str(bad_file), "--verifier-key", key]) == 1
    assert "does NOT verify" in capsys.readouterr().err
    assert h.client.get("/console/ledger/999/proof.json").status_code == 404


def test_the_banner_names_the_verifier_key(scenario: Scenario) -> None:
    h = scenario.h
    sign_in(h, AUDREY)
    key = h.client.app.state.runtime.ledger_verifier_key  # type: ignore[attr-defined]
    page = h.client.get("/console/ledger").text
    assert "<strong>Verified</strong>" in page and f'<code id="verifier-key">{key}</code>' in page


def test_approver_sees_why_history_and_budget(scenario: Scenario) -> None:
    h, index = scenario.h, scenario.index
    sign_in(h, APRIL)
    page = h.client.get(f"/console/approvals/{scenario.held}").text
    assert '<code id="rule-id">refund-review-eur</code>' in page and "policy.csv:" in page
    assert "amount &gt; 50 &amp;&amp; amount &lt; 500 &amp;&amp; currency == &#39;EUR&#39;" in page
    assert "✓ <code>amount &gt; 50  (amount = 120)</code>" in page
    # Recent decisions of this workload for customer c-42 / conversation conv-7, newest first.
    history = re.findall(r'<li><a href="/console/ledger/(\d+)">', page)
    assert [int(i) for i in history] == [index["vault_outage"], index["default_deny"], index["issuance"]]
    assert "No rule allows it (default deny)" in page and "Backend unavailable, failed closed" in page
    # The small-refund budget: 20 of 200 EUR used in conversation conv-7 today.
    assert ("<strong>20.00 EUR</strong> of 200.00 EUR used per conversation <code>conv-7</code> this day "
            "under rule <code>refund-small-eur</code> (180.00 EUR left") in page
    assert "this request: 120 EUR" in page


def test_budget_use_reads_without_charging(scenario: Scenario) -> None:
    h = scenario.h
    sign_in(h, APRIL)
    for _ in range(3):
        assert "<strong>20.00 EUR</strong> of 200.00 EUR" in h.client.get(f"/console/approvals/{scenario.held}").text
    for amount in (50, 50, 50):  # 20 + 150 = 170 of 200: still admitted, so the reads charged nothing
        assert h.exchange(refund(amount)).status_code == 200
    assert "<strong>170.00 EUR</strong> of 200.00 EUR" in h.client.get(f"/console/approvals/{scenario.held}").text
    assert h.exchange(refund(40)).json()["error"] == "budget_exceeded"


def test_console_forms_still_need_their_tokens(scenario: Scenario) -> None:
    h = scenario.h
    sign_in(h, APRIL)
    page = h.client.get(f"/console/approvals/{scenario.held}")
    assert csrf_of(page.text)
    r = h.client.post(f"/console/approvals/{scenario.held}", data={"decision": "approve", "reason": "x",
                                                                   "csrf": "forged"})
    assert r.status_code == 403
    assert "default-src 'none'" in page.headers["content-security-policy"]


def _denial(error: str, rule: str | None, reason: str) -> dict[str, Any]:
    return {"kind": "denial", "decision": {"effect": "deny", "error": error, "rule": rule, "reason": reason}}


@pytest.mark.parametrize(
    ("entry", "label"),
    [
        (_denial("temporarily_unavailable", "orders-db-read", "Vault is sealed (x); nothing was issued"),
         "Backend unavailable, failed closed (rule orders-db-read allowed it; nothing was issued)"),
        (_denial("temporarily_unavailable", None, "the state store is unavailable"),
         "Backend unavailable, failed closed"),
        (_denial("access_denied", "orders-db-read", "Vault refused database role 'r' (permission denied)"),
         "Vault refused the credential (rule orders-db-read allowed it)"),
        (_denial("access_denied", "triage-no-payments", "denied by rule triage-no-payments"),
         "Denied by rule triage-no-payments"),
        (_denial("access_denied", None, "no rule allows payments.refund on x"), "No rule allows it (default deny)"),
        (_denial("access_denied", None, "workload spiffe://a/b does not match its registry entry"),
         "Refused before any rule applied"),
        (_denial("access_denied", "refund-small-eur", "rule 'refund-small-eur' budgets EUR only"),
         "Refused under rule refund-small-eur"),
        (_denial("rate_limit_exceeded", "tickets-create", "rule allows 120 requests per 60 s"),
         "Rate limit of rule tickets-create exceeded"),
        (_denial("budget_exceeded", "refund-small-eur", "at most 200.00 EUR"),
         "Budget of rule refund-small-eur exceeded"),
        (_denial("workload_suspended", "tickets-create", "suspended"),
         "Workload suspended by an operator (kill switch)"),
        (_denial("invalid_dpop_proof", "orders-cancel-dpop", "a DPoP proof is required"),
         "Proof of possession (DPoP) missing or wrong (rule orders-cancel-dpop)"),
        (_denial("invalid_target", None, "audience 'x' is not registered"),
         "Audience or delegation not allowed for this workload"),
        (_denial("something_new", None, "?"), "Refused (something_new)"),
        ({"kind": "approval", "approval": {"outcome": "denied", "approver": {"name": "april"}, "reason": "no"}},
         "Denied by approver april"),
        ({"kind": "approval", "approval": {"outcome": "expired", "approver": None, "group": "g"}},
         "Expired: nobody decided in time"),
    ],
)
def test_denial_cause_names_what_refused(entry: dict[str, Any], label: str) -> None:
    from broker.audit.causes import denial_cause

    cause = denial_cause(entry)
    assert cause is not None and cause["label"] == label


def test_no_cause_for_what_was_not_refused() -> None:
    from broker.audit.causes import denial_cause

    assert denial_cause({"kind": "issuance", "decision": {"effect": "allow", "rule": "r"}}) is None
    assert denial_cause({"kind": "approval", "approval": {"outcome": "approved"}}) is None
    assert denial_cause({"kind": "suspension"}) is None
