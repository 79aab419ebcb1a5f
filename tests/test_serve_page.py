"""The search page at `/` in a real headless Chromium (Debian's chromium + chromedriver,
driven by Selenium): upload a photo, see ranked thumbnails, record feedback; the checks
read the screenshot's pixels, not only the HTML."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from catalog_factory import GeneratedCatalog, make_catalog
from click.testing import CliRunner
from PIL import Image
from serve_harness import Server, running_server
from sqlalchemy import select

from searchsvc.cli import main
from searchsvc.core.config import load_settings
from searchsvc.storage.db import Database, Feedback

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
        reason="needs Debian's chromium and chromium-driver packages (.ci/run installs them)",
    ),
]


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GeneratedCatalog, Server]]:
    root = tmp_path_factory.mktemp("page")
    catalog = make_catalog(root / "catalog", products=8, views=2)
    home = root / "home"
    result = CliRunner().invoke(
        main, ["--home", str(home), "ingest", str(catalog.root), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    with running_server(home) as server:
        yield catalog, server


@pytest.fixture
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument("--window-size=1200,900")
    options.add_argument("--force-device-scale-factor=1")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_upload_shows_ranked_thumbnails_and_records_feedback(
    shop: tuple[GeneratedCatalog, Server], browser: object, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    catalog, server = shop
    driver: Any = browser
    driver.get(server.url + "/")
    photo = catalog.held_out["p002"]
    file_input = driver.find_element(By.ID, "file")
    driver.execute_script("arguments[0].hidden = false;", file_input)
    driver.find_element(By.ID, "top-k").clear()
    driver.find_element(By.ID, "top-k").send_keys("5")
    file_input.send_keys(str(photo))

    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-count") == "5")
    # Every thumbnail decoded (fetched from /v1/images with the API's own auth path).
    wait.until(
        lambda d: d.execute_script(
            "return [...document.querySelectorAll('.result img')]"
            ".every(i => i.complete && i.naturalWidth > 0)"
        )
    )
    cards = driver.find_elements(By.CSS_SELECTOR, ".result")
    assert len(cards) == 5
    assert cards[0].get_attribute("data-product-id") == "p002"
    assert cards[0].find_element(By.CSS_SELECTOR, ".title").text == "Product 2"
    meta = cards[0].find_element(By.CSS_SELECTOR, ".meta").text
    assert catalog.categories["p002"] in meta and "rank 1 (first stage 1)" in meta
    assert "5 results" in driver.find_element(By.ID, "status").text

    shot = tmp_path / "page.png"
    driver.save_screenshot(str(shot))
    keep = os.environ.get("SEARCHSVC_TEST_SCREENSHOT_DIR")
    if keep:
        shutil.copy(shot, Path(keep) / "serve-page.png")
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    for card in cards:
        rect = card.find_element(By.CSS_SELECTOR, "img").rect
        x0, y0 = int(rect["x"]) + 2, int(rect["y"]) + 2
        x1, y1 = int(rect["x"] + rect["width"]) - 2, int(rect["y"] + rect["height"]) - 2
        assert y1 <= pixels.shape[0], "thumbnail below the screenshot"
        region = pixels[y0:y1, x0:x1]
        # Not the page's blank placeholder (#eee): the product's coloured photo.
        assert region.std() > 10, card.get_attribute("data-product-id")
        assert np.abs(region.mean(axis=(0, 1)) - 238).max() > 15
    # The top thumbnail shows the top product: its colours match that product's photo.
    first_rect = cards[0].find_element(By.CSS_SELECTOR, "img").rect
    region = pixels[
        int(first_rect["y"]) + 2 : int(first_rect["y"] + first_rect["height"]) - 2,
        int(first_rect["x"]) + 2 : int(first_rect["x"] + first_rect["width"]) - 2,
    ]
    source = sorted((catalog.root / "p002").iterdir())[0]
    expected = np.asarray(Image.open(source).convert("RGB"), dtype=np.float32).mean(axis=(0, 1))
    assert np.abs(region.mean(axis=(0, 1)) - expected).max() < 25

    cards[0].find_element(By.CSS_SELECTOR, "button.right").click()
    wait.until(lambda d: "recorded: right" in d.find_elements(By.CSS_SELECTOR, ".result")[0].text)
    home = Path(str(server.log).removesuffix(".log").replace("serve-", "", 1))
    db = Database(load_settings(env={"SEARCHSVC_HOME": str(home)}).sqlalchemy_url)
    try:
        with db.session() as session:
            rows = list(session.scalars(select(Feedback)))
            assert [(r.product_id, r.positive) for r in rows] == [("p002", True)]
    finally:
        db.dispose()
