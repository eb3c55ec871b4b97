"""``mec-hub serve`` in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``) driven by Selenium against a uvicorn server started here on 127.0.0.1.

The grid renders the file's photos, a click lists k neighbours with the clicked photo first, and
an uploaded photo finds its own row first. A screenshot is saved in the test's tmp folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the serve extra (starlette) is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (dev extra) is not installed")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

K = 4
from tests.support.browser import WAIT_S  # noqa: E402


def _neighbour_rows(browser) -> list[int]:
    return [int(e.get_attribute("data-row")) for e in browser.find_elements(By.CSS_SELECTOR, "#neighbours .cell")]


def test_grid_click_and_upload_in_headless_chromium(driver, served_photos, photos_dir: Path, tmp_path: Path):
    url, paths = served_photos.url, served_photos.paths
    wait = WebDriverWait(driver, WAIT_S)
    driver.get(url + "/")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid .cell")) == len(paths))
    cells = driver.find_elements(By.CSS_SELECTOR, "#grid .cell")
    assert [c.get_attribute("title") for c in cells] == paths
    # Every thumbnail decoded to a real image (naturalWidth > 0), not a broken icon.
    wait.until(
        lambda d: d.execute_script(
            "return [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)"
        )
    )

    driver.find_element(By.ID, "k").clear()
    driver.find_element(By.ID, "k").send_keys(str(K))
    row = paths.index("skimage-coffee.png")
    cells[row].click()
    wait.until(lambda d: len(_neighbour_rows(d)) == K)
    assert _neighbour_rows(driver)[0] == row
    scores = [float(e.text) for e in driver.find_elements(By.CSS_SELECTOR, "#neighbours .score")]
    assert scores[0] == pytest.approx(1.0, abs=1e-4) and scores == sorted(scores, reverse=True)
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(tmp_path / "neighbours.png"))

    name = "skimage-rocket.jpg"
    driver.find_element(By.ID, "upload").send_keys(str(photos_dir / name))
    wait.until(EC.text_to_be_present_in_element((By.ID, "results-title"), name))
    wait.until(lambda d: len(_neighbour_rows(d)) == K)
    assert _neighbour_rows(driver)[0] == paths.index(name)
    assert driver.find_element(By.ID, "message").text == ""
    driver.save_screenshot(str(tmp_path / "upload.png"))
    assert (tmp_path / "upload.png").stat().st_size > 10_000
