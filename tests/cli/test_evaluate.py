"""``mec-hub eval knn | linear`` end to end: reports checked against a direct forward and a numpy kNN."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import mec_hub
from mec_hub.cli.hub import main
from mec_hub.models.encoder import build_encoder
from mec_hub.weights.config import read_config
from tests.support.paths import REPO_ROOT

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def cifar_slice(cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 training and 2 test images per class, copied (the shared data stays untouched)."""
    root = tmp_path_factory.mktemp("cifar_slice")
    for split, count in (("train", 4), ("test", 2)):
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True)
            for src in sorted((cifar_dir / split / cls).iterdir())[:count]:
                shutil.copy(src, root / split / cls / src.name)
    return root


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def direct_features(model: torch.nn.Module, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    transform = mec_hub.get_transform(model)
    images, labels = [], []
    for label, cls in enumerate(CLASSES):
        for path in sorted((folder / cls).iterdir()):
            images.append(transform(Image.open(path).convert("RGB")))
            labels.append(label)
    with torch.no_grad():
        return model(torch.stack(images)).double().numpy(), np.array(labels)


def features_of(model: torch.nn.Module, folder: Path, paths: list[str]) -> np.ndarray:
    """A plain forward of ``model`` on ``folder / path`` for each path, in that order."""
    transform = mec_hub.get_transform(model)
    images = torch.stack([transform(Image.open(folder / path).convert("RGB")) for path in paths])
    with torch.no_grad():
        return model(images).numpy()


def numpy_knn_top1(train, train_y, val, val_y, k, temperature) -> float:
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    val = val / np.linalg.norm(val, axis=1, keepdims=True)
    hits = 0
    for q, y in zip(val, val_y, strict=True):
        sims = train @ q
        votes = np.zeros(len(CLASSES))
        for j in np.argsort(-sims)[:k]:
            votes[train_y[j]] += math.exp(sims[j] / temperature)
        hits += int(np.argmax(votes) == y)
    return 100.0 * hits / len(val_y)


def test_eval_knn_end_to_end(cifar_slice: Path, tiny_weights_dir: Path, tmp_path: Path):
    report_path = tmp_path / "report.json"
    result = run(
        "eval",
        "knn",
        "--weights",
        tiny_weights_dir,
        "--train",
        cifar_slice / "train",
        "--val",
        cifar_slice / "test",
        "--top-k",
        5,
        "--temperature",
        0.1,
        "--batch-size",
        16,
        "--device",
        "cpu",
        "--out",
        report_path,
        "--save-features",
        tmp_path / "feats",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())

    model = mec_hub.load(weights=tiny_weights_dir)
    train, train_y = direct_features(model, cifar_slice / "train")
    val, val_y = direct_features(model, cifar_slice / "test")
    expected = numpy_knn_top1(train, train_y, val, val_y, k=5, temperature=0.1)
    assert report["results"]["top1"] == pytest.approx(expected)
    assert f"top-1 {expected:.2f}%" in result.output
    assert 0 <= report["results"]["top1"] <= report["results"]["top5"] <= 100

    digest = hashlib.sha256((tiny_weights_dir / "model.safetensors").read_bytes()).hexdigest()
    assert report["protocol"] == "knn"
    assert report["model"]["weights_sha256"] == digest
    assert report["model"]["weights"] == str(tiny_weights_dir) and report["model"]["head"] == "backbone"
    assert report["params"]["k"] == 5 and report["params"]["temperature"] == 0.1
    assert report["data"]["train"]["count"] == 40 and report["data"]["val"]["count"] == 20
    assert report["data"]["classes"] == CLASSES

    # The saved features are reusable input and give the same number without the model.
    again = run(
        "eval",
        "knn",
        "--train-features",
        tmp_path / "feats" / "train.npy",
        "--val-features",
        tmp_path / "feats" / "val.npy",
        "--top-k",
        5,
        "--temperature",
        0.1,
        "--device",
        "cpu",
        "--out",
        tmp_path / "again.json",
    )
    assert again.exit_code == 0, again.output
    report_again = json.loads((tmp_path / "again.json").read_text())
    assert report_again["results"] == report["results"]
    assert report_again["model"]["weights_sha256"] == digest


def test_eval_knn_random_init_needs_an_architecture(cifar_slice: Path, tiny_weights_dir: Path, tmp_path: Path):
    result = run("eval", "knn", "--weights", tiny_weights_dir, "--random-init", "--train", cifar_slice / "train",
                 "--val", cifar_slice / "test", "--device", "cpu", "--out", tmp_path / "r.json",
                 "--save-features", tmp_path / "feats")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["model"]["pretrained"] is False and report["model"]["weights_sha256"] is None

    # The features are those of the architecture with fresh weights drawn from --seed (default 0),
    # not of the folder's trained weights.
    used = np.load(tmp_path / "feats" / "train.npy")
    paths = (tmp_path / "feats" / "train.paths.txt").read_text().splitlines()
    assert len(paths) == len(used) == 40
    trained = features_of(mec_hub.load(weights=tiny_weights_dir), cifar_slice / "train", paths)
    with torch.random.fork_rng():  # leave the global generator as it was for the tests after this one
        torch.manual_seed(0)
        fresh = build_encoder(read_config(tiny_weights_dir), head="backbone").eval()
    seeded_random = features_of(fresh, cifar_slice / "train", paths)
    np.testing.assert_allclose(used, seeded_random, rtol=1e-4, atol=1e-5)
    assert not np.allclose(seeded_random, trained, rtol=0.1, atol=0.01)  # the comparison can tell them apart
    assert (np.abs(used - trained).max(axis=1) > 0.01).all()

    # A download names no architecture until it is fetched: refused at once, without a request.
    bad = run(
        "eval",
        "knn",
        "--weights",
        "hf-hub:org/not-fetched",
        "--random-init",
        "--train",
        cifar_slice / "train",
        "--val",
        cifar_slice / "test",
    )
    _one_line_error(
        bad, "hf-hub:org/not-fetched", "the architecture of random weights comes from a model name", exit_code=2
    )


def test_eval_linear_on_feature_files(tmp_path: Path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 5
    for split, n in (("train", 30), ("val", 9)):
        labels = np.arange(n) % 3
        np.save(tmp_path / f"{split}.npy", (centres[labels] + rng.normal(size=(n, 8))).astype(np.float32))
        np.save(tmp_path / f"{split}_labels.npy", labels)
    result = run(
        "eval",
        "linear",
        "--train-features",
        tmp_path / "train.npy",
        "--train-labels",
        tmp_path / "train_labels.npy",
        "--val-features",
        tmp_path / "val.npy",
        "--val-labels",
        tmp_path / "val_labels.npy",
        "--weight-decay",
        1e-3,
        "--weight-decay",
        1e-1,
        "--seed",
        1,
        "--device",
        "cpu",
        "--out",
        tmp_path / "linear.json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "linear.json").read_text())
    assert report["protocol"] == "linear"
    assert report["results"] == {"top1": 100.0, "top5": 100.0}
    assert [row["weight_decay"] for row in report["params"]["weight_decay_sweep"]] == [1e-3, 1e-1]
    assert report["params"]["seed"] == 1 and report["params"]["holdout_size"] == 6
    assert report["data"]["classes"] == ["0", "1", "2"]


def _one_line_error(result, *needles: str, exit_code: int = 1) -> None:
    assert result.exit_code == exit_code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for needle in needles:
        assert needle in lines[0]


def test_eval_errors(tmp_path: Path, tiny_weights_dir: Path):
    np.save(tmp_path / "train.npy", np.zeros((5, 4), np.float32))
    np.save(tmp_path / "val.npy", np.zeros((2, 4), np.float32))
    np.save(tmp_path / "labels4.npy", np.zeros(4, dtype=int))
    np.save(tmp_path / "labels2.npy", np.zeros(2, dtype=int))
    feats = ["--train-features", tmp_path / "train.npy", "--val-features", tmp_path / "val.npy"]

    _one_line_error(
        run(
            "eval", "knn", *feats, "--train-labels", tmp_path / "labels4.npy", "--val-labels", tmp_path / "labels2.npy"
        ),
        "has 4 labels but",
        "has 5 rows",
    )
    _one_line_error(run("eval", "knn", *feats), "no labels for", "train.paths.txt")
    _one_line_error(
        run("eval", "linear", "--train-features", tmp_path / "nope.npy", "--val-features", tmp_path / "val.npy"),
        "features file not found",
        "nope.npy",
    )
    _one_line_error(
        run(
            "eval", "knn", "--weights", tiny_weights_dir, "--train", tmp_path / "missing", "--val", tmp_path / "missing"
        ),
        "image folder not found",
    )
    bad_device = run("eval", "knn", *feats, "--device", "tpu")  # a usage error (exit 2), naming the flag
    assert bad_device.exit_code == 2 and "Invalid value for '--device': 'tpu' is not a device" in bad_device.output
    _one_line_error(
        run("eval", "knn", "--weights", tmp_path / "no_such_weights", "--train", tmp_path, "--val", tmp_path),
        "weights not found",
    )

    mixed = run("eval", "knn", *feats, "--train", tmp_path, "--val", tmp_path)
    assert mixed.exit_code == 2 and "not both" in mixed.output
    no_model = run("eval", "knn", "--train", tmp_path, "--val", tmp_path)
    assert no_model.exit_code == 2 and "--model NAME or --weights SPEC" in no_model.output


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from mec_hub.cli.hub import main\n"
        "for args in (['--help'], ['eval', 'knn', '--help'], ['search', '--help'], ['plot', '--help']):\n"
        "    assert CliRunner().invoke(main, args).exit_code == 0, args\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)
