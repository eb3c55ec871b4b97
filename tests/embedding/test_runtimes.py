"""The default runtime: ONNX Runtime through a cached, checked export of the model, on a CPU.

Outputs are checked against the plainest eager forward (``reference_features``); the cache against
the files it leaves on disk.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import mec_hub
from mec_hub.cli.embed import main as embed_main
from mec_hub.embedding.engine import Embedder
from mec_hub.errors import MecHubError
from mec_hub.export import onnx_cache
from mec_hub.export.onnx_cache import KEY_FILE, MODEL_FILE
from mec_hub.weights.integrity import sha256_file
from tests.support.embedding import reference_features
from tests.support.weights import make_tiny_hub_folder

MAX_REL = 1e-4  # what the issue allows between runtimes; measured here about 1e-6


def max_rel(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(x.astype(np.float64) - ref).max() / np.abs(ref).max())


def entries(cache: Path) -> list[Path]:
    root = cache / "onnx"
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.exists() else []


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("MEC_HUB_CACHE", str(folder))
    monkeypatch.delenv("MEC_HUB_RUNTIME", raising=False)
    return folder


def test_the_default_on_a_cpu_is_onnxruntime_and_agrees_with_the_eager_model(
    cache: Path, tiny_weights_dir: Path, photos: list[Path], photo_reference: np.ndarray
):
    embedder = Embedder(weights=tiny_weights_dir, device="cpu", batch_size=8)
    assert embedder.runtime == "onnxruntime"
    features = embedder.embed(photos)
    assert max_rel(features, photo_reference) <= MAX_REL
    torch_features = Embedder(weights=tiny_weights_dir, device="cpu", batch_size=8, runtime="torch").embed(photos)
    assert max_rel(features, torch_features) <= MAX_REL
    assert not np.array_equal(features, torch_features)  # really another runtime


def test_the_export_is_made_once_checked_and_cached_by_weights(
    cache: Path, tiny_weights_dir: Path, tmp_path: Path, photos: list[Path], photo_reference: np.ndarray
):
    first = Embedder(weights=tiny_weights_dir, device="cpu")
    entry = cache / "onnx" / first.record()["onnx_export"]["cache_entry"]
    before = entries(cache)
    stored = json.loads((entry / KEY_FILE).read_text())
    assert stored["key"]["weights_sha256"] == sha256_file(tiny_weights_dir / "model.safetensors")
    assert stored["record"]["onnx_sha256"] == sha256_file(entry / MODEL_FILE)
    assert 0 <= stored["record"]["max_rel_diff_vs_pytorch"] <= MAX_REL  # checked before it was published
    mtime = (entry / MODEL_FILE).stat().st_mtime_ns

    again = Embedder(weights=tiny_weights_dir, device="cpu")  # found, not made again
    assert entries(cache) == before and (entry / MODEL_FILE).stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.embed(photos[:3]), first.embed(photos[:3]))

    # The same folder, its weight file replaced (retrained, say): a new export, the new weights' outputs.
    folder = shutil.copytree(tiny_weights_dir, tmp_path / "retrained")
    assert Embedder(weights=folder, device="cpu").record()["onnx_export"]["cache_entry"] == entry.name
    assert entries(cache) == before  # the same weights from another place: the same export
    make_tiny_hub_folder(folder, seed=1)
    other = Embedder(weights=folder, device="cpu")
    assert len(entries(cache)) == len(before) + 1
    assert max_rel(other.embed(photos[:4]), reference_features(folder, photos[:4])) <= MAX_REL
    assert max_rel(other.embed(photos[:4]), photo_reference[:4]) > 1e-2


@pytest.mark.slow  # an export of its own: seconds
def test_a_module_changed_after_loading_is_exported_again(cache: Path, tiny_weights_dir: Path, photos: list[Path]):
    model = mec_hub.load(weights=tiny_weights_dir)
    Embedder(model, device="cpu").embed(photos[:2])
    before = entries(cache)
    with torch.no_grad():
        model.backbone.conv1.weight.mul_(0.5)  # same weights file, other tensors
    transform = mec_hub.get_transform(model)
    features = Embedder(model, device="cpu").embed(photos[:2])
    assert len(entries(cache)) == len(before) + 1
    from PIL import Image

    with torch.no_grad():
        expected = model(torch.stack([transform(Image.open(p).convert("RGB")) for p in photos[:2]])).numpy()
    assert max_rel(features, expected) <= MAX_REL


@pytest.mark.slow  # an export of its own: seconds
def test_a_damaged_entry_is_made_again(cache: Path, tiny_weights_dir: Path, photos: list[Path],
                                       photo_reference: np.ndarray):
    first = Embedder(weights=tiny_weights_dir, device="cpu")
    entry = cache / "onnx" / first.record()["onnx_export"]["cache_entry"]
    data = bytearray((entry / MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (entry / MODEL_FILE).write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="damaged cached ONNX export"):
        embedder = Embedder(weights=tiny_weights_dir, device="cpu")
    assert max_rel(embedder.embed(photos[:3]), photo_reference[:3]) <= MAX_REL
    assert json.loads((entry / KEY_FILE).read_text())["record"]["onnx_sha256"] == sha256_file(entry / MODEL_FILE)


def test_a_failed_export_leaves_nothing_and_auto_falls_back_to_torch(
    empty_cache: Path, tiny_weights_dir: Path, photos: list[Path], photo_reference: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
):
    def broken(encoder, out, **kwargs):
        Path(out).write_bytes(b"half a file")
        raise MecHubError("the ONNX exporter failed")

    monkeypatch.setattr(onnx_cache, "export_encoder", broken)
    with pytest.warns(UserWarning, match="ONNX Runtime is not used.*exporter failed"):
        embedder = Embedder(weights=tiny_weights_dir, device="cpu")
    assert embedder.runtime == "torch" and "runtime" not in embedder.record()
    np.testing.assert_allclose(embedder.embed(photos[:3]), photo_reference[:3], rtol=1e-5, atol=1e-5)
    assert not any((empty_cache / "onnx").iterdir())  # no entry, no temporary folder
    with pytest.raises(MecHubError, match="exporter failed"):  # asked for by name: an error
        Embedder(weights=tiny_weights_dir, device="cpu", runtime="onnxruntime")


def test_an_unwritable_cache_is_one_line(empty_cache: Path, tiny_weights_dir: Path):
    empty_cache.write_text("a file where the cache folder should be")
    with pytest.raises(MecHubError, match=r"cannot write the ONNX export into .*MEC_HUB_CACHE"):
        Embedder(weights=tiny_weights_dir, device="cpu", runtime="onnxruntime")
    with pytest.warns(UserWarning, match="ONNX Runtime is not used"):
        assert Embedder(weights=tiny_weights_dir, device="cpu").runtime == "torch"


def test_the_environment_sets_what_auto_means(cache: Path, tiny_weights_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MEC_HUB_RUNTIME", "torch")
    assert Embedder(weights=tiny_weights_dir, device="cpu").runtime == "torch"
    assert Embedder(weights=tiny_weights_dir, device="cpu", runtime="onnxruntime").runtime == "onnxruntime"
    monkeypatch.setenv("MEC_HUB_RUNTIME", "tensorrt")
    with pytest.raises(MecHubError, match="MEC_HUB_RUNTIME='tensorrt' names no runtime"):
        Embedder(weights=tiny_weights_dir, device="cpu")


def test_pooled_stages_stay_on_torch(empty_cache: Path, tiny_weights_dir: Path):
    assert Embedder(weights=tiny_weights_dir, device="cpu", pool="gem").runtime == "torch"
    with pytest.raises(MecHubError, match="whole"):
        Embedder(weights=tiny_weights_dir, device="cpu", pool="gem", runtime="onnxruntime")
    assert not entries(empty_cache)


def test_the_meta_file_records_the_runtime_and_the_cli_says_it(cache: Path, tiny_weights_dir: Path,
                                                               photos_dir: Path, tmp_path: Path):
    runner = CliRunner()
    help_text = runner.invoke(embed_main, ["--help"]).output
    assert "--runtime [auto|torch|onnxruntime]" in help_text and "Here: onnxruntime on a CPU" in help_text
    out = tmp_path / "feats.npy"
    result = runner.invoke(embed_main, [str(photos_dir), "-o", str(out), "--weights", str(tiny_weights_dir), "-q"])
    assert result.exit_code == 0, result.output
    meta = json.loads(out.with_suffix(".meta.json").read_text())
    entry = cache / "onnx" / meta["onnx_export"]["cache_entry"]
    assert meta["runtime"] == "onnxruntime"
    assert meta["onnx_export"]["onnx_sha256"] == sha256_file(entry / MODEL_FILE)
    torch_out = tmp_path / "torch.npy"
    result = runner.invoke(
        embed_main, [str(photos_dir), "-o", str(torch_out), "--weights", str(tiny_weights_dir), "--runtime", "torch"]
    )
    assert result.exit_code == 0 and "torch, fp32" in result.output
    assert "runtime" not in json.loads(torch_out.with_suffix(".meta.json").read_text())
    assert max_rel(np.load(out), np.load(torch_out)) <= MAX_REL


@pytest.mark.slow  # an export of its own: seconds
def test_of_two_runs_making_one_export_the_first_to_publish_wins(empty_cache: Path, tiny_weights_dir: Path):
    encoder = mec_hub.load(weights=tiny_weights_dir)
    key = onnx_cache.export_key(encoder)

    def other_run(folder: Path) -> dict:
        onnx_cache.export_encoder(encoder, folder / MODEL_FILE, fmt="onnx", dynamic_batch=True)
        return {"who": "the other run"}

    def this_run(folder: Path) -> dict:
        onnx_cache.cached_entry(key, other_run, what="ONNX export")  # publishes while this one works
        (folder / MODEL_FILE).write_bytes(b"this run's file, never published")
        return {"who": "this run"}

    entry = onnx_cache.cached_entry(key, this_run, what="ONNX export")
    assert entry.record == {"who": "the other run"}
    assert [p.name for p in (empty_cache / "onnx").iterdir()] == [entry.folder.name]  # no temporary folder left
