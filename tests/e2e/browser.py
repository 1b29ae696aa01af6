"""A headless Chromium driven by selenium, for the dashboard's end-to-end tests.

Debian's ``chromium`` and ``chromium-driver`` (``make test`` installs them
with apt): without them a test skips here and fails under CI, like a
missing broker. Screenshots go to the test's folder and are copied to
``runs/screenshots/`` (git-ignored), where they outlive pytest's temporary
folders.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.brokers import skip_or_fail

SCREENSHOTS = Path(__file__).resolve().parents[2] / "runs" / "screenshots"
"""Where the screenshots are kept after the test (``runs/`` is git-ignored)."""


@contextmanager
def chromium(downloads: Path) -> Iterator[Any]:
    """Yield a headless Chromium WebDriver that saves downloads in ``downloads``; quit after."""
    binary, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver_path is None:
        skip_or_fail("chromium and chromium-driver are not installed (apt-get install both)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        skip_or_fail("selenium is not installed (pip install -e '.[dev]')")
    options = webdriver.ChromeOptions()
    options.binary_location = str(binary)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1050",
        "--lang=en-US",
    ):
        options.add_argument(argument)
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    downloads.mkdir(parents=True, exist_ok=True)
    # An explicit driver path: selenium never looks for (or downloads) one itself.
    driver = webdriver.Chrome(service=Service(str(driver_path)), options=options)
    try:
        driver.execute_cdp_cmd(
            "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
        )
        yield driver
    finally:
        driver.quit()  # ends chromium and chromedriver


class Screenshots:
    """Saves numbered screenshots in a test's folder and copies them to ``SCREENSHOTS``."""

    def __init__(self, driver: Any, folder: Path, prefix: str) -> None:
        self._driver = driver
        self._folder = folder
        self._prefix = prefix
        self.saved: list[Path] = []
        folder.mkdir(parents=True, exist_ok=True)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    def take(self, name: str) -> Path:
        """Save the page as ``<prefix>-<name>.png`` in both places; return the kept copy."""
        file_name = f"{self._prefix}-{name}.png"
        path = self._folder / file_name
        self._driver.save_screenshot(str(path))
        kept = SCREENSHOTS / file_name
        shutil.copyfile(path, kept)
        self.saved.append(kept)
        return kept


def text(driver: Any, css: str) -> str:
    """Return the text of the first element matching ``css`` ("" when there is none yet)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        found = driver.find_elements(By.CSS_SELECTOR, css)
        return str(found[0].text) if found else ""
    except StaleElementReferenceException:  # redrawn between finding and reading
        return ""


def attribute(driver: Any, css: str, name: str) -> str:
    """Return an attribute of the first element matching ``css`` ("" when there is none)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        found = driver.find_elements(By.CSS_SELECTOR, css)
        return str(found[0].get_attribute(name) or "") if found else ""
    except StaleElementReferenceException:
        return ""


def click(driver: Any, css: str) -> None:
    """Click the element matching ``css``."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, css).click()


def fill(driver: Any, css: str, value: str) -> None:
    """Replace the value of the input or textarea matching ``css`` by typing ``value``."""
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.CSS_SELECTOR, css)
    field.clear()
    field.send_keys(value)


def sign_in(driver: Any, base_url: str, token: str, fragment: str = "") -> None:
    """Open the dashboard (at ``#fragment``, an experiment) and sign in with ``token``."""
    driver.get(f"{base_url}/" + (f"#{fragment}" if fragment else ""))
    fill(driver, "#token", token)
    click(driver, "#login button")


def console_errors(driver: Any) -> list[str]:
    """Return the browser console's errors so far (a CSP violation is one)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
