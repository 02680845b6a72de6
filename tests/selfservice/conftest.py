"""A real headless Chromium (Debian's chromium + chromedriver, driven by Selenium) and its screenshots.

Screenshots are test artefacts: ``$LDAPSYNC_ARTIFACTS/screenshots`` (default
``tests/artifacts/screenshots``, git-ignored).  A missing browser is an error,
not a skip: ``tests/setup-and-run.sh`` installs it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("LDAPSYNC_ARTIFACTS") or Path(__file__).resolve().parents[1] / "artifacts")


class Browser:
    def __init__(self, driver: Any, shots: Path) -> None:
        self.driver = driver
        self.shots = shots

    def get(self, url: str) -> None:
        self.driver.get(url)

    def fill(self, **fields: str) -> None:
        from selenium.webdriver.common.by import By

        for name, value in fields.items():
            el = self.driver.find_element(By.NAME, name)
            el.clear()
            el.send_keys(value)

    def submit(self, text: str | None = None) -> None:
        from selenium.common.exceptions import (
            StaleElementReferenceException,
            WebDriverException,
        )
        from selenium.webdriver.common.by import By

        self.settle()
        for attempt in range(3):
            buttons = self.driver.find_elements(By.CSS_SELECTOR, "main form button[type=submit]")
            if text is not None:
                buttons = [b for b in buttons if b.text.strip() == text]
            assert buttons, f"no submit button {text!r} on {self.driver.current_url}"
            try:
                self.click(buttons[0])
                return
            except (StaleElementReferenceException, WebDriverException) as e:
                # the page was still being replaced when the button was found ("Node with given
                # id does not belong to the document"): find it again on the settled page
                if attempt == 2 or "does not belong to the document" not in str(e) and \
                        not isinstance(e, StaleElementReferenceException):
                    raise
                self.settle()

    def settle(self) -> None:
        """Wait until the current page has finished loading."""
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        def loaded(d: Any) -> bool:
            try:
                return d.execute_script("return document.readyState") == "complete"
            except WebDriverException:                 # page scripts off: fall back to the heading
                return bool(d.find_elements(By.TAG_NAME, "h1"))

        WebDriverWait(self.driver, 20).until(loaded)

    def click(self, element: Any) -> None:
        """Click and wait until the next page replaced this one and finished loading."""
        from selenium.webdriver.common.by import By

        old = self.driver.find_element(By.TAG_NAME, "html")
        element.click()
        self.wait_replaced(old)

    def wait_replaced(self, old: Any) -> None:
        """Wait until ``old`` (the previous page's <html>) is gone and the new page has loaded."""
        from selenium.common.exceptions import (
            StaleElementReferenceException,
            WebDriverException,
        )
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        def gone(_: Any) -> bool:
            try:
                old.is_enabled()
                return False
            except StaleElementReferenceException:
                return True
            except WebDriverException as e:       # Chrome, mid-navigation: the node's document is gone
                if "does not belong to the document" in str(e):
                    return True
                raise

        WebDriverWait(self.driver, 20).until(gone)
        WebDriverWait(self.driver, 20).until(lambda d: d.find_elements(By.TAG_NAME, "h1"))
        self.settle()

    @property
    def title(self) -> str:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.TAG_NAME, "h1").text

    @property
    def text(self) -> str:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.TAG_NAME, "main").text

    def alert(self) -> str:
        from selenium.webdriver.common.by import By

        found = self.driver.find_elements(By.CSS_SELECTOR, "[role=alert]")
        return found[0].text if found else ""

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def clear_cookies(self) -> None:
        self.driver.delete_all_cookies()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    yield from _browser(tmp_path_factory, javascript=True)


@pytest.fixture(scope="module")
def browser_nojs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    """The same Chromium with JavaScript switched off (the pages must not need it)."""
    yield from _browser(tmp_path_factory, javascript=False)


def _browser(tmp_path_factory: pytest.TempPathFactory, *, javascript: bool) -> Iterator[Browser]:
    for exe in (CHROMIUM, CHROMEDRIVER):
        if not Path(exe).exists():
            raise RuntimeError(f"{exe} is missing: run tests/setup-and-run.sh (it installs chromium and chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--disable-features=PasswordLeakDetection,AutofillServerCommunication",
                 "--password-store=basic", f"--user-data-dir={profile}", "--window-size=900,1000", "--lang=en-US"):
        opts.add_argument(flag)
    if not javascript:
        opts.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    shots = ARTIFACTS / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    try:
        yield Browser(driver, shots)
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
