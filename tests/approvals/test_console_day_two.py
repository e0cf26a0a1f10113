"""Done-when for the console's day-two pages, in Debian's headless Chromium at 390 px and 1280 px,
against a live ``nhi-broker serve`` whose Vault is down (nothing listens at its address).

Approvers: the request list is usable at phone width; a held request shows the deciding rule and its
condition evaluated, the workload's recent decisions for that customer or conversation, and budget
use. Auditors: bad filters are visible errors, searches by every criterion, previous/next pages, the
cause of every denial (the Vault outage is not a "deny by rule"), revocation and suspension summaries
whose links lead to the related entries, an entry downloaded with its proof that `nhi-broker audit
prove --entry-proof` verifies, and the verifier key of the "Verified" banner. No page and no table
is wider than the viewport at either width.

Set ``NHI_BROKER_UPDATE_SCREENSHOTS=1`` to refresh docs/screenshots/console-*.png from this run.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from broker.clock import SystemClock
from broker.config import Settings
from broker.operators import hash_secret
from tests.approvals.console_browser import (
    PHONE,
    WIDTHS,
    assert_inside_viewport,
    assert_no_horizontal_overflow,
    open_browser,
    shoot,
)
from tests.approvals.harness import APRIL, AUDREY, Harness
from tests.approvals.test_console_audit import RS_SECRET, Scenario, build_scenario
from tests.approvals.test_console_browser import _toml_operators, follow, sign_in
from tests.helpers import LiveBroker, free_port, intent

FILLERS = 55  # more denials than one page (50) holds, for previous/next


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveBroker, Scenario]]:
    tmp = tmp_path_factory.mktemp("console-day-two")
    secret_id = tmp / "secret-id"
    secret_id.write_text("not-a-real-secret-id")
    config = tmp / "broker.toml"
    config.write_text(
        _toml_operators()
        + f'\n[[introspection_clients]]\nclient_id = "payments-api"\nsecret_sha256 = "{hash_secret(RS_SECRET)}"\n'
        'audiences = ["payments-api"]\n'
        f'\n[vault]\naddr = "http://127.0.0.1:{free_port()}"\napprole_role_id = "nobody"\n'
        f'approle_secret_id_file = "{secret_id}"\ntimeout = 1.0\n'
        "\n[approvals]\npoll_interval = 1\n"
    )
    broker = LiveBroker(tmp / "data", config=config)
    try:
        client = httpx.Client(base_url=broker.url, timeout=30)
        h = Harness(client, Settings(data_dir=broker.data_dir), SystemClock())  # type: ignore[arg-type]
        for n in range(FILLERS):  # default denials of another customer: they leave c-42's history alone
            filler = intent("payments.refund", "customers/c-99/orders/ord-9", customer="c-99", amount=900 + n,
                            currency="EUR", conversation="conv-99")
            assert h.exchange(filler).json()["error"] == "access_denied"
        scenario = build_scenario(h)
        yield broker, scenario
        client.close()
    finally:
        broker.stop()


@pytest.fixture(params=WIDTHS, ids=lambda w: f"{w}px")
def browser(request: pytest.FixtureRequest) -> Iterator[WebDriver]:
    driver = open_browser(request.param)
    try:
        yield driver
    finally:
        driver.quit()


def width_of(driver: WebDriver) -> int:
    return int(driver.execute_script("return window.innerWidth"))


def results(driver: WebDriver) -> list[int]:
    return [int(a.text) for a in driver.find_elements(By.CSS_SELECTOR, "#results a.entry-link")]


def search(driver: WebDriver, **fields: str) -> None:
    for name, value in fields.items():
        box = driver.find_element(By.ID, f"f-{name}")
        box.clear()
        box.send_keys(value)
    follow(driver, driver.find_element(By.ID, "search"))


def test_approver_sees_why_history_and_budget(live: tuple[LiveBroker, Scenario], browser: WebDriver,
                                              tmp_path: Path) -> None:
    broker, scenario = live
    width = width_of(browser)
    sign_in(browser, broker, APRIL)
    assert browser.current_url.endswith("/console/approvals")
    assert_no_horizontal_overflow(browser)
    link = browser.find_element(By.CSS_SELECTOR, f'a[href="/console/approvals/{scenario.held}"]')
    assert link.is_displayed()
    if width == PHONE:  # one card per request: no header row, every cell labelled
        assert not browser.find_element(By.CSS_SELECTOR, "table.stack thead").is_displayed()
    shoot(browser, tmp_path, f"console-approvals-{width}")
    follow(browser, link)
    assert_no_horizontal_overflow(browser)
    assert browser.find_element(By.ID, "rule-id").text == "refund-review-eur"
    assert browser.find_element(By.ID, "rule-condition").text == (
        "amount > 50 && amount < 500 && currency == 'EUR' && customer == user.sub")
    clauses = browser.find_element(By.ID, "clauses").text
    assert "✓ amount > 50 (amount = 120)" in clauses.replace("  ", " ")
    history = browser.find_element(By.ID, "history").text
    assert "customer c-42 or conversation conv-7" in history
    assert "Backend unavailable, failed closed" in history and "No rule allows it (default deny)" in history
    assert "amount=20" in history and "c-99" not in history
    budgets = browser.find_element(By.ID, "budgets").text
    assert "20.00 EUR of 200.00 EUR used per conversation conv-7 this day under rule refund-small-eur" in budgets
    assert "this request: 120 EUR" in budgets
    # The decision form is usable at this width: reason box and both buttons within the viewport.
    for element_id in ("reason", "approve", "deny"):
        assert_inside_viewport(browser, element_id)
    shoot(browser, tmp_path, f"console-approval-{width}")


def test_auditor_filters_causes_summaries_and_paging(live: tuple[LiveBroker, Scenario], browser: WebDriver,
                                                     tmp_path: Path) -> None:
    broker, scenario = live
    width, index = width_of(browser), scenario.index
    sign_in(browser, broker, AUDREY)
    assert browser.current_url.endswith("/console/ledger")
    # The banner says which verifier key it used: the one `serve` printed.
    printed = re.search(r"ledger verifier\s+(\S+)", broker.output())
    assert printed is not None
    assert browser.find_element(By.ID, "checkpoint-status").text.startswith("Verified")
    assert browser.find_element(By.ID, "verifier-key").text == printed.group(1)
    assert len(results(browser)) == 50
    assert_no_horizontal_overflow(browser)
    shoot(browser, tmp_path, f"console-ledger-{width}")

    # Bad filters: visible errors next to their fields, and no result table.
    search(browser, since="yesterday", kind="issuanse")
    assert "The search was not run" in browser.find_element(By.ID, "problem").text
    assert "is not a UTC date or time" in browser.find_element(By.ID, "e-since").text
    assert "is not an entry kind" in browser.find_element(By.ID, "e-kind").text
    assert browser.find_element(By.ID, "f-since").get_attribute("aria-invalid") == "true"
    assert not browser.find_elements(By.ID, "results")
    assert_no_horizontal_overflow(browser)
    shoot(browser, tmp_path, f"console-ledger-errors-{width}")
    browser.get(broker.url + "/console/ledger")

    # Previous / next: 50 per page, newest first.
    first = results(browser)
    follow(browser, browser.find_element(By.ID, "older"))
    second = results(browser)
    assert second and max(second) == min(first) - 1
    follow(browser, browser.find_element(By.ID, "newer"))
    assert results(browser) == first

    # Searches by criterion, each through the form.
    for fields, expected in (
        ({"error": "temporarily_unavailable"}, [index["vault_outage"]]),
        ({"rule": "triage-no-payments"}, [index["deny_rule"]]),
        ({"conversation": "conv-7", "kind": "revocation"}, [index["revoke_conversation"]]),
        ({"jti": scenario.jti}, [index["revoke_token"], index["issuance"]]),
        ({"customer": "c-42", "decision": "allow"}, [index["issuance"]]),
        ({"resource": "customers/c-42/orders", "kind": "denial"},
         [index["vault_outage"], index["deny_rule"], index["default_deny"]]),
    ):
        browser.get(broker.url + "/console/ledger")
        search(browser, **fields)
        assert results(browser) == expected, fields

    # The cause of every denial: the outage is not a rule's deny.
    browser.get(broker.url + "/console/ledger?kind=denial&customer=c-42")
    rows = {int(tr.find_element(By.CSS_SELECTOR, "a.entry-link").text): tr.text
            for tr in browser.find_elements(By.CSS_SELECTOR, "#results tbody tr")}
    assert "Backend unavailable, failed closed (rule orders-db-read allowed it" in rows[index["vault_outage"]]
    assert "Denied by rule" not in rows[index["vault_outage"]]
    assert "No rule allows it (default deny)" in rows[index["default_deny"]]
    assert "Denied by rule triage-no-payments" in rows[index["deny_rule"]]
    assert_no_horizontal_overflow(browser)

    # Revocation and suspension summaries, complete, with links to the related entries.
    browser.get(broker.url + "/console/ledger?kind=revocation")
    text = browser.find_element(By.ID, "results").text
    assert f"Token {scenario.jti} of workload support-assistant revoked by resource server payments-api" in text
    assert "Every token of conversation conv-7 revoked by operator ada (admin): “customer reported fraud”" in text
    assert_no_horizontal_overflow(browser)
    shoot(browser, tmp_path, f"console-revocations-{width}")
    follow(browser, browser.find_element(By.LINK_TEXT, scenario.jti))
    assert results(browser) == [index["revoke_token"], index["issuance"]]
    browser.get(broker.url + f"/console/ledger/{index['suspend']}")
    assert ("Workload ticket-triage suspended by operator ada (admin): “prompt injection suspected”"
            in browser.find_element(By.ID, "what").text)
    follow(browser, browser.find_element(By.LINK_TEXT, "ticket-triage"))
    assert index["suspend"] in results(browser) and index["suspended_denial"] in results(browser)


def test_entry_page_navigation_and_verified_download(live: tuple[LiveBroker, Scenario], browser: WebDriver,
                                                     tmp_path: Path) -> None:
    broker, scenario = live
    width, outage = width_of(browser), scenario.index["vault_outage"]
    sign_in(browser, broker, AUDREY)
    browser.get(broker.url + f"/console/ledger/{outage}")
    assert browser.find_element(By.ID, "proof-status").text.startswith("Included")
    cause = browser.find_element(By.ID, "cause").text
    assert "Backend unavailable, failed closed" in cause and "Vault is unreachable" in cause
    printed = re.search(r"ledger verifier\s+(\S+)", broker.output())
    assert printed is not None and browser.find_element(By.ID, "entry-key").text == printed.group(1)
    assert_no_horizontal_overflow(browser)
    shoot(browser, tmp_path, f"console-entry-{width}")
    follow(browser, browser.find_element(By.ID, "next-entry"))
    assert browser.current_url.endswith(f"/console/ledger/{outage + 1}")
    follow(browser, browser.find_element(By.ID, "prev-entry"))
    follow(browser, browser.find_element(By.ID, "prev-entry"))
    assert browser.current_url.endswith(f"/console/ledger/{outage - 1}")
    browser.get(broker.url + f"/console/ledger/{outage}")
    href = browser.find_element(By.ID, "download").get_attribute("href")
    assert href == f"{broker.url}/console/ledger/{outage}/proof.json"
    # The download, with this browser's session, verified offline by the audit CLI with the printed key.
    cookie = browser.get_cookie("nhi_console")
    assert cookie is not None
    r = httpx.get(href, cookies={"nhi_console": cookie["value"]})
    assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
    proof = tmp_path / "entry.proof.json"
    proof.write_bytes(r.content)
    assert json.loads(r.content)["entry"]["decision"]["error"] == "temporarily_unavailable"
    exe = Path(sys.executable).with_name("nhi-broker")
    checked = subprocess.run([str(exe), "audit", "prove", "--entry-proof", str(proof), "--verifier-key",
                              printed.group(1)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert f"entry            {outage} (denial)" in checked.stdout
    assert httpx.get(href).status_code == 303  # no session, no download
