"""The console in process: every refusal is a precise page (never a 500), and who sees which form."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from broker.api.app import create_app
from broker.clock import FixedClock
from broker.config import Settings
from tests.approvals.harness import APRIL, AUDREY, DANA, OTTO, Harness, approval_settings
from tests.helpers import POLICIES


@pytest.fixture
def harness(tmp_path: Path, redis_prefix: str) -> Iterator[Harness]:
    settings = approval_settings(tmp_path / "data", "sqlite", redis_prefix)
    clock = FixedClock(time.time())
    with TestClient(create_app(settings, clock=clock), raise_server_exceptions=False) as client:
        yield Harness(client, settings, clock)


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match is not None
    return match.group(1)


def sign_in(h: Harness, secret: str) -> None:
    page = h.client.get("/console/login")
    r = h.client.post("/console/login", data={"csrf": csrf_of(page.text), "credential": secret},
                      follow_redirects=False)
    assert r.status_code == 303, r.text


def test_pages_need_a_session(harness: Harness) -> None:
    for path in ("/console", "/console/approvals", "/console/ledger", "/console/ledger/0",
                 "/console/approvals/abcdefghijklmnopqrstuvwxyz"):
        r = harness.client.get(path, follow_redirects=False)
        assert (r.status_code, r.headers["location"]) == (303, "/console/login"), path
    r = harness.client.post("/console/approvals/abcdefghijklmnopqrstuvwxyz", data={"decision": "approve"},
                            follow_redirects=False)
    assert r.status_code == 303


def test_sign_in_needs_the_form_token(harness: Harness) -> None:
    harness.client.get("/console/login")
    r = harness.client.post("/console/login", data={"csrf": "forged", "credential": APRIL})
    assert r.status_code == 403 and "sign-in form expired" in r.text
    assert "nhi_console=" not in r.headers.get("set-cookie", "")


def test_wrong_credential_is_a_401_page(harness: Harness) -> None:
    page = harness.client.get("/console/login")
    r = harness.client.post("/console/login", data={"csrf": csrf_of(page.text), "credential": "wrong"})
    assert r.status_code == 401 and "not accepted" in r.text
    assert r.headers["cache-control"] == "no-store" and r.headers["x-frame-options"] == "DENY"


@pytest.mark.parametrize(
    ("secret", "form_shown", "why"),
    [
        (APRIL, True, ""),
        (DANA, True, "another approver must approve it"),
        (OTTO, False, "not in the approver group refund-approvers"),
        (AUDREY, False, "your role (auditor) does not decide approvals"),
    ],
)
def test_who_sees_the_decision_form(harness: Harness, secret: str, form_shown: bool, why: str) -> None:
    rid = harness.hold()
    sign_in(harness, secret)
    page = harness.client.get(f"/console/approvals/{rid}")
    assert page.status_code == 200
    assert ('id="approve"' in page.text) is form_shown
    assert why in page.text
    assert "amount" in page.text and "conv-7" in page.text


@pytest.mark.parametrize(
    ("form", "content_type", "status", "text"),
    [
        ({"decision": "approve", "reason": "ok"}, None, 403, "the form expired"),
        ({"decision": "maybe", "reason": "ok", "csrf": "{csrf}"}, None, 400, "choose approve or deny"),
        ({"decision": "approve", "reason": "", "csrf": "{csrf}"}, None, 400, "needs a reason"),
        # A reason that displays otherwise than it is (Trojan Source): refused, nothing decided.
        ({"decision": "approve", "reason": "ok \u202egnp.exe", "csrf": "{csrf}"}, None, 400, "U+202E"),
        ({"decision": "deny", "reason": "fine\u2066 \u2069", "csrf": "{csrf}"}, None, 400, "U+2066"),
        ({"decision": "approve", "reason": "ok\x00", "csrf": "{csrf}"}, None, 400, "U+0000"),
        ({"decision": "approve", "reason": "ok", "csrf": "{csrf}"}, "text/plain", 415, "x-www-form-urlencoded"),
    ],
)
def test_bad_decisions_are_precise_pages(harness: Harness, form: dict[str, str], content_type: str | None,
                                         status: int, text: str) -> None:
    rid = harness.hold()
    sign_in(harness, APRIL)
    csrf = csrf_of(harness.client.get(f"/console/approvals/{rid}").text)
    body = {k: v.replace("{csrf}", csrf) for k, v in form.items()}
    if content_type is None:
        r = harness.client.post(f"/console/approvals/{rid}", data=body)
    else:
        r = harness.client.post(f"/console/approvals/{rid}", content="x=1", headers={"Content-Type": content_type})
    assert r.status_code == status and text in r.text
    assert harness.client.get(f"/console/approvals/{rid}").text.count('id="status">pending') == 1


def test_deciding_twice_and_unknown_requests(harness: Harness) -> None:
    rid = harness.hold()
    sign_in(harness, APRIL)
    csrf = csrf_of(harness.client.get(f"/console/approvals/{rid}").text)
    r = harness.client.post(f"/console/approvals/{rid}", data={"csrf": csrf, "decision": "deny", "reason": "no"})
    assert r.status_code == 200 and "Your denial is recorded" in r.text
    again = harness.client.post(f"/console/approvals/{rid}", data={"csrf": csrf, "decision": "approve", "reason": "x"})
    assert again.status_code == 409 and "already denied" in again.text
    assert harness.client.get("/console/approvals/" + "u" * 30).status_code == 404


def test_ledger_search_and_entries(harness: Harness) -> None:
    harness.hold()
    sign_in(harness, AUDREY)
    assert harness.client.get("/console/ledger", params={"owner": "x" * 300}).status_code == 400
    assert harness.client.get("/console/ledger/99").status_code == 404
    assert harness.client.get("/console/ledger/-1").status_code == 400
    page = harness.client.get("/console/ledger", params={"kind": "denial"})
    assert page.status_code == 200 and "0 matching entries" in page.text and "Verified" in page.text


def test_logout_ends_the_session(harness: Harness) -> None:
    sign_in(harness, AUDREY)
    csrf = csrf_of(harness.client.get("/console/ledger").text)
    assert harness.client.post("/console/logout", data={"csrf": csrf}, follow_redirects=False).status_code == 303
    assert harness.client.get("/console/ledger", follow_redirects=False).status_code == 303


def test_sign_in_with_an_oidc_identity_token(tmp_path: Path) -> None:
    from tests.state.test_operator_oidc import AUDIENCE, ISSUER, Idp

    idp = Idp(tmp_path)
    settings = Settings(
        data_dir=tmp_path / "data", policies_dir=POLICIES,
        operator_issuers=[{"issuer": ISSUER, "kind": "oidc", "audience": AUDIENCE, "jwks_file": idp.jwks_file,
                           "spiffe_id_template": "spiffe://ops.example.org/user/{sub}"}],
        operators=[{"name": "rita@example.com", "role": "approver", "groups": ["refund-approvers"],
                    "spiffe_id": "spiffe://ops.example.org/user/u-9"}],
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        h = Harness(client, settings, FixedClock(time.time()))
        sign_in(h, idp.token("u-9"))
        assert "rita@example.com (approver; refund-approvers)" in client.get("/console/approvals").text
        page = client.get("/console/login")  # signed in: the login page sends you on
        assert page.url.path == "/console/approvals"
        client.cookies.clear()
        login = client.get("/console/login")
        other = client.post("/console/login", data={"csrf": csrf_of(login.text), "credential": idp.token("u-1")})
        assert other.status_code == 401 and "not accepted" in other.text
