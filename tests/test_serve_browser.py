"""``mec-hub serve`` in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``) driven by Selenium against a uvicorn server started here on 127.0.0.1.

The grid renders the file's photos, a click lists k neighbours with the clicked photo first, and
an uploaded photo finds its own row first. A screenshot is saved in the test's tmp folder.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the serve extra (starlette) is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (dev extra) is not installed")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from mec_hub.apps import serve  # noqa: E402
from mec_hub.data.featurefile import FeatureFile  # noqa: E402

K = 4
WAIT_S = 30


def _chromium() -> tuple[str, str] | None:
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None
    )
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def server(photos_dir: Path, tiny_weights_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from mec_hub.embedding.engine import Embedder

    root = tmp_path_factory.mktemp("serve-browser")
    out = root / "feats.npy"
    Embedder(weights=tiny_weights_dir, device="cpu", num_workers=0).embed_folder(photos_dir, out, progress=False)
    app = serve.create_app(serve.NeighbourBrowser(FeatureFile.open(out), device="cpu"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", (root / "feats.paths.txt").read_text().splitlines()
    server.should_exit = True
    thread.join(WAIT_S)
    sock.close()


@pytest.fixture()
def driver(tmp_path: Path):
    found = _chromium()
    if found is None:
        pytest.skip("no chromium binary and chromedriver (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look for a driver online
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1280,1000", f"--user-data-dir={tmp_path / 'profile'}",
    ):  # fmt: skip
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service(found[1]))
    browser.set_page_load_timeout(WAIT_S)
    yield browser
    browser.quit()


def _neighbour_rows(browser) -> list[int]:
    return [int(e.get_attribute("data-row")) for e in browser.find_elements(By.CSS_SELECTOR, "#neighbours .cell")]


def test_grid_click_and_upload_in_headless_chromium(driver, server, photos_dir: Path, tmp_path: Path):
    url, paths = server
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
