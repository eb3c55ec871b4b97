"""Shared fixtures: small real weights made on the spot, and the read-only data sets.

The photos and odd image files ship with the repository (tests/assets, see its SOURCES.md); only the
CIFAR-10 subset, which states no licence, comes from ../shared/data (or MEC_HUB_TEST_DATA).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Shipped with the repository: photos/ and odd-images/ (byte-identical copies of ../shared/data's).
SHIPPED_DATA_DIR = Path(__file__).resolve().parent / "assets"
# MEC_HUB_TEST_DATA points the tests at another copy of the data (and lets a test point it nowhere).
DATA_DIR = Path(os.environ.get("MEC_HUB_TEST_DATA") or REPO_ROOT.parent / "shared" / "data")


# Caches (URL downloads, the ONNX exports mec-embed runs by default) go to one folder per test session,
# never to the user's ~/.cache: a model exported once is found again by the tests that follow.
if not os.environ.get("MEC_HUB_CACHE"):
    _CACHE = tempfile.mkdtemp(prefix="mec-hub-test-cache-")
    os.environ["MEC_HUB_CACHE"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)


def _require(path: Path) -> Path:
    """``path``, or a skip when it is missing: a failure under CI, where missing data must not pass silently."""
    if not path.exists():
        if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
            pytest.fail(
                f"shared data not found at {path}, and CI={os.environ['CI']} does not skip tests needing it "
                f"(set MEC_HUB_TEST_DATA to the data folder)",
                pytrace=False,
            )
        pytest.skip(f"shared data not found at {path}")
    return path


@pytest.fixture(autouse=True)
def _restore_warning_display():
    """The CLIs print warnings as one line (``show_warnings_briefly`` replaces ``warnings.showwarning``);
    every test gets the display it started with back, so that no CLI run leaks into the next test."""
    saved = warnings.showwarning
    yield
    warnings.showwarning = saved


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _require(DATA_DIR)


def _shipped(name: str) -> Path:
    """``tests/assets/<name>``; a failure, never a skip, when it is missing: it comes with every clone."""
    path = SHIPPED_DATA_DIR / name
    if not path.is_dir():
        pytest.fail(f"test data not found at {path}: it ships with the repository (tests/assets)", pytrace=False)
    return path


@pytest.fixture(scope="session")
def photos_dir() -> Path:
    """18 real photos (tests/assets/photos). Read-only: a test that changes files copies them first."""
    return _shipped("photos")


@pytest.fixture(scope="session")
def odd_images_dir() -> Path:
    """30 unusual or broken image files and their MANIFEST.tsv (tests/assets/odd-images). Read-only."""
    return _shipped("odd-images")


@pytest.fixture(scope="session")
def cifar_dir(data_dir: Path) -> Path:
    return _require(data_dir / "cifar10-subset")


@pytest.fixture(scope="session")
def tiny_weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Session-wide read-only folder; copy it before changing anything in it."""
    # Imported here, not above: tests/test_data_fixtures.py runs a copy of this file on its own.
    from tests.support.weights import make_tiny_hub_folder

    return make_tiny_hub_folder(tmp_path_factory.mktemp("weights") / "tiny")


@pytest.fixture
def memory_cap():
    """``with memory_cap(extra_bytes):`` caps this process's address space at its current size plus
    ``extra_bytes`` (``RLIMIT_AS``, soft limit only, restored afterwards), so a reader that believes a
    hostile header and allocates for it fails with ``MemoryError`` inside the block instead of taking
    the machine. Skips where ``resource`` is missing (Windows)."""
    import contextlib

    resource = pytest.importorskip("resource")

    def current_size() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")

    @contextlib.contextmanager
    def cap(extra_bytes: int = 512 * 1024 * 1024):
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = current_size() + extra_bytes
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        try:
            yield limit
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))

    return cap


@pytest.fixture()
def opened_files():
    """Every file this process opens while the list is live (a ``sys.audit`` hook, inert afterwards)."""
    seen: list[str] = []
    live = [True]

    def hook(event: str, args: tuple) -> None:
        if live[0] and event == "open" and isinstance(args[0], str | bytes | os.PathLike):
            seen.append(os.fsdecode(args[0]))

    sys.addaudithook(hook)
    yield seen
    live[0] = False
