"""The one-time bootstrap sign-in `serve` prints on embedded defaults (as Vault's dev mode prints a
root token): printed once, stored hashed, never logged, console only, replaced at every start, and
absent from any configured broker. Signed in with, in Debian's headless Chromium at both widths."""

from __future__ import annotations

import json
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from broker.config import Settings
from broker.console.bootstrap import BOOTSTRAP_FILE, BootstrapOperators, bootstrap_enabled, create_bootstrap
from broker.operators import hash_secret
from tests.approvals.console_browser import WIDTHS, assert_no_horizontal_overflow, open_browser, shoot
from tests.approvals.harness import OPERATORS, refund
from tests.approvals.test_console_browser import _toml_operators, follow, identity, sign_in
from tests.helpers import LiveBroker, delegated_form, dev_user

_LINE = re.compile(r"^    (admin|approver|auditor)\s+(nhi-console-[A-Za-z0-9_-]{43})(?:\s+\(groups: ([^)]*)\))?$", re.M)


def printed(broker: LiveBroker) -> dict[str, tuple[str, str]]:
    """``role -> (secret, groups)`` from the serve banner."""
    return {m.group(1): (m.group(2), m.group(3) or "") for m in _LINE.finditer(broker.output())}


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveBroker]:
    broker = LiveBroker(tmp_path_factory.mktemp("bootstrap") / "data")
    try:
        yield broker
    finally:
        broker.stop()


def console_sign_in(url: str, secret: str) -> httpx.Response:
    with httpx.Client(base_url=url) as client:
        page = client.get("/console/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf is not None
        return client.post("/console/login", data={"csrf": csrf.group(1), "credential": secret})


def test_serve_prints_three_sign_ins_once_and_stores_only_their_hashes(embedded: LiveBroker) -> None:
    creds = printed(embedded)
    assert set(creds) == {"admin", "approver", "auditor"}
    assert creds["approver"][1] == "refund-approvers"  # every approver group of policies/approvals.toml
    assert "console sign-in   one-time bootstrap credentials" in embedded.output()
    output = embedded.output()
    for secret, _ in creds.values():
        assert output.count(secret) == 1  # the banner line only: no log line repeats it
    # Stored hashed, mode 0600; the plaintext is in no file of the data directory.
    path = embedded.data_dir / BOOTSTRAP_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = json.loads(path.read_text())
    assert {row["token_sha256"] for row in stored["operators"]} == {hash_secret(s) for s, _ in creds.values()}
    for file in embedded.data_dir.rglob("*"):
        if file.is_file():
            data = file.read_bytes()
            assert not any(secret.encode() in data for secret, _ in creds.values()), file


@pytest.mark.parametrize(("role", "lands_on"), [("admin", "/console/ledger"), ("approver", "/console/approvals"),
                                                 ("auditor", "/console/ledger")])
def test_each_sign_in_opens_the_console_for_its_role(embedded: LiveBroker, role: str, lands_on: str) -> None:
    secret, _ = printed(embedded)[role]
    r = console_sign_in(embedded.url, secret)
    assert (r.status_code, r.headers["location"]) == (303, "/console")
    with httpx.Client(base_url=embedded.url, cookies=r.cookies) as client:
        home = client.get("/console")
        assert (home.status_code, home.headers["location"]) == (303, lands_on)
        page = client.get(lands_on)
        assert f"bootstrap-{role} ({role}" in page.text


def test_bootstrap_sign_ins_do_not_open_the_admin_api(embedded: LiveBroker) -> None:
    for secret, _ in printed(embedded).values():
        r = httpx.get(embedded.url + "/v1/admin/workloads", headers={"Authorization": f"Bearer {secret}"})
        assert r.status_code == 401 and r.json()["error"] == "invalid_token"
    assert console_sign_in(embedded.url, "nhi-console-" + "A" * 43).status_code == 401


@pytest.mark.parametrize("width", WIDTHS, ids=lambda w: f"{w}px")
def test_bootstrap_approver_decides_in_the_browser(embedded: LiveBroker, width: int, tmp_path: Path) -> None:
    r = httpx.post(embedded.url + "/v1/token",  # a refund for the verified customer c-42 (delegated)
                   data=delegated_form(dev_user(embedded.data_dir), identity(embedded), "payments-api", refund(120)))
    assert r.status_code == 200, r.text
    rid = r.json()["auth_req_id"]
    browser: WebDriver = open_browser(width)
    try:
        sign_in(browser, embedded, printed(embedded)["approver"][0])
        assert "bootstrap-approver (approver; refund-approvers)" in browser.find_element(By.ID, "who").text
        assert_no_horizontal_overflow(browser)
        shoot(browser, tmp_path, f"console-bootstrap-approvals-{width}", full_page=False)
        follow(browser, browser.find_element(By.CSS_SELECTOR, f'a[href="/console/approvals/{rid}"]'))
        browser.find_element(By.ID, "reason").send_keys("bootstrap trial: approved")
        follow(browser, browser.find_element(By.ID, "approve"))
        assert browser.find_element(By.ID, "status").text == "approved"
    finally:
        browser.quit()


def test_a_restart_replaces_them(tmp_path: Path) -> None:
    first = LiveBroker(tmp_path / "data")
    old = printed(first)
    first.stop()
    second = LiveBroker(tmp_path / "data")
    try:
        new = printed(second)
        assert set(new) == set(old) and all(new[r][0] != old[r][0] for r in old)
        assert console_sign_in(second.url, old["auditor"][0]).status_code == 401
        assert console_sign_in(second.url, new["auditor"][0]).status_code == 303
    finally:
        second.stop()


def test_a_configured_broker_prints_none_and_ignores_a_leftover_file(tmp_path: Path) -> None:
    first = LiveBroker(tmp_path / "data")
    leftover = printed(first)["admin"][0]
    first.stop()
    config = tmp_path / "broker.toml"
    config.write_text(_toml_operators())
    configured = LiveBroker(tmp_path / "data", config=config)
    try:
        assert "console sign-in" not in configured.output() and not printed(configured)
        assert (tmp_path / "data" / BOOTSTRAP_FILE).is_file()  # left over from the first start, and ignored:
        assert console_sign_in(configured.url, leftover).status_code == 401
    finally:
        configured.stop()


@pytest.mark.parametrize(
    ("settings", "enabled"),
    [
        ({}, True),
        ({"operators": OPERATORS}, False),
        ({"host": "0.0.0.0"}, False),  # noqa: S104
        ({"public_url": "https://broker.example.com"}, False),
        ({"unsafe_trial_issuers": True}, False),
        ({"unsafe_trial_issuers": False}, False),
        ({"trust": [{"issuer": "https://idp.example.com", "jwks_url": "https://idp.example.com/jwks",
                     "kind": "spiffe-jwt", "audience": "nhi-broker", "trust_domain": "example.org"}]}, False),
    ],
)
def test_only_embedded_defaults_get_a_bootstrap(tmp_path: Path, settings: dict[str, object], enabled: bool) -> None:
    configured = Settings(data_dir=tmp_path, **settings)  # type: ignore[arg-type]
    assert bootstrap_enabled(configured) is enabled
    created = create_bootstrap(tmp_path, ("refund-approvers",))
    found = BootstrapOperators(configured).authenticate(created[1].secret)
    assert (found is not None) is enabled
    if found is not None:
        assert (found.name, found.role, found.groups) == ("bootstrap-approver", "approver", ("refund-approvers",))
