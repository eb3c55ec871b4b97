"""The model card of a run's export (OUT/export/README.md), read back with huggingface_hub as the Hub reads it.

The expected values come from outside the card code: the license from the project's LICENSE file, the kNN
figure and its step from the run's metrics.jsonl, its protocol from the run's own options.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import ModelCard
from huggingface_hub.repocard import metadata_load
from PIL import Image

import training.pretrain as pretrain
from tests.support.paths import REPO_ROOT
from training.metrics import read_metrics


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two epochs of 2 steps on 16 generated images in two class folders, with the kNN monitor (k=5, T=0.1)."""
    images = tmp_path_factory.mktemp("data") / "tiny_shapes"
    rng = np.random.default_rng(0)
    for label in ("plain", "striped"):
        (images / label).mkdir(parents=True)
        for i in range(8):
            pixels = (rng.random((32, 32, 3)) * 255).astype("uint8")
            if label == "striped":
                pixels[:, :16] = 255
            Image.fromarray(pixels).save(images / label / f"{i}.png")
    out = tmp_path_factory.mktemp("run")
    arguments = [
        "--data", str(images), "--output-dir", str(out),
        "--arch", "resnet10t", "--image-size", "32", "--dim", "32", "--hidden-dim", "64", "--pred-dim", "16",
        "--batch-size", "8", "--epochs", "2", "--warmup-epochs", "1", "--lamda-warmup-epochs", "1", "--eps2", "64",
        "--workers", "0", "--log-every", "1", "--device", "cpu", "--no-tensorboard",
        "--knn-train", str(images), "--knn-val", str(images), "--knn-k", "5", "--knn-temperature", "0.1",
    ]  # fmt: skip
    assert pretrain.main(arguments) == 0
    return out


def test_the_card_of_a_run_has_the_projects_license_and_the_datas_terms(run):
    project_license = (REPO_ROOT / "LICENSE").read_text(encoding="utf-8").split()[0].lower()
    assert project_license == "mit"
    metadata = metadata_load(run / "export" / "README.md")
    assert metadata["license"] == project_license
    card = ModelCard.load(run / "export" / "README.md")
    assert "## License" in card.text and "mec-hub's license, see its LICENSE file" in card.text
    assert "Trained on tiny_shapes: the data's own terms apply to the use of these weights as well." in card.text
    assert "ORG/NAME" in card.text  # filled with the repo id by `mec-hub push`, not before


def test_the_card_of_a_run_holds_its_knn_figure_with_protocol_and_step(run):
    measured = [r for r in read_metrics(run / "metrics.jsonl") if "knn_top1" in r]
    last = measured[-1]
    card = ModelCard.load(run / "export" / "README.md")
    (result,) = card.data.eval_results
    assert result.metric_name == "kNN top-1 (%)" and result.metric_type == "accuracy"
    assert result.metric_value == round(last["knn_top1"], 2)
    assert (result.task_type, result.dataset_type) == ("image-classification", "custom")
    assert result.dataset_name == "tiny_shapes (classified), bank tiny_shapes"
    assert "kNN top-1 (%) (weighted kNN: cosine, k=5, T=0.1, DINO's protocol" in card.text
    assert f"kNN monitor of training/pretrain.py (--knn-train/--knn-val) at step {last['step']} (epoch 2)" in card.text
