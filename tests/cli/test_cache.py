"""``mec-hub cache``: the exports mec-embed keeps, listed and removed, checked against the folders on disk."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mec_hub.cli.hub import main as hub_main
from mec_hub.embedding.engine import Embedder


def _entry_of(weights: Path) -> str:
    return Embedder(weights=weights, device="cpu").record()["onnx_export"]["cache_entry"]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_weights_dir: Path) -> Path:
    """A cache holding the tiny model's export, an entry made by other versions, and a damaged one.

    The export is copied from the test session's cache (made there once, by this or an earlier test)."""
    monkeypatch.delenv("MEC_HUB_RUNTIME", raising=False)
    session_entry = Path(os.environ["MEC_HUB_CACHE"]) / "onnx" / _entry_of(tiny_weights_dir)
    folder = tmp_path / "cache"
    entry = shutil.copytree(session_entry, folder / "onnx" / session_entry.name)
    monkeypatch.setenv("MEC_HUB_CACHE", str(folder))
    old = shutil.copytree(entry, folder / "onnx" / ("0" * 32))
    stored = json.loads((old / "key.json").read_text())
    stored["key"]["versions"]["torch"] = "1.13.0"
    (old / "key.json").write_text(json.dumps(stored))
    (folder / "onnx" / ("f" * 32)).mkdir()  # no key.json: a damaged entry
    return folder / "onnx"


def test_list_names_each_entry_and_whether_it_can_be_used(cache: Path):
    result = CliRunner().invoke(hub_main, ["cache", "list"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines() if line.startswith("  ")}
    current = next(name for name in lines if name not in ("0" * 32, "f" * 32))
    assert "current: resnet18 backbone 3x32x32" in lines[current] and "onnx-fp32" in lines[current]
    assert "unusable (other versions)" in lines["0" * 32]
    assert "damaged" in lines["f" * 32]
    assert f"3 entries, {sum(p.stat().st_size for p in cache.rglob('*') if p.is_file()) / 1e6:.1f} MB" in result.output


def test_clear_removes_what_cannot_be_used_and_all_removes_the_rest(cache: Path, tiny_weights_dir: Path):
    kept = sorted(p.name for p in cache.iterdir() if p.name not in ("0" * 32, "f" * 32))
    result = CliRunner().invoke(hub_main, ["cache", "clear"])
    assert result.exit_code == 0 and "removed 2 entries" in result.output
    assert sorted(p.name for p in cache.iterdir()) == kept  # nothing else left, no temporary folder
    assert _entry_of(tiny_weights_dir) == kept[0]
    result = CliRunner().invoke(hub_main, ["cache", "clear", "--all"])
    assert result.exit_code == 0 and "removed 1 entry" in result.output
    assert not any(cache.iterdir())
    assert "empty" in CliRunner().invoke(hub_main, ["cache", "list"]).output
