"""The ``mec-hub serve`` page in a real browser (headless Chromium driven by Selenium, against a
uvicorn server started here on 127.0.0.1): the query shown beside its neighbours, a failed upload
clearing the results and saying why, the full-size view, "more like this", all of it by keyboard.

Neighbours are checked against a cosine search written here with NumPy over the feature file.
The ``/image/I`` route behind the full-size view is checked with Starlette's TestClient first.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette", reason="the serve extra (starlette) is not installed")
httpx = pytest.importorskip("httpx", reason="starlette's TestClient needs httpx")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (dev extra) is not installed")

from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from mec_hub.apps import serve  # noqa: E402
from mec_hub.data.featurefile import FeatureFile  # noqa: E402

K = 5
from tests.support.browser import WAIT_S  # noqa: E402

UPLOAD = {"X-Requested-With": "mec-hub", "Content-Type": "application/octet-stream"}  # as the page sends it


# --------------------------------------------------------------------------- the full-size image route


def test_the_image_route_serves_the_full_image_inside_the_set_only(tmp_path: Path):
    folder = tmp_path / "set"
    folder.mkdir()
    Image.new("RGB", (300, 200), (0, 120, 0)).save(folder / "small.png")
    Image.new("RGB", (3000, 1500), (0, 0, 200)).save(folder / "wide.png")
    Image.new("RGB", (40, 40), (250, 0, 0)).save(tmp_path / "secret.png")
    names = ["small.png", "wide.png", "../secret.png", str(tmp_path / "secret.png"), "missing.png"]
    np.save(folder / "feats.npy", np.eye(len(names), 4, dtype=np.float32))
    (folder / "feats.paths.txt").write_text("".join(n + "\n" for n in names))
    app = serve.create_app(serve.NeighbourBrowser(FeatureFile.open(folder / "feats.npy"), device="cpu"))
    with TestClient(app, base_url="http://127.0.0.1:8000", raise_server_exceptions=False) as client:
        sizes = {}
        for row in (0, 1):
            answer = client.get(f"/image/{row}")
            assert answer.status_code == 200, answer.text
            assert answer.headers["content-type"] == "image/jpeg"
            picture = Image.open(io.BytesIO(answer.content))
            sizes[row] = picture.size
            assert picture.getpixel((picture.width // 2, picture.height // 2))[2 if row else 1] > 100
        assert sizes == {0: (300, 200), 1: (serve.FULL_SIZE, serve.FULL_SIZE // 2)}  # full size, at most FULL_SIZE
        for row in (2, 3, 4):  # climbing out, absolute, not there: the one 404
            answer = client.get(f"/image/{row}")
            assert answer.status_code == 404, (row, answer.text)
            assert answer.json() == {"error": serve.NO_IMAGE}
        for url in ("/image/5", "/image/-1", "/image/..%2Fsecret.png"):
            answer = client.get(url)
            assert answer.status_code in (404, 422), (url, answer.text)
            assert answer.headers["content-type"].startswith("application/json")
        answer = client.get("/image/0", headers={"Sec-Fetch-Site": "cross-site"})
        assert answer.status_code == 403 and "refused" in answer.json()["error"]
        policy = client.get("/").headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src 'self'" in policy and "img-src 'self' blob:" in policy


# --------------------------------------------------------------------------- the page in Chromium


def reference(matrix: np.ndarray, row: int) -> np.ndarray:
    """The cosine similarity of every row to row ``row``, in float64."""
    m = matrix.astype(np.float64)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    return m @ m[row]


def open_page(driver, served_photos) -> WebDriverWait:
    wait = WebDriverWait(driver, WAIT_S)
    driver.get(served_photos.url + "/")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid .cell")) == len(served_photos.paths))
    k = driver.find_element(By.ID, "k")
    k.clear()
    k.send_keys(str(K))
    return wait


def results(driver) -> list[tuple[int, float]]:
    """(row, score) of each result on show."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#neighbours .cell')]"
        ".map(c => [Number(c.dataset.row), Number(c.querySelector('.score').textContent)])"
    )


def query_row(driver) -> str | None:
    return driver.execute_script("return document.getElementById('query').dataset.row ?? null")


def wait_for_row_query(wait: WebDriverWait, row: int) -> None:
    wait.until(lambda d: query_row(d) == str(row) and len(results(d)) == K)


def check_row_neighbours(driver, served_photos, row: int) -> None:
    """The results are the K rows nearest to ``row``, itself first, as NumPy finds them."""
    scores = reference(served_photos.matrix, row)
    shown = results(driver)
    assert shown[0][0] == row and shown[0][1] == pytest.approx(1.0, abs=1e-3)
    np.testing.assert_allclose([s for _, s in shown], np.sort(scores)[::-1][:K], atol=2e-3)
    np.testing.assert_allclose([s for _, s in shown], scores[[r for r, _ in shown]], atol=2e-3)
    assert len({r for r, _ in shown}) == K


def loaded_size(driver, css: str) -> tuple[int, int]:
    WebDriverWait(driver, WAIT_S).until(
        lambda d: d.execute_script(
            "const i = document.querySelector(arguments[0]); return i.complete && i.naturalWidth > 0", css
        )
    )
    return tuple(
        driver.execute_script(
            "const i = document.querySelector(arguments[0]); return [i.naturalWidth, i.naturalHeight]", css
        )
    )


def viewer_open(driver) -> bool:
    return driver.execute_script("return document.getElementById('viewer').open")


def press(driver, key: str) -> None:
    ActionChains(driver).send_keys(key).perform()


def tab_to(driver, css: str, limit: int = 40):
    """Press Tab until the focused element matches ``css``; it, with its focus drawn visibly."""
    for _ in range(limit):
        press(driver, Keys.TAB)
        if driver.execute_script("return document.activeElement.matches(arguments[0])", css):
            focused = driver.switch_to.active_element
            outline = driver.execute_script(
                "const s = getComputedStyle(document.activeElement); return [s.outlineStyle, s.outlineWidth]"
            )
            assert outline[0] != "none" and outline[1] != "0px", (css, outline)
            return focused
    raise AssertionError(f"{limit} Tabs never reached {css}")


def no_page_problems(driver) -> None:
    assert driver.execute_script("return window.__problems") == []


def test_upload_shows_the_query_then_a_failed_upload_clears_and_says_why(driver, served_photos, photos_dir, tmp_path):
    wait = open_page(driver, served_photos)
    name = "skimage-rocket.jpg"
    driver.find_element(By.ID, "upload").send_keys(str(photos_dir / name))
    wait.until(lambda d: len(results(d)) == K and name in d.find_element(By.ID, "results-title").text)
    assert results(driver)[0][0] == served_photos.paths.index(name)
    assert results(driver)[0][1] == pytest.approx(1.0, abs=2e-3)
    query = driver.find_element(By.CSS_SELECTOR, "#query img")
    blob = query.get_attribute("src")
    assert blob.startswith("blob:") and query.is_displayed()
    assert loaded_size(driver, "#query img") == Image.open(photos_dir / name).size  # the uploaded file itself
    assert name in driver.find_element(By.ID, "query").text
    assert query_row(driver) is None
    # A fresh copy of the query image loads while it is on show (and not once it is let go, below).
    load_blob = (
        "const i = new Image(); i.onload = () => arguments[1]('ok'); i.onerror = () => arguments[1]('gone');"
        " i.src = arguments[0] + '#' + Math.random()"
    )
    assert driver.execute_async_script(load_blob, blob) == "ok"

    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"these are words, not pixels\n" * 20)
    why = httpx.post(f"{served_photos.url}/api/search?k={K}", content=bad.read_bytes(), headers=UPLOAD)
    assert why.status_code == 422
    reason = why.json()["error"]
    driver.find_element(By.ID, "upload").send_keys(str(bad))
    message = driver.find_element(By.ID, "message")
    wait.until(lambda d: reason in message.text)
    assert bad.name in message.text and message.is_displayed()
    assert "error" in message.get_attribute("class").split()
    assert message.get_attribute("aria-live") == "polite" and message.get_attribute("role") == "status"
    assert not driver.find_element(By.ID, "results").is_displayed()
    assert results(driver) == [] and driver.find_elements(By.CSS_SELECTOR, "#query img") == []
    assert driver.execute_async_script(load_blob, blob) == "gone"  # the old query's image was let go
    no_page_problems(driver)


def test_a_result_opens_full_size_and_escape_or_close_gives_the_focus_back(driver, served_photos, photos_dir):
    wait = open_page(driver, served_photos)
    row = served_photos.paths.index("skimage-retina.jpg")  # 1411 x 1411: far larger than a thumbnail
    driver.find_element(By.CSS_SELECTOR, f'#grid .cell[data-row="{row}"] button').click()
    wait_for_row_query(wait, row)
    first = driver.find_element(By.CSS_SELECTOR, "#neighbours .cell:nth-child(1) button.open")
    first.click()
    wait.until(viewer_open)
    image = driver.find_element(By.ID, "viewer-image")
    assert image.get_attribute("src") == f"{served_photos.url}/image/{row}" and image.is_displayed()
    assert loaded_size(driver, "#viewer-image") == Image.open(photos_dir / "skimage-retina.jpg").size
    assert "skimage-retina.jpg" in driver.find_element(By.ID, "viewer-caption").text
    assert driver.switch_to.active_element == driver.find_element(By.ID, "viewer-close")
    press(driver, Keys.ESCAPE)
    wait.until(lambda d: not viewer_open(d))
    assert not image.is_displayed()
    assert driver.switch_to.active_element == first

    second = driver.find_element(By.CSS_SELECTOR, "#neighbours .cell:nth-child(2)")
    other = int(second.get_attribute("data-row"))
    second.find_element(By.CSS_SELECTOR, "button.open").click()
    wait.until(
        lambda d: (
            viewer_open(d) and d.find_element(By.ID, "viewer-image").get_attribute("src").endswith(f"/image/{other}")
        )
    )
    assert loaded_size(driver, "#viewer-image") == Image.open(photos_dir / served_photos.paths[other]).size
    driver.find_element(By.ID, "viewer-close").click()
    wait.until(lambda d: not viewer_open(d))
    assert driver.switch_to.active_element == second.find_element(By.CSS_SELECTOR, "button.open")
    no_page_problems(driver)


def test_more_like_this_makes_that_row_the_query(driver, served_photos, photos_dir):
    wait = open_page(driver, served_photos)
    driver.find_element(By.ID, "upload").send_keys(str(photos_dir / "skimage-coffee.png"))
    wait.until(lambda d: len(results(d)) == K)
    third = driver.find_element(By.CSS_SELECTOR, "#neighbours .cell:nth-child(3)")
    row = int(third.get_attribute("data-row"))
    assert row != results(driver)[0][0]
    third.find_element(By.CSS_SELECTOR, "button.more").click()
    wait_for_row_query(wait, row)
    check_row_neighbours(driver, served_photos, row)
    assert driver.find_element(By.CSS_SELECTOR, "#query img").get_attribute("src") == f"{served_photos.url}/thumb/{row}"
    assert loaded_size(driver, "#query img")[0] > 0
    assert served_photos.paths[row] in driver.find_element(By.ID, "results-title").text
    assert driver.find_element(By.ID, "message").text == ""
    no_page_problems(driver)


def test_everything_works_from_the_keyboard_alone(driver, served_photos):
    wait = WebDriverWait(driver, WAIT_S)
    driver.get(served_photos.url + "/")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid .cell")) == len(served_photos.paths))
    tab_to(driver, "#k")
    press(driver, Keys.CONTROL + "a")
    press(driver, str(K))
    row = served_photos.paths.index("skimage-chelsea.png")
    tab_to(driver, f'#grid .cell[data-row="{row}"] button')
    press(driver, Keys.ENTER)
    wait_for_row_query(wait, row)
    check_row_neighbours(driver, served_photos, row)
    assert driver.switch_to.active_element == driver.find_element(By.ID, "results-title")

    opener = tab_to(driver, "#neighbours .cell:nth-child(1) button.open")
    press(driver, Keys.SPACE)
    wait.until(viewer_open)
    assert driver.find_element(By.ID, "viewer-image").get_attribute("src") == f"{served_photos.url}/image/{row}"
    press(driver, Keys.ESCAPE)
    wait.until(lambda d: not viewer_open(d))
    assert driver.switch_to.active_element == opener

    more = tab_to(driver, "#neighbours .cell:nth-child(2) button.more", limit=4)
    other = int(driver.execute_script("return arguments[0].closest('.cell').dataset.row", more))
    press(driver, Keys.ENTER)
    wait_for_row_query(wait, other)
    check_row_neighbours(driver, served_photos, other)
    no_page_problems(driver)
