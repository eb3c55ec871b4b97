"""``precision="int8"``: ONNX Runtime's static quantization, calibrated on the images embedded.

The model is the bundled one (real trained weights, so its activations have real ranges); its int8
vectors are compared with the eager PyTorch forward by NumPy here, not only by the library's own figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageOps

import mec_hub
from mec_hub.cli.embed import main as embed_main
from mec_hub.embedding.engine import Embedder
from mec_hub.errors import MecHubError
from mec_hub.export import int8_targets, quantize

MODEL = "mec_resnet18_cifar10s"


@pytest.fixture(scope="module")
def eager(photos: list[Path]) -> np.ndarray:
    """The bundled model's fp32 PyTorch forward, one photo at a time."""
    model = mec_hub.load(MODEL)
    transform = mec_hub.get_transform(model)
    with torch.no_grad():
        return np.stack(
            [model(transform(ImageOps.exif_transpose(Image.open(p)).convert("RGB"))[None])[0].numpy() for p in photos]
        )


def int8_entries(cache: Path) -> list[Path]:
    root = cache / "onnx"
    return sorted(p for p in root.glob("*/key.json") if json.loads(p.read_text())["key"]["kind"] == "onnx-int8")


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_int8_agrees_with_the_eager_model_and_says_how_closely(cache: Path, photos: list[Path], eager: np.ndarray):
    embedder = Embedder(MODEL, device="cpu", precision="int8")
    features = embedder.embed(photos)  # calibrated on these 18 photos
    agreement = embedder.int8_agreement
    assert agreement is not None and agreement.images == len(photos)
    measured = cosine(features, eager)
    assert measured.mean() >= 0.99
    assert not np.allclose(features, eager, rtol=1e-3, atol=1e-3)  # int8 really ran
    # The recorded figures compare with ONNX Runtime's fp32, which is the eager model to 1e-6.
    assert agreement.cosine_mean == pytest.approx(float(measured.mean()), abs=2e-3)
    assert agreement.cosine_min == pytest.approx(float(measured.min()), abs=5e-3)
    [key_file] = int8_entries(cache)
    graph = onnx.load(str(key_file.parent / "model.onnx")).graph
    assert sum(node.op_type == "QuantizeLinear" for node in graph.node) > 10
    record = embedder.record()
    assert record["precision"] == "int8" and record["runtime"] == "onnxruntime"
    assert record["int8"]["agreement_with_fp32"]["images"] == len(photos)


def test_the_int8_model_is_cached_by_its_calibration_images(cache: Path, photos: list[Path]):
    Embedder(MODEL, device="cpu", precision="int8").embed(photos)
    before = int8_entries(cache)
    again = Embedder(MODEL, device="cpu", precision="int8")
    again.embed(photos)
    assert int8_entries(cache) == before  # same images: found, not made again
    other = Embedder(MODEL, device="cpu", precision="int8")
    other.embed(photos[1:])
    assert len(int8_entries(cache)) == len(before) + 1
    assert other.int8_agreement is not None and other.int8_agreement.images == len(photos) - 1


def test_a_model_that_misses_the_targets_is_refused_with_its_figures(
    cache: Path, photos: list[Path], monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setitem(int8_targets.TARGETS, "cosine_mean", 0.9999999)
    before = int8_entries(cache)
    embedder = Embedder(MODEL, device="cpu", precision="int8")
    with pytest.raises(quantize.Int8RefusedError, match=r"mean cosine 0\.99\d\d < 0\.9999999.*recall@10"):
        embedder.embed(photos[2:])
    assert int8_entries(cache) == before  # nothing cached


def test_too_few_images_to_calibrate_and_impossible_combinations(cache: Path, photos: list[Path]):
    with pytest.raises(MecHubError, match="needs at least 16"):
        Embedder(MODEL, device="cpu", precision="int8").embed(photos[:5])
    with pytest.raises(MecHubError, match="int8"):
        Embedder(MODEL, device="cpu", precision="int8", runtime="torch")
    with pytest.raises(MecHubError, match="int8"):
        Embedder(MODEL, device="cpu", precision="int8", pool="gem")
    with pytest.raises(ValueError, match="calibration_images must be a whole number, at least 16"):
        Embedder(MODEL, device="cpu", precision="int8", calibration_images=8)


def test_mec_embed_int8_prints_and_records_its_agreement(cache: Path, photos_dir: Path, tmp_path: Path):
    out = tmp_path / "feats.npy"
    result = CliRunner().invoke(embed_main, [str(photos_dir), "-o", str(out), "-m", MODEL, "--precision", "int8"])
    assert result.exit_code == 0, result.output
    assert "int8 against fp32 on 18 calibration images: cosine mean 0.99" in result.output
    meta = json.loads(out.with_suffix(".meta.json").read_text())
    assert meta["precision"] == "int8" and meta["int8"]["agreement_with_fp32"]["recall_at_10"] >= 0.95
    refused = CliRunner().invoke(
        embed_main, [str(photos_dir), "-o", str(tmp_path / "x.npy"), "--precision", "int8", "--runtime", "torch"]
    )
    assert refused.exit_code == 2 and "--precision int8" in refused.output
