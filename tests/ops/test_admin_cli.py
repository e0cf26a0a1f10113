"""``nhi-broker admin ...`` against a live broker: every admin action, its table and JSON output, its
ledger entry, and the exit codes scripts rely on (docs/operators.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.attest.dev import DevIssuer
from broker.clock import SystemClock
from broker.operators import hash_secret
from tests.helpers import SUPPORT, LiveBroker, delegated_form, dev_user, free_port, intent

NHI = str(Path(sys.executable).with_name("nhi-broker"))
ADMIN, APPROVER, AUDITOR = "admin-secret-0a1b2c3d4e5f", "approver-secret-0a1b2c3d4e5f", "auditor-secret-0a1b2c3d4e"
OPERATORS = [
    {"name": "alice", "role": "admin", "token_sha256": hash_secret(ADMIN)},
    {"name": "april", "role": "approver", "token_sha256": hash_secret(APPROVER), "groups": ["refund-approvers"]},
    {"name": "audrey", "role": "auditor", "token_sha256": hash_secret(AUDITOR)},
]


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveBroker]:
    live = LiveBroker(tmp_path_factory.mktemp("admin") / "data", env={"NHI_BROKER_OPERATORS": json.dumps(OPERATORS)})
    try:
        yield live
    finally:
        live.stop()


def admin(broker: LiveBroker | None, *args: str, token: str | None = ADMIN, url: str | None = None,
          fmt: str = "json") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NHI_BROKER_")}
    if url is not None or broker is not None:
        env["NHI_BROKER_URL"] = url or broker.url  # type: ignore[union-attr]
    if token is not None:
        env["NHI_BROKER_TOKEN"] = token
    return subprocess.run([NHI, "admin", *args, "--format", fmt], capture_output=True, text=True, env=env,
                          timeout=60)


def ok(out: subprocess.CompletedProcess[str]) -> Any:
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def entries(broker: LiveBroker) -> list[dict[str, Any]]:
    size = int(httpx.get(broker.url + "/v1/ledger/checkpoint").text.splitlines()[1])
    page = httpx.get(broker.url + "/v1/ledger/entries", params={"start": 0, "end": size}).json()
    return [e["entry"] for e in page["entries"]]


def exchange(broker: LiveBroker, amount: int, conversation: str) -> httpx.Response:
    identity = DevIssuer.load_or_create(broker.data_dir).mint(SUPPORT, "nhi-broker", ttl=120, clock=SystemClock())
    details = intent("payments.refund", "customers/c-42/orders/ord-1001", customer="c-42", amount=amount,
                     currency="EUR", conversation=conversation)
    # Delegated for the verified customer c-42: the sample refund rules need one.
    return httpx.post(broker.url + "/v1/token",
                      data=delegated_form(dev_user(broker.data_dir), identity, "payments-api", details))


def test_workloads_list_and_show(broker: LiveBroker) -> None:
    listing = ok(admin(broker, "workloads", "list"))
    names = [w["workload"] for w in listing["workloads"]]
    assert "support-assistant" in names
    support = next(w for w in listing["workloads"] if w["workload"] == "support-assistant")
    assert support["owner"] == "Dana Reyes <dana.reyes@example.com>"
    table = admin(broker, "workloads", "list", fmt="table")
    assert table.returncode == 0
    assert table.stdout.splitlines()[0].split() == ["WORKLOAD", "OWNER", "STATE", "SUSPENDED", "SINCE", "TOKENS",
                                                    "REVOKED", "BEFORE"]
    shown = ok(admin(broker, "workloads", "show", "support-assistant", token=AUDITOR))  # auditors may read
    assert shown["workload"] == "support-assistant" and shown["suspended"] is False


def test_suspend_and_resume_with_ledger_entries(broker: LiveBroker) -> None:
    suspended = ok(admin(broker, "workloads", "suspend", "ticket-triage", "--reason", "incident 42"))
    assert suspended["suspended"] is True and isinstance(suspended["receipt"]["index"], int)
    table = admin(broker, "workloads", "show", "ticket-triage", fmt="table")
    assert "SUSPENDED" in table.stdout and "ago)" in table.stdout  # human-readable time
    resumed = admin(broker, "workloads", "resume", "ticket-triage", "--reason", "fixed", fmt="table")
    assert resumed.returncode == 0
    assert "was suspended  yes" in resumed.stdout and "ledger entry" in resumed.stdout
    kinds = [(e["kind"], e.get("suspension", {}).get("state"), e.get("actor", {}).get("name"))
             for e in entries(broker) if e["kind"] == "suspension"]
    assert kinds[-2:] == [("suspension", "suspended", "alice"), ("suspension", "resumed", "alice")]


def test_revoke_by_scope(broker: LiveBroker) -> None:
    granted = exchange(broker, 20, "conv-revoke")
    assert granted.status_code == 200, granted.text
    out = ok(admin(broker, "revoke", "--conversation", "conv-revoke", "--reason", "customer complaint"))
    assert out["scope"] == "conversation" and out["value"] == "conv-revoke"
    last = [e for e in entries(broker) if e["kind"] == "revocation"][-1]
    assert last["revocation"] == {"scope": "conversation", "value": "conv-revoke", "reason": "customer complaint"}
    assert last["actor"]["name"] == "alice"
    text = admin(broker, "revoke", "--end-user", "c-42", "--reason", "gdpr", fmt="table")
    assert text.returncode == 0 and "scope" in text.stdout and "end_user" in text.stdout


def test_approvals_list_show_approve_deny(broker: LiveBroker) -> None:
    held = exchange(broker, 120, "conv-appr-1")
    assert held.status_code == 200 and "auth_req_id" in held.json(), held.text
    first = held.json()["auth_req_id"]
    second = exchange(broker, 130, "conv-appr-2").json()["auth_req_id"]

    listing = ok(admin(broker, "approvals", "list", token=APPROVER))
    pending = {r["auth_req_id"]: r for r in listing["requests"] if r["status"] == "pending"}
    assert {first, second} <= set(pending)
    assert pending[first]["intent"]["context"]["amount"] == 120
    table = admin(broker, "approvals", "list", token=APPROVER, fmt="table")
    assert first in table.stdout and "payments.refund" in table.stdout and "(in " in table.stdout

    shown = ok(admin(broker, "approvals", "show", first, token=APPROVER))
    assert shown["rule"] == "refund-review-eur" and shown["approvers_group"] == "refund-approvers"

    approved = ok(admin(broker, "approvals", "approve", first, "--reason", "verified with customer", token=APPROVER))
    assert approved["status"] == "approved"
    assert approved["approvals"][0]["name"] == "april"
    denied = admin(broker, "approvals", "deny", second, "--reason", "duplicate refund", token=APPROVER, fmt="table")
    assert denied.returncode == 0 and "denied by" in denied.stdout and "april" in denied.stdout
    approvals = [e for e in entries(broker) if e["kind"] == "approval"]
    assert len(approvals) >= 2

    # Deciding again is refused by the broker (exit 1), an admin is not an approver (exit 4).
    again = admin(broker, "approvals", "approve", first, "--reason", "again", token=APPROVER)
    assert again.returncode == 1 and "HTTP 409" in again.stderr
    third = exchange(broker, 140, "conv-appr-3").json()["auth_req_id"]
    wrong_role = admin(broker, "approvals", "approve", third, "--reason", "x", token=ADMIN)
    assert wrong_role.returncode == 4 and "HTTP 403 access_denied" in wrong_role.stderr


def test_leases_without_vault(broker: LiveBroker) -> None:
    listing = ok(admin(broker, "leases", "list"))
    assert listing == {"vault_configured": False, "leases": []}
    out = admin(broker, "leases", "revoke", "task-1", "--reason", "x")
    assert out.returncode == 3
    assert "HTTP 404 not_found: no Vault is configured on this broker" in out.stderr


@pytest.mark.parametrize(
    ("args", "token", "code", "message"),
    [
        (("workloads", "show", "no-such-workload"), ADMIN, 3,
         "HTTP 404 not_found: no workload named 'no-such-workload'"),
        (("workloads", "suspend", "support-assistant", "--reason", "x"), AUDITOR, 4,
         "HTTP 403 access_denied: role 'auditor' may not suspend"),
        (("workloads", "list"), "wrong-secret-0123456789", 4, "HTTP 401 invalid_token"),
        (("workloads", "list"), None, 2, "no operator credential: set NHI_BROKER_TOKEN or pass --token-file FILE"),
        (("revoke", "--workload", "support-assistant", "--reason", ""), ADMIN, 1,
         "HTTP 400 invalid_request: reason: String should have at least 1 character"),
        (("approvals", "show", "../../workloads"), ADMIN, 3, "HTTP 404"),
    ],
    ids=["not found", "role not allowed", "bad credential", "no credential", "empty reason", "path climbing"],
)
def test_exit_codes(broker: LiveBroker, args: tuple[str, ...], token: str | None, code: int, message: str) -> None:
    out = admin(broker, *args, token=token)
    assert out.returncode == code, out.stderr
    assert out.stderr.startswith("nhi-broker: ") and message in out.stderr  # one line, no log noise
    assert out.stderr.count("\n") == 1
    assert out.stdout == ""


def test_unreachable_broker_exits_5() -> None:
    out = admin(None, "workloads", "list", url=f"http://127.0.0.1:{free_port()}")
    assert out.returncode == 5
    assert "cannot reach the broker at http://127.0.0.1:" in out.stderr


def test_token_file(broker: LiveBroker, tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text(AUDITOR + "\n")
    out = admin(broker, "workloads", "list", "--token-file", str(secret), token=None)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("ident", ["-UH9M5H6_c_g25QKPwRm232bTOf0aa", "--x", "plain-id_0123456789abcdef"])
def test_ids_that_start_with_a_dash_are_ids(ident: str) -> None:
    from broker.cli.main import build_parser

    if ident.startswith("--"):  # a long option stays an option: a typo is an error, never an id
        with pytest.raises(SystemExit):
            build_parser().parse_args(["admin", "approvals", "show", ident])
        return
    args = build_parser().parse_args(["admin", "approvals", "deny", ident, "--reason", "r"])
    assert args.auth_req_id == ident and args.reason == "r"
