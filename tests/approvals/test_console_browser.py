"""Done-when, in a real browser: Debian's headless Chromium (driven through Debian's chromedriver)
against a live ``nhi-broker serve`` process.

An over-limit refund is held for review; an approver signs in to the console and approves it; the
assistant's CIBA poll gets the token with the approval bound in; an auditor finds the refund in the
ledger, opens its entry with its inclusion proof; and ``broker.audit`` verifies the whole ledger and
proves both the approval and the issuance entries, with the verifier key the broker printed.

Set ``NHI_BROKER_UPDATE_SCREENSHOTS=1`` to refresh docs/screenshots/*.png from this run.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from broker.attest.dev import DevIssuer
from broker.audit import HttpLedgerSource, prove_attribution, verify_ledger
from broker.clock import SystemClock
from tests.approvals.harness import APRIL, AUDREY, CIBA, JWT_TYPE, OPERATORS, refund
from tests.helpers import REPO, SUPPORT, LiveBroker, delegated_form, dev_user, verified_claims

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOTS = REPO / "docs" / "screenshots"


def _toml_operators() -> str:
    blocks = []
    for op in OPERATORS:
        groups = ", ".join(f'"{g}"' for g in op.get("groups", []))
        blocks.append(f'[[operators]]\nname = "{op["name"]}"\nrole = "{op["role"]}"\n'
                      f'token_sha256 = "{op["token_sha256"]}"\ngroups = [{groups}]\n')
    return "\n".join(blocks)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LiveBroker]:
    config = tmp_path / "broker.toml"
    config.write_text(_toml_operators() + "\n[approvals]\npoll_interval = 1\n")
    # Two worker processes: sessions, pending requests and decisions must agree through the state store.
    live = LiveBroker(tmp_path / "data", workers=2, config=config)
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never fetch a browser or driver
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(5)
    try:
        yield driver
    finally:
        driver.quit()


def shoot(driver: WebDriver, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    if os.environ.get("NHI_BROKER_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, SCREENSHOTS / f"{name}.png")


def follow(driver: WebDriver, element: WebElement) -> None:
    """Click a link or submit button and wait until the next page replaced this one and loaded."""
    element.click()

    def replaced(_: WebDriver) -> bool:
        try:
            element.is_enabled()
        except StaleElementReferenceException:
            return True
        except WebDriverException as exc:
            # Chromium may report a node of the old document this way while the new one loads.
            return "does not belong to the document" in str(exc)
        return False

    WebDriverWait(driver, 10).until(replaced)
    WebDriverWait(driver, 10).until(lambda d: d.execute_script("return document.readyState") == "complete")


def sign_in(driver: WebDriver, broker: LiveBroker, credential: str) -> None:
    driver.get(broker.url + "/console/login")
    driver.find_element(By.ID, "credential").send_keys(credential)
    follow(driver, driver.find_element(By.ID, "login"))
    assert driver.find_elements(By.ID, "who"), driver.find_element(By.TAG_NAME, "main").text


def identity(broker: LiveBroker) -> str:
    return DevIssuer.load_or_create(broker.data_dir).mint(SUPPORT, "nhi-broker", clock=SystemClock())


def poll(broker: LiveBroker, auth_req_id: str) -> httpx.Response:
    form = {"grant_type": CIBA, "auth_req_id": auth_req_id, "subject_token": identity(broker),
            "subject_token_type": JWT_TYPE}
    return httpx.post(broker.url + "/v1/token", data=form, timeout=30)


def test_refund_approved_in_the_browser_is_issued_and_verified_in_the_ledger(
    broker: LiveBroker, browser: WebDriver, tmp_path: Path
) -> None:
    # (1) the assistant asks for a 120 EUR refund: held for review, CIBA-style.
    r = httpx.post(broker.url + "/v1/token",
                   data=delegated_form(dev_user(broker.data_dir), identity(broker), "payments-api", refund(120)))
    assert r.status_code == 200, r.text
    held = r.json()
    rid = held["auth_req_id"]
    assert held["interval"] == 1 and held["expires_in"] == 900
    assert poll(broker, rid).json()["error"] == "authorization_pending"

    # (2) the approver signs in, sees the full intent and context, and approves with a reason.
    sign_in(browser, broker, APRIL)
    assert browser.current_url.endswith("/console/approvals")
    row = browser.find_element(By.CSS_SELECTOR, f'a[href="/console/approvals/{rid}"]')
    assert "amount=120" in browser.find_element(By.TAG_NAME, "tbody").text
    shoot(browser, tmp_path, "approvals")
    follow(browser, row)
    assert browser.find_element(By.ID, "action").text == "payments.refund"
    page = browser.find_element(By.TAG_NAME, "main").text
    assert "Dana Reyes <dana.reyes@example.com>" in page and "refund-approvers" in page and "conv-7" in page
    reason = "Order ord-1001 arrived damaged; refund confirmed with the customer"
    browser.find_element(By.ID, "reason").send_keys(reason)
    shoot(browser, tmp_path, "approval")
    follow(browser, browser.find_element(By.ID, "approve"))
    assert "recorded in the ledger" in browser.find_element(By.ID, "notice").text
    assert browser.find_element(By.ID, "status").text == "approved"

    # (3) the assistant's next poll returns the token with the approval bound in.
    deadline = time.monotonic() + 10
    while (r := poll(broker, rid)).status_code != 200 and time.monotonic() < deadline:
        assert r.json()["error"] in ("authorization_pending", "slow_down"), r.text
        time.sleep(1.1)
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    token_claims = verified_claims(token, httpx.get(broker.url + "/.well-known/jwks.json", timeout=10).json(),
                                   "payments-api")
    assert token_claims["approval"]["approvers"] == ["april"]
    assert token_claims["approval"]["auth_req_id"] == rid

    # (4) an auditor finds that refund in the ledger by its jti, and opens its entry.
    follow(browser, browser.find_element(By.CSS_SELECTOR, "form.logout button"))
    sign_in(browser, broker, AUDREY)
    assert browser.current_url.endswith("/console/ledger")
    assert browser.find_element(By.ID, "checkpoint-status").text.startswith("Verified")
    browser.find_element(By.ID, "f-jti").send_keys(token_claims["jti"])
    follow(browser, browser.find_element(By.ID, "search"))
    results = browser.find_element(By.ID, "results").text
    assert token_claims["jti"] in results and "payments.refund" in results and "april" in results
    shoot(browser, tmp_path, "ledger")
    follow(browser, browser.find_element(By.CSS_SELECTOR, "a.entry-link"))
    assert browser.find_element(By.ID, "proof-status").text.startswith("Included")
    assert browser.find_element(By.ID, "leaf-hash").text == token_claims["txn"]
    assert "approved by april" in browser.find_element(By.ID, "attribution").text
    shoot(browser, tmp_path, "entry")
    follow(browser, browser.find_element(By.ID, "approval-link"))
    assert "approved by april" in browser.find_element(By.ID, "attribution").text
    assert "refund confirmed with the customer" in browser.find_element(By.ID, "entry-json").text

    # (5) broker.audit, with the verifier key the broker printed at start: the whole ledger verifies,
    # and the approval and issuance entries are proven included, the token matching its entry.
    key = re.search(r"ledger verifier\s+(\S+)", broker.output())
    assert key is not None
    source = HttpLedgerSource(broker.url)
    try:
        verified = verify_ledger(source, key.group(1))
        assert verified.summary.by_kind["approval"] == 1 and verified.summary.by_kind["issuance"] == 1
        issuance = prove_attribution(source, key.group(1), token=token)
        assert issuance.token_matched
        assert issuance.entry.entry["approval"]["leaf_hash"] == token_claims["approval"]["txn"]
        approval = prove_attribution(source, key.group(1), leaf_hash_hex=token_claims["approval"]["txn"])
        assert approval.entry.kind == "approval" and approval.entry.entry["approval"]["approver"]["name"] == "april"
        assert approval.index < issuance.index
    finally:
        source.close()


def test_console_refuses_bad_sign_ins_and_cross_site_posts(broker: LiveBroker, browser: WebDriver) -> None:
    browser.get(broker.url + "/console/ledger")
    assert browser.current_url.endswith("/console/login")  # no session: sign in first
    browser.find_element(By.ID, "credential").send_keys("not-a-configured-credential")
    follow(browser, browser.find_element(By.ID, "login"))
    assert "not accepted" in browser.find_element(By.ID, "problem").text
    sign_in(browser, broker, AUDREY)
    cookie = browser.get_cookie("nhi_console")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    # A form posted from another origin (what a CSRF attack does) is refused, session or not.
    r = httpx.post(broker.url + "/console/logout", data={"csrf": "x"}, headers={"Origin": "https://evil.example"},
                   cookies={"nhi_console": cookie["value"]})
    assert r.status_code == 403 and "another site" in r.text
    assert "default-src 'none'" in r.headers["content-security-policy"]
