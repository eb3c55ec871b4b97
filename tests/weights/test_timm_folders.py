"""timm's own published folders (``save_for_hf``: ``config.json`` + ``model.safetensors``) beside MEC ones.

The folder is written by timm itself from a randomly initialised classifier (``num_classes=1000``,
as timm's supervised ResNets are published); the reference is timm's own loader,
``timm.create_model("local-dir:...", pretrained=True, num_classes=0)`` with timm's own transform.
Such weights carry no digest mec-hub knows: from a Hub they load with the unverified warning
unless the caller pins one (``sha256=``, ``--sha256``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.data import create_transform, resolve_data_config
from torch import nn

import mec_hub
from mec_hub.cli.embed import main as embed_main
from mec_hub.cli.hub import main as hub_main
from mec_hub.errors import ChecksumMismatchError, IncompatibleWeightsError, InvalidArgumentError
from mec_hub.weights.integrity import UnverifiedWeightsWarning
from tests.support.fakehub import FakeHub, folder_files

REPO = "timm-test/resnet18.random_in1k"
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def timm_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = timm.create_model("resnet18")  # with its 1000-class fc, as timm publishes classifiers
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=gen) * 0.4 - 0.2)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
    folder = tmp_path_factory.mktemp("timm") / "resnet18"
    timm.models.save_for_hf(model, folder, safe_serialization=True)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((folder / "config.json").read_text())["num_classes"] == 1000
    return folder


@pytest.fixture(scope="module")
def reference(timm_folder: Path) -> nn.Module:
    return timm.create_model(f"local-dir:{timm_folder}", pretrained=True, num_classes=0).eval()


@pytest.fixture
def hub(timm_folder: Path):
    server = FakeHub()
    server.commit = server.repo(REPO).add_commit(folder_files(timm_folder))
    server.start()
    yield server
    server.stop()


def digest_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def timm_features(reference: nn.Module, paths: list[Path]) -> np.ndarray:
    """timm's model on timm's preprocessing of each image (decoded as plain RGB)."""
    transform = create_transform(**resolve_data_config({}, model=reference))
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return reference(batch).numpy()


def noise_images(folder: Path, count: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (60 + 7 * i, 80, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_local_timm_folder_loads_as_timm_builds_it_headless(timm_folder, reference):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a user's own local folder: no unverified warning
        model = mec_hub.load(weights=timm_folder)
    with torch.no_grad():
        torch.testing.assert_close(model(X), reference(X), rtol=0, atol=0)
    assert model.embed_dim == 512
    timm_cfg = resolve_data_config({}, model=reference)
    ours = model.pretrained_cfg
    for key in ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std"):
        assert tuple(ours[key]) == tuple(timm_cfg[key]) if isinstance(ours[key], list) else ours[key] == timm_cfg[key]
    # Its architecture, with random weights (the baseline of `mec-hub eval --random-init`).
    random = mec_hub.create_model(config=timm_folder)
    assert isinstance(random.backbone.fc, nn.Identity) and random.embed_dim == 512


def test_a_classifier_the_config_does_not_declare_is_still_refused(timm_folder, tmp_path):
    folder = tmp_path / "undeclared"
    folder.mkdir()
    config = json.loads((timm_folder / "config.json").read_text())
    config["num_classes"] = 0  # says headless, yet the file holds fc
    (folder / "config.json").write_text(json.dumps(config))
    save_file(load_file(str(timm_folder / "model.safetensors")), str(folder / "model.safetensors"))
    with pytest.raises(IncompatibleWeightsError, match=r"unexpected keys: fc\.bias, fc\.weight"):
        mec_hub.load(weights=folder)


def test_hub_timm_repo_is_unverified_unless_pinned_and_a_wrong_pin_is_refused(hub, timm_folder, reference, tmp_path):
    spec = f"hf-hub:{REPO}@{hub.commit}"
    digest = digest_of(timm_folder / "model.safetensors")
    with pytest.warns(UnverifiedWeightsWarning, match="UNVERIFIED"):
        unpinned = mec_hub.load(weights=spec, cache_dir=tmp_path / "a", endpoint=hub.endpoint)
    with torch.no_grad():
        torch.testing.assert_close(unpinned(X), reference(X), rtol=0, atol=0)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pinned = mec_hub.load(weights=spec, cache_dir=tmp_path / "b", endpoint=hub.endpoint, sha256=digest.upper())
    assert pinned.weights_sha256 == digest

    wrong = hashlib.sha256(b"other weights").hexdigest()
    cache = tmp_path / "c"
    with pytest.raises(ChecksumMismatchError, match=wrong):
        mec_hub.load(weights=spec, cache_dir=cache, endpoint=hub.endpoint, sha256=wrong)
    cached = {digest_of(p) for p in cache.rglob("blobs/*") if p.is_file()}
    assert digest not in cached  # the refused download does not stay in the cache

    requests = len(hub.requests)
    with pytest.raises(InvalidArgumentError, match="64 hexadecimal"):
        mec_hub.load(weights=spec, cache_dir=cache, endpoint=hub.endpoint, sha256="abc123")
    assert len(hub.requests) == requests  # refused before any request


def test_a_pin_that_contradicts_the_registry_is_refused():
    with pytest.raises(InvalidArgumentError, match="contradicts"):
        mec_hub.load("mec_resnet18_cifar10s", sha256="0" * 64)


def _embed(args: list[str], hub: FakeHub, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(cache), "HF_HUB_DISABLE_TELEMETRY": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mec_hub.cli.embed", *args], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow  # 18 s: a download, a run and an ONNX export of a model of its own
def test_mec_embed_takes_a_timm_hub_repo_with_a_pinned_digest(hub, timm_folder, reference, tmp_path):
    paths = noise_images(tmp_path / "images", 3, seed=0)
    digest = digest_of(timm_folder / "model.safetensors")
    args = [str(tmp_path / "images"), "--out", str(tmp_path / "feats.npy"), "--device", "cpu", "-j", "0", "-q"]
    good = _embed([*args, "--weights", f"hf-hub:{REPO}@{hub.commit}", "--sha256", digest], hub, tmp_path / "hf")
    assert good.returncode == 0, good.stderr
    assert "UNVERIFIED" not in good.stderr
    meta = json.loads((tmp_path / "feats.meta.json").read_text())
    assert meta["weights_sha256"] == digest and meta["architecture"] == "resnet18"
    rows = (tmp_path / "feats.paths.txt").read_text().splitlines()
    assert [Path(r).name for r in rows] == [p.name for p in paths]
    np.testing.assert_allclose(np.load(tmp_path / "feats.npy"), timm_features(reference, paths), rtol=1e-4, atol=1e-5)


def test_mec_embed_refuses_weights_that_differ_from_the_pin(timm_folder, tmp_path):
    noise_images(tmp_path / "images", 1, seed=0)
    out = tmp_path / "feats.npy"
    args = [str(tmp_path / "images"), "--out", str(out), "--weights", str(timm_folder), "--sha256", "f" * 64]
    result = CliRunner().invoke(embed_main, [*args, "--device", "cpu", "-j", "0"])
    assert result.exit_code == 1 and "SHA-256 mismatch" in result.output, result.output
    assert "Traceback" not in result.output and not out.exists()
    assert (timm_folder / "model.safetensors").is_file()  # a user's own file is never removed


def test_mec_hub_eval_takes_a_timm_folder(timm_folder, reference, tmp_path):
    for split, count in (("train", 3), ("val", 2)):
        for label, cls in enumerate(("a", "b")):
            noise_images(tmp_path / split / cls, count, seed=10 * label + count)
    args = ["eval", "knn", "--weights", str(timm_folder), "--train", str(tmp_path / "train")]
    args += ["--val", str(tmp_path / "val"), "--top-k", "2", "--device", "cpu"]
    result = CliRunner().invoke(
        hub_main, [*args, "--out", str(tmp_path / "r.json"), "--save-features", str(tmp_path / "f")]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["model"]["weights_sha256"] == digest_of(timm_folder / "model.safetensors")
    assert report["model"]["architecture"] == "resnet18" and report["model"]["embed_dim"] == 512
    rows = (tmp_path / "f" / "train.paths.txt").read_text().splitlines()
    expected = timm_features(reference, [tmp_path / "train" / r for r in rows])
    np.testing.assert_allclose(np.load(tmp_path / "f" / "train.npy"), expected, rtol=1e-4, atol=1e-5)

    baseline = CliRunner().invoke(hub_main, [*args, "--random-init", "--out", str(tmp_path / "random.json")])
    assert baseline.exit_code == 0, baseline.output
    assert json.loads((tmp_path / "random.json").read_text())["model"]["architecture"] == "resnet18"
