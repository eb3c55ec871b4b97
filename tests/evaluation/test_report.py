"""The evaluation library behind ``mec-hub eval``: the report format, the train/val checks, the random baseline.

The format's reference is the reports measured for the bundled model (benchmarks/bundled_model/),
written before the report had a type of its own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import mec_hub
from mec_hub.evaluation.inputs import InvalidFeaturesError
from mec_hub.evaluation.protocols import run_knn, run_linear
from mec_hub.evaluation.report import EvalReport
from mec_hub.evaluation.splits import EvalSplits, load_eval_model
from mec_hub.models.loading import DEFAULT_MODEL
from tests.support.paths import REPO_ROOT

RECORDED = REPO_ROOT / "benchmarks" / "bundled_model"


def key_tree(value: Any) -> Any:
    """The keys of a JSON value, in order and nested; a list of objects by its first element."""
    if isinstance(value, dict):
        return [(key, key_tree(item)) for key, item in value.items()]
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return [key_tree(value[0])]
    return None


@pytest.mark.parametrize("name", ["knn_trained", "knn_random", "linear_trained", "linear_random"])
def test_to_json_rewrites_a_recorded_report_byte_for_byte(name: str):
    text = (RECORDED / f"{name}.json").read_text(encoding="utf-8")
    assert EvalReport(**json.loads(text)).to_json() == text


@pytest.fixture(scope="module")
def small_split(cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes, 4 training and 2 validation images each."""
    root = tmp_path_factory.mktemp("eval_report")
    for split, source, count in (("train", "train", 4), ("val", "test", 2)):
        for cls in ("bird", "cat", "ship"):
            (root / split / cls).mkdir(parents=True)
            for src in sorted((cifar_dir / source / cls).iterdir())[:count]:
                shutil.copy(src, root / split / cls / src.name)
    return root


def test_reports_keep_the_recorded_keys(small_split: Path, tiny_weights_dir: Path, tmp_path: Path):
    """kNN on image folders, then the linear probe on the saved features: as bundled_model/evaluate.sh runs them."""
    recorded = {name: json.loads((RECORDED / f"{name}.json").read_text()) for name in ("knn_trained", "linear_trained")}

    folders = EvalSplits.from_image_folders(small_split / "train", small_split / "val", weights=tiny_weights_dir)
    knn = run_knn(folders, k=3)
    assert key_tree(json.loads(knn.to_json())) == key_tree(recorded["knn_trained"])
    assert knn.data["train"]["count"] == 12 and knn.data["val"]["count"] == 6
    assert knn.data["classes"] == ["bird", "cat", "ship"] and knn.model["pretrained"] is True

    folders.save_features(tmp_path / "feats")
    files = EvalSplits.from_feature_files(tmp_path / "feats" / "train.npy", tmp_path / "feats" / "val.npy")
    linear = run_linear(files, weight_decays=[1e-3, 1e-1])
    assert key_tree(json.loads(linear.to_json())) == key_tree(recorded["linear_trained"])
    assert linear.model["weights_sha256"] == knn.model["weights_sha256"] is not None
    assert linear.data["val"]["labels"] == str(tmp_path / "feats" / "val.paths.txt")

    report = tmp_path / "r.json"
    linear.write(report)
    assert json.loads(report.read_text()) == json.loads(linear.to_json())


def _feature_file(path: Path, rows: int, dim: int, sha256: str | None) -> Path:
    """X.npy, X.paths.txt and X.meta.json written by hand, as mec-embed lays them out."""
    np.save(path, np.random.default_rng(0).normal(size=(rows, dim)).astype(np.float32))
    path.with_suffix(".paths.txt").write_text("".join(f"c{i % 2}/{i}.png\n" for i in range(rows)))
    path.with_suffix(".meta.json").write_text(json.dumps({"weights_sha256": sha256, "embed_dim": dim}))
    return path


def test_train_and_val_must_come_from_one_model(tmp_path: Path):
    train = _feature_file(tmp_path / "train.npy", 6, 4, "a" * 64)
    with pytest.raises(InvalidFeaturesError, match=r"has 4 dimensions but .* has 5"):
        EvalSplits.from_feature_files(train, _feature_file(tmp_path / "wide.npy", 4, 5, "a" * 64))
    with pytest.raises(InvalidFeaturesError, match="different weights"):
        EvalSplits.from_feature_files(train, _feature_file(tmp_path / "other.npy", 4, 4, "b" * 64))
    # Features that do not say which weights made them are taken on trust.
    splits = EvalSplits.from_feature_files(train, _feature_file(tmp_path / "unknown.npy", 4, 4, None))
    assert splits.model["weights_sha256"] == "a" * 64 and splits.model["embed_dim"] == 4


def test_random_baseline_is_seeded_and_leaves_the_callers_random_state(tiny_weights_dir: Path):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    model = load_eval_model(DEFAULT_MODEL, random_init=True, seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)

    torch.manual_seed(5)
    reference = mec_hub.load(DEFAULT_MODEL, pretrained=False)
    for (key, value), expected in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(value, expected), key
    assert model.weights_sha256 is None and not model.training

    # The architecture from a weights folder, not its weights.
    folder = load_eval_model(weights=tiny_weights_dir, random_init=True, seed=5)
    trained = mec_hub.load(weights=tiny_weights_dir)
    assert folder.config.architecture == trained.config.architecture and folder.weights_sha256 is None
    first = next(iter(trained.state_dict()))
    assert not torch.equal(folder.state_dict()[first], trained.state_dict()[first])
