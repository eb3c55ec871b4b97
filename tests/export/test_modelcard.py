"""The model card's metadata as huggingface_hub (and so the Hub) reads it back.

The expected values are the numbers and words of the record written here, and, for the
bundled model, the measured reports in benchmarks/bundled_model/.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import ModelCard

from mec_hub.export.convert import ExtractedWeights, write_hub_folder
from mec_hub.export.modelcard import render_model_card
from mec_hub.models.encoder import build_backbone
from mec_hub.weights.config import read_config
from mec_hub.weights.registry import model_info
from mec_hub.weights.sources import bundled_folder
from tests.support.paths import REPO_ROOT

TAGS = {"image-feature-extraction", "timm", "mec", "self-supervised-learning", "safetensors"}


def write_folder(out: Path, meta: dict, *, architecture: str = "resnet18", model_args: dict | None = None) -> Path:
    torch.manual_seed(0)
    backbone = build_backbone(architecture, model_args)
    extracted = ExtractedWeights(
        architecture=architecture,
        backbone=backbone.state_dict(),
        projector=None,
        layout="test checkpoint",
        model_args=dict(model_args or {}),
        meta=meta,
    )
    write_hub_folder(extracted, out, name="mec_test_card")
    return out


def metrics(card: ModelCard) -> dict[str, float]:
    return {r.metric_name: r.metric_value for r in card.data.eval_results or []}


def test_card_metadata_and_model_index_parse_back(tmp_path):
    meta = {
        "pretraining": "MEC on ImageNet-1k, 100 epochs",
        "knn_top1": 61.25,
        "linear_top1": 70.5,
        "eval_data": "ImageNet-1k val (50,000 images)",
        "metrics_source": "the paper, arXiv:2210.11464",
        "paper": "Liu et al., Self-Supervised Learning via Maximum Entropy Coding (arXiv:2210.11464)",
        "license": "Apache-2.0 (upstream)",
    }
    folder = write_folder(tmp_path / "card", meta)
    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert data.library_name == "timm" and data.license == "apache-2.0"
    assert set(data.tags) == TAGS and data.pipeline_tag == "image-feature-extraction"
    assert data.datasets == ["imagenet-1k"] and data.model_name == "mec_test_card"
    assert metrics(card) == {"kNN top-1 (%)": 61.25, "Linear probe top-1 (%)": 70.5}
    for result in data.eval_results:
        assert result.task_type == "image-classification" and result.metric_type == "accuracy"
        assert (result.dataset_type, result.dataset_name) == ("imagenet-1k", "ImageNet-1k val (50,000 images)")
        assert result.dataset_split == "validation"
        assert result.source_name == "the paper, arXiv:2210.11464"
        assert result.source_url == "https://arxiv.org/abs/2210.11464"
    # The card still says which files it describes, and the metadata is YAML the Hub can read.
    digest = read_config(folder).files["model.safetensors"]
    assert f"`{digest}`" in card.text and "## Usage" in card.text
    assert "--to detectron2" in card.text  # a standard resnet18 transfers


def test_card_without_measurements_has_no_model_index(tmp_path):
    folder = write_folder(
        tmp_path / "plain", {"converted_from": "a state dict"}, model_args={"channels": [32, 64, 96, 128]}
    )
    card = ModelCard.load(folder / "README.md")
    assert card.data.eval_results is None and "model-index" not in card.content
    assert card.data.license == "other" and card.data.datasets is None
    assert "--to detectron2" not in card.text  # half-width: Detectron2 cannot build it


def test_measurements_without_a_checkable_source_keep_their_source_in_the_text(tmp_path):
    meta = {"knn_top1": 40.0, "eval_data": "cifar10-subset/test", "metrics_source": "measured here, seed 0"}
    card = ModelCard.load(write_folder(tmp_path / "measured", meta) / "README.md")
    (result,) = card.data.eval_results
    assert (result.dataset_type, result.dataset_split, result.metric_value) == ("cifar10", "test", 40.0)
    assert result.source_url is None  # the model-index wants a URL for a source; none is known
    assert "**Where the numbers come from**: measured here, seed 0" in card.text


def test_bundled_card_quotes_the_measured_reports():
    folder = bundled_folder(model_info("mec_resnet18_cifar10s").bundled)
    card = ModelCard.load(folder / "README.md")
    reports = REPO_ROOT / "benchmarks" / "bundled_model"
    def top1(name: str) -> float:
        return json.loads((reports / f"{name}.json").read_text())["results"]["top1"]

    measured = {"kNN top-1 (%)": top1("knn_trained"), "Linear probe top-1 (%)": top1("linear_trained")}
    assert metrics(card) == measured
    # The card of the registry record names every figure with its protocol, the later ones too.
    record_card = ModelCard(render_model_card(model_info("mec_resnet18_cifar10s").config, layout="x"))
    assert metrics(record_card) == {
        **measured,
        "Linear top-1 (%), the authors' protocol": top1("linear_paper_trained"),
        "Top-1 (%), fine-tuned on 1% of the labels": top1("finetune1_trained"),
        "Top-1 (%), fine-tuned on 10% of the labels": top1("finetune10_trained"),
    }
    assert "Barlow Twins' recipe" in record_card.text and "main_lincls.py with --lars" in record_card.text
    assert card.data.datasets == ["cifar10"] and card.data.license == "mit" and card.data.library_name == "timm"
    assert {r.dataset_split for r in card.data.eval_results} == {"test"}
    # The shipped card is the one `mec-hub convert` writes for the shipped config (package.py regenerates it).
    expected = render_model_card(read_config(folder), layout="mec-hub training checkpoint")
    assert (folder / "README.md").read_text(encoding="utf-8") == expected


def test_registry_record_card_cites_the_authors_readme_and_names_the_protocol():
    record = model_info("mec_resnet50")  # its linear top-1 is the authors' README figure for their checkpoint
    card = ModelCard(render_model_card(record.config, layout="official MEC checkpoint"))
    (result,) = card.data.eval_results
    assert result.metric_value == record.meta["linear_paper_top1"] == 70.8 and result.dataset_type == "imagenet-1k"
    assert result.metric_name == "Linear top-1 (%), the authors' protocol" and result.dataset_split == "validation"
    assert result.source_url == "https://github.com/xinliu20/MEC#models-and-logs"
    assert "the authors' repository README" in result.source_name
    assert "main_lincls.py with --lars" in card.text  # the protocol, in the card's details
