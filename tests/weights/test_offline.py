"""hf-hub: weights without a network: an endpoint that cannot be reached fails at once with what to do, or
serves the cached copy; HF_HUB_OFFLINE reads the cache and asks nothing; a slow download is not cut short.

The endpoints are on 127.0.0.1: a closed port (connection refused), a socket that accepts connections and
never answers (a blackhole), and the fake Hub of tests/support/fakehub.py, which counts the requests it gets.
Before the fix a closed port took ~25 s (huggingface_hub's retries) and a blackhole ~400 s; the bound
asserted on a failure's latency is 5 s, for a target of 2 s.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm  # noqa: F401  (imported before any timed call: mec_hub.load imports it on first use)
import torch
from huggingface_hub import constants

import mec_hub
import mec_hub.models.loading  # before any timed call, as timm
from mec_hub.errors import WeightsNotFoundError
from mec_hub.weights.reach import unreachable
from tests.support.fakehub import FakeHub, folder_files
from tests.support.weights import make_tiny_hub_folder

REPO = "mec-test/tiny_offline"
BOUND_S = 5.0
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_hub_folder(tmp_path_factory.mktemp("offline") / "tiny", seed=3)


@pytest.fixture
def hub(folder: Path) -> Iterator[FakeHub]:
    server = FakeHub()
    server.commit = server.repo(REPO).add_commit(folder_files(folder))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def closed_port() -> str:
    """An address where nothing listens: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A socket that accepts connections (the kernel's backlog does) and never answers a byte."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("MEC_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_ETAG_TIMEOUT", raising=False)


def _load(endpoint: str, cache: Path, spec: str = f"hf-hub:{REPO}") -> tuple[float, object]:
    """(seconds, the model or the error's message) of one load."""
    started = time.monotonic()
    try:
        model = mec_hub.load(weights=spec, cache_dir=cache, endpoint=endpoint)
    except WeightsNotFoundError as exc:
        return time.monotonic() - started, str(exc)
    return time.monotonic() - started, model


def _output(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


@pytest.mark.parametrize("kind", ["closed_port", "blackhole"])
def test_an_unreachable_endpoint_fails_at_once_saying_what_to_do(kind, request, tmp_path, online):
    endpoint = request.getfixturevalue(kind)
    seconds, message = _load(endpoint, tmp_path / "empty")
    assert isinstance(message, str), "an unreachable endpoint and an empty cache cannot load"
    assert seconds < BOUND_S, f"{seconds:.1f} s to fail"
    assert "\n" not in message
    assert f"hf-hub:{REPO}" in message and f"the Hub at {endpoint} cannot be reached" in message
    assert ("connection refused" if kind == "closed_port" else "no answer within 1.5 s") in message
    # What to do: a cached copy from a connected machine read with HF_HUB_OFFLINE=1, or a local folder.
    assert "on a connected machine" in message and "HF_HUB_OFFLINE=1" in message
    assert "weights=PATH" in message and f"`hf download {REPO} --local-dir DIR`" in message


def test_a_slow_link_can_wait_longer_for_the_first_answer(blackhole, tmp_path, online, monkeypatch):
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "0.5")
    _, message = _load(blackhole, tmp_path / "empty")
    assert isinstance(message, str) and "no answer within 0.5 s" in message
    assert "set HF_HUB_ETAG_TIMEOUT to more seconds" in message


@pytest.mark.parametrize("kind", ["closed_port", "blackhole"])
def test_an_unreachable_endpoint_serves_the_cached_copy(kind, request, hub, folder, tmp_path, online):
    cache = tmp_path / "hf"
    _, first = _load(hub.endpoint, cache)
    _, reference = _load("unused", cache, spec=str(folder))
    seconds, again = _load(request.getfixturevalue(kind), cache)
    assert not isinstance(again, str), again
    assert seconds < BOUND_S, f"{seconds:.1f} s to fall back to the cache"
    torch.testing.assert_close(_output(again), _output(reference), rtol=0, atol=0)
    assert again.weights_sha256 == first.weights_sha256


def test_offline_mode_loads_the_cached_copy_without_a_request(hub, folder, tmp_path, online, monkeypatch):
    cache = tmp_path / "hf"
    _, first = _load(hub.endpoint, cache)
    asked = len(hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets when huggingface_hub loads
    _, again = _load(hub.endpoint, cache)
    assert not isinstance(again, str), again
    assert len(hub.requests) == asked  # not one request, not even the reachability probe
    torch.testing.assert_close(_output(again), _output(first), rtol=0, atol=0)


def test_offline_mode_with_an_empty_cache_fails_at_once_saying_so(hub, tmp_path, online, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    seconds, message = _load(hub.endpoint, tmp_path / "empty")
    assert isinstance(message, str) and seconds < BOUND_S
    assert hub.requests == []
    assert f"hf-hub:{REPO}" in message and "offline mode is on (HF_HUB_OFFLINE=1)" in message
    assert "once while online" in message and "weights=PATH" in message


def test_a_pinned_commit_in_the_cache_asks_nothing(hub, tmp_path, online):
    cache = tmp_path / "hf"
    spec = f"hf-hub:{REPO}@{hub.commit}"
    _load(hub.endpoint, cache, spec=spec)
    asked = len(hub.requests)
    _, again = _load(hub.endpoint, cache, spec=spec)
    assert not isinstance(again, str), again
    assert len(hub.requests) == asked


@pytest.mark.slow  # 3 s of a deliberately stalled download
def test_the_short_wait_is_for_the_first_answer_not_for_the_download(hub, folder, tmp_path, online):
    """A file whose bytes pause for longer than the wait for the first answer still downloads."""
    hub.stall[(REPO, "model.safetensors")] = 2.5  # > REACH_TIMEOUT_S (1.5 s), < HF_HUB_DOWNLOAD_TIMEOUT (10 s)
    _, model = _load(hub.endpoint, tmp_path / "hf")
    assert not isinstance(model, str), model
    _, reference = _load("unused", tmp_path, spec=str(folder))
    torch.testing.assert_close(_output(model), _output(reference), rtol=0, atol=0)


def test_any_http_answer_counts_as_reachable(hub):
    assert unreachable(f"{hub.endpoint}/no/such/resolve/main/file") is None  # a 401/404 is an answer
    assert unreachable(f"{hub.endpoint}/{REPO}/resolve/main/config.json") is None


def test_the_command_line_says_it_with_its_flags_and_without_retrying(closed_port, tmp_path):
    env = {
        **os.environ,
        "HF_ENDPOINT": closed_port,
        "HF_HUB_CACHE": str(tmp_path),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    env.pop("HF_HUB_ETAG_TIMEOUT", None)
    mec_hub_cli = Path(sys.executable).parent / "mec-hub"
    done = subprocess.run(
        [str(mec_hub_cli), "download", "mec_resnet50", "--weights", f"hf-hub:{REPO}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 1
    error = done.stderr.strip()
    assert error.count("\n") == 0 and "Traceback" not in error, error  # one line, and no retry warnings
    assert f"hf-hub:{REPO}" in error and "cannot be reached (connection refused)" in error
    assert "`mec-hub download mec_resnet50` on a connected machine" in error and "--weights PATH" in error
