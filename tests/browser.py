"""Headless Chromium for the UI tests (selenium + Debian's chromium and chromium-driver)."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

DRIVER = "chromedriver"
SETTLE_S = 6.0  # the MLflow UI renders after its API calls return; a fixed settle keeps the checks simple


def browser_missing() -> str:
    """Why no browser test can run here ("" when it can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if not (shutil.which("chromium") and shutil.which(DRIVER)):
        return "chromium and chromium-driver are not installed (make browser, or apt-get install chromium chromium-driver)"
    return ""


class Browser:
    """One headless Chromium on the MLflow UI at ``base``; ``open`` returns the page's text and saves a
    screenshot named ``name`` under ``shots``."""

    def __init__(self, base: str, shots: Path) -> None:
        self.base, self.shots = base.rstrip("/"), shots

    def __enter__(self) -> Browser:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
            options.add_argument(arg)
        options.binary_location = shutil.which("chromium")
        self.driver = webdriver.Chrome(service=Service(shutil.which(DRIVER)), options=options)
        self.shots.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc) -> None:
        self.driver.quit()

    @property
    def url(self) -> str:
        return self.driver.current_url

    def _load(self, address: str, name: str) -> str:
        from selenium.webdriver.common.by import By

        self.driver.get(address)
        time.sleep(SETTLE_S)
        self.driver.save_screenshot(str(self.shots / f"{name}.png"))
        return self.driver.find_element(By.TAG_NAME, "body").text

    def open(self, route: str, name: str) -> str:
        """A route of the UI in its model-training view (MLflow 3's UI otherwise opens on GenAI pages)."""
        joiner = "&" if "?" in route else "?"
        return self._load(f"{self.base}/#{route}{joiner}workflowType=machine_learning", name)

    def open_file(self, path: Path, name: str) -> str:
        return self._load(path.resolve().as_uri(), name)

    def image_widths(self) -> list[int]:
        """Natural widths of the page's images (0: not loaded)."""
        from selenium.webdriver.common.by import By

        return [int(self.driver.execute_script("return arguments[0].naturalWidth", image))
                for image in self.driver.find_elements(By.TAG_NAME, "img")]
