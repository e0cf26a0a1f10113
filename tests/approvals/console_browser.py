"""Browser helpers for the console tests: Debian's headless Chromium through Debian's chromedriver,
at a phone width (390 px) or a desktop width (1280 px), and layout checks."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from tests.helpers import REPO

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOTS = REPO / "docs" / "screenshots"
PHONE, DESKTOP = 390, 1280
WIDTHS = (PHONE, DESKTOP)


def open_browser(width: int, height: int = 1000) -> WebDriver:
    """A headless Chromium whose viewport is exactly ``width`` CSS pixels.

    Not Chromium's mobile emulation: its 980 px layout viewport for pages without a viewport tag
    would make the width depend on the page; the console's pages lay out for ``device-width``.
    """
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never fetch a browser or driver
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={max(width, 800)},{height}", "--disable-extensions", "--no-first-run",
                "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(5)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    assert viewport_width(driver) == width
    return driver


def viewport_width(driver: WebDriver) -> int:
    return int(driver.execute_script("return window.innerWidth"))


def assert_no_horizontal_overflow(driver: WebDriver) -> None:
    """Neither the page nor any table is wider than the viewport (nothing to scroll sideways)."""
    width = viewport_width(driver)
    page = int(driver.execute_script("return document.documentElement.scrollWidth"))
    assert page <= width, f"the page is {page} px wide in a {width} px viewport"
    for table in driver.find_elements(By.TAG_NAME, "table"):
        right = float(driver.execute_script("return arguments[0].getBoundingClientRect().right", table))
        inner = int(driver.execute_script("return arguments[0].scrollWidth - arguments[0].clientWidth", table))
        assert right <= width + 0.5 and inner <= 0, f"table {table.get_attribute('id')} overflows ({right} px)"


def assert_inside_viewport(driver: WebDriver, element_id: str) -> None:
    """The element is displayed and lies within the viewport's width (usable without scrolling sideways);
    on a phone it is at least 40 px tall (a touch target)."""
    element = driver.find_element(By.ID, element_id)
    assert element.is_displayed(), element_id
    rect = driver.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.left, r.right, r.height]",
                                 element)
    width = viewport_width(driver)
    assert rect[0] >= 0 and rect[1] <= width and rect[2] >= (40 if width < 600 else 1), (element_id, rect)


def shoot(driver: WebDriver, tmp_path: Path, name: str, *, full_page: bool = True) -> None:
    """Save a screenshot (the whole page); copied to docs/screenshots with NHI_BROKER_UPDATE_SCREENSHOTS=1."""
    path = tmp_path / f"{name}.png"
    if full_page:
        height = int(driver.execute_script("return document.documentElement.scrollHeight"))
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": viewport_width(driver), "height": min(height, 2400), "deviceScaleFactor": 1, "mobile": False})
    driver.save_screenshot(str(path))
    if full_page:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": viewport_width(driver), "height": 1000, "deviceScaleFactor": 1, "mobile": False})
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    if os.environ.get("NHI_BROKER_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, SCREENSHOTS / f"{name}.png")
