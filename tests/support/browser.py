"""A uvicorn server on 127.0.0.1 in a thread, and headless Chromium driven by Selenium, for the
browser tests of ``mec-hub serve`` (``tests/apps/conftest.py`` makes them fixtures)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

WAIT_S = 30
# Installed before any page script runs (through the DevTools protocol, so the page's CSP does not
# apply to it): records the page's uncaught script errors and Content-Security-Policy violations.
RECORDER = """
window.__problems = [];
window.addEventListener("error", (e) => window.__problems.push("error: " + e.message));
window.addEventListener("unhandledrejection", (e) => window.__problems.push("rejection: " + e.reason));
document.addEventListener("securitypolicyviolation",
  (e) => window.__problems.push("CSP: " + e.violatedDirective + " " + e.blockedURI));
"""


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """``app`` served by uvicorn on a free port of 127.0.0.1 until the block ends; yields its URL."""
    uvicorn = pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
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
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(WAIT_S)
        sock.close()


def _chromium() -> tuple[str, str] | None:
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None
    )
    return (browser, driver) if browser and driver else None


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[Any]:
    """Headless Chromium with ``RECORDER`` installed (skips the test when Chromium or its driver is missing)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (dev extra) is not installed")
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
        "--disable-dev-shm-usage", "--window-size=1280,1000", f"--user-data-dir={profile}",
    ):  # fmt: skip
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service(found[1]))
    try:
        browser.set_page_load_timeout(WAIT_S)
        browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORDER})
        yield browser
    finally:
        browser.quit()
