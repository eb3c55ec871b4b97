"""Download progress (huggingface_hub's bar, torch.hub's bar): on stderr when it is a terminal, else nothing.

The files come from the Hugging Face Hub stand-in served by the test on 127.0.0.1.
"""

from __future__ import annotations

import sys

import pytest

from mec_hub.weights.sources import hf_download, url_download
from tests.support.fakehub import FakeHub

REPO = "mec-test/progress"
PAYLOAD = bytes(range(256)) * 2048  # 512 KiB: any content, these functions only fetch


@pytest.fixture
def hub():
    server = FakeHub()
    server.repo(REPO).add_commit({"model.safetensors": PAYLOAD})
    server.start()
    yield server
    server.stop()


def _fetch(how: str, hub: FakeHub, cache) -> bytes:
    if how == "hf-hub":
        path = hf_download(REPO, "model.safetensors", revision=None, cache_dir=cache, endpoint=hub.endpoint)
    else:
        path = url_download(f"{hub.endpoint}/{REPO}/resolve/main/model.safetensors", cache_dir=cache)
    assert path is not None
    return path.read_bytes()


@pytest.mark.parametrize("how", ["hf-hub", "url"])
def test_a_terminal_sees_the_download_bar(how, hub, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert _fetch(how, hub, tmp_path) == PAYLOAD
    err = capsys.readouterr().err
    assert "100%|" in err and "B/s]" in err  # tqdm's bar, in bytes, with its rate


@pytest.mark.parametrize("how", ["hf-hub", "url"])
def test_no_terminal_no_output(how, hub, tmp_path, capsys):
    assert _fetch(how, hub, tmp_path) == PAYLOAD
    assert hub.downloads("model.safetensors") == 1  # it did download
    assert capsys.readouterr().err == ""
