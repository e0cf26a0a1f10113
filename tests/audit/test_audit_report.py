"""`nhi-broker audit report`: a self-contained HTML report of a verified ledger, checked in headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from tests.audit.conftest import Ledger
from tests.audit.test_audit_cli import nhi

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOTS = Path(__file__).resolve().parent.parent.parent / "docs" / "screenshots"
OWNER = "Dana Reyes <dana.reyes@example.com>"


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never fetch a browser or driver
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1400", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _report(ledger: Ledger, tmp_path: Path, *extra: str) -> tuple[int, str, Path]:
    bundle = tmp_path / "ledger.bundle"
    if not bundle.exists():
        assert nhi("ledger", "export", str(bundle), "--data-dir", str(ledger.data_dir)).returncode == 0
    out = tmp_path / "report.html"
    r = nhi("audit", "report", "--bundle", str(bundle), "--verifier-key", ledger.verifier_key, "--out", str(out),
            *extra)
    return r.returncode, r.stdout + r.stderr, out


def test_report_is_self_contained_and_every_number_links_to_its_entries(
    ledger_copy: Ledger, tmp_path: Path, browser: WebDriver
) -> None:
    code, said, out = _report(ledger_copy, tmp_path, "--pdf", str(tmp_path / "report.pdf"))
    assert code == 0, said
    html = out.read_text(encoding="utf-8")
    # (1) nothing external: no scripts, stylesheets, images or fonts fetched from anywhere.
    without_ns = html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    for pattern in (r"<script", r"<link", r"<img", r"<iframe", r"\bsrc=", r"url\(", r"https?://(?!127\.0\.0\.1)"):
        assert re.search(pattern, without_ns) is None, pattern
    # (2) the verification result and the key the auditor gave.
    assert "VERIFIED." in html and ledger_copy.verifier_key in html
    # (3) every internal link has its target; each number's set lists exactly the entries behind it.
    ids = set(re.findall(r'id="([^"]+)"', html))
    targets = set(re.findall(r'href="#([^"]+)"', html))
    assert targets and targets <= ids
    issued = sorted(i.index for i in ledger_copy.issued)
    row = re.search(rf"<tr><th scope=\"row\">{re.escape(OWNER.replace('<', '&lt;').replace('>', '&gt;'))}</th>"
                    r'<td class="n"><a href="#(s\d+)">(\d+)</a>', html)
    assert row is not None and int(row.group(2)) == len(issued)
    listed = re.search(rf'<li id="{row.group(1)}">.*?</li>', html)
    assert listed is not None
    assert sorted(int(n) for n in re.findall(r'href="#e(\d+)"', listed.group(0))) == issued
    assert (tmp_path / "report.pdf").read_bytes().startswith(b"%PDF")

    # (4) rendered by a real browser: charts drawn, a number followed to its entries.
    browser.get(out.as_uri())
    assert browser.title.startswith("Ledger audit report")
    bars = browser.find_elements(By.CSS_SELECTOR, "svg.chart rect")
    assert bars and all(b.size["height"] > 0 for b in bars)
    shot = tmp_path / "audit-report.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank one
    if os.environ.get("NHI_BROKER_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, SCREENSHOTS / "audit-report.png")
    browser.find_element(By.CSS_SELECTOR, f'a[href="#{row.group(1)}"]').click()
    assert browser.current_url.endswith(f"#{row.group(1)}")
    entry = browser.find_element(By.ID, f"e{issued[0]}")
    assert "issuance" in entry.text and "payments.refund" in entry.text


def test_no_report_about_a_ledger_that_does_not_verify(ledger_copy: Ledger, tmp_path: Path) -> None:
    import base64

    bundle = tmp_path / "ledger.bundle"
    assert nhi("ledger", "export", str(bundle), "--data-dir", str(ledger_copy.data_dir)).returncode == 0
    lines = bundle.read_bytes().split(b"\n")
    idx, recorded, encoded = lines[1 + 6].split(b" ")
    lines[1 + 6] = b" ".join([idx, recorded, base64.b64encode(base64.b64decode(encoded).replace(b"20", b"99", 1))])
    bundle.write_bytes(b"\n".join(lines))
    code, said, out = _report(ledger_copy, tmp_path)
    assert code == 1 and "index 6: " in said, said
    assert not out.exists()
