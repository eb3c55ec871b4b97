"""A plain URL's download: every read is bounded, and only a complete file is ever cached.

The server is the fake Hub of tests/support/fakehub.py on 127.0.0.1, told to pause halfway through the
file (``stall``) or to close the connection halfway (``cut``). torch.hub's downloader, used before,
waited forever on a server that stopped sending and let ``http.client.IncompleteRead`` escape.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

import mec_hub
from mec_hub.errors import WeightsNotFoundError
from mec_hub.weights.integrity import UnverifiedWeightsWarning
from tests.support.fakehub import FakeHub, folder_files
from tests.support.weights import make_tiny_hub_folder

REPO = "mec-test/tiny_url"
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_hub_folder(tmp_path_factory.mktemp("url") / "tiny", seed=4)


@pytest.fixture
def hub(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("MEC_HUB_OFFLINE", raising=False)
    server = FakeHub()
    server.repo(REPO).add_commit(folder_files(folder))
    server.start()
    yield server
    server.stop()


def _url(hub: FakeHub) -> str:
    return f"{hub.endpoint}/{REPO}/resolve/main/model.safetensors"


def _load(url: str, cache: Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnverifiedWeightsWarning)  # no digest given: not the subject here
        return mec_hub.load(weights=url, cache_dir=cache)


def _cached_files(cache: Path) -> list[Path]:
    return [path for path in (cache / "urls").rglob("*") if path.is_file()] if (cache / "urls").exists() else []


def _assert_is_the_folders_model(model: torch.nn.Module, folder: Path) -> None:
    reference = mec_hub.load(weights=folder)
    with torch.no_grad():
        torch.testing.assert_close(model(X), reference(X), rtol=0, atol=0)


def test_a_server_that_stops_sending_is_given_up_on_and_a_slow_one_is_not(hub, folder, tmp_path, monkeypatch):
    hub.stall[(REPO, "model.safetensors")] = 2.0
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 0.5)
    started = time.monotonic()
    with pytest.raises(WeightsNotFoundError) as info:
        _load(_url(hub), tmp_path)
    assert time.monotonic() - started < 1.9  # given up after the read timeout, not after the pause
    message = str(info.value)
    assert "\n" not in message and "sent nothing for 0.5 s" in message and "HF_HUB_DOWNLOAD_TIMEOUT" in message
    assert _cached_files(tmp_path) == []  # no partial file left, none published

    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 5.0)  # the same pause, now within the timeout
    _assert_is_the_folders_model(_load(_url(hub), tmp_path), folder)


def test_a_connection_closed_halfway_caches_nothing_and_the_next_try_downloads(hub, folder, tmp_path):
    hub.cut.add((REPO, "model.safetensors"))
    with pytest.raises(WeightsNotFoundError) as info:
        _load(_url(hub), tmp_path)
    message = str(info.value)
    assert "\n" not in message and "ended before the whole file arrived" in message and "bytes missing" in message
    assert _cached_files(tmp_path) == []

    hub.cut.clear()
    _assert_is_the_folders_model(_load(_url(hub), tmp_path), folder)
    assert hub.downloads("model.safetensors") == 2
