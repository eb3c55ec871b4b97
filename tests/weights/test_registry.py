"""One model description (``ModelConfig``), its ``config.json`` format, and the registry of records."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
from safetensors import safe_open

from mec_hub.weights.config import METADATA_KEY, ModelConfig, read_config
from mec_hub.weights.record import ModelRecord
from mec_hub.weights.registry import model_info, register
from mec_hub.weights.sources import bundled_folder

BUNDLED = "mec_resnet18_cifar10s"


def test_a_record_registered_first_joins_the_zoo():
    """Registering before anything else once hid every published model; in a fresh process it must not."""
    code = (
        "from mec_hub.weights.registry import list_models, register\n"
        "from mec_hub.weights.config import ModelConfig\n"
        "from mec_hub.weights.record import ModelRecord\n"
        "register(ModelRecord(ModelConfig(name='mine', architecture='resnet18', num_features=512)))\n"
        "print(' '.join(list_models()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["mec_resnet18_cifar10s", "mec_resnet50", "mine"]


def test_shipped_config_json_reads_and_writes_back_byte_for_byte():
    """The on-disk format is unchanged: the bundled folder's config.json and safetensors header round-trip."""
    folder = bundled_folder(BUNDLED)
    text = (folder / "config.json").read_text(encoding="utf-8")
    config = read_config(folder)
    assert json.dumps(config.to_json_dict(), indent=2) + "\n" == text
    # The converter writes the header before the digests are known; the same bytes, the same SHA-256.
    with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
        header = fh.metadata()[METADATA_KEY]
    assert json.dumps(replace(config, files={}).to_json_dict(), sort_keys=True) == header


def test_the_zoo_record_is_the_shipped_description():
    shipped = read_config(bundled_folder(BUNDLED))
    record = model_info(BUNDLED)
    # The record's meta is the registry's wording of the numbers (checked in test_bundled_model); the rest is one.
    assert replace(record.config, meta={}) == replace(shipped, meta={})
    assert record.sha256 == shipped.files["model.safetensors"]


def test_missing_preprocessing_is_the_authors_imagenet_evaluation():
    config = ModelConfig.from_json_dict({"architecture": "resnet50", "num_features": 2048}, origin="test")
    # Resize(256) + CenterCrop(224), bilinear, ImageNet statistics (the MEC paper's linear evaluation).
    assert (config.input_size, config.interpolation, config.crop_pct, config.crop_mode) == (
        (3, 224, 224),
        "bilinear",
        0.875,
        "center",
    )
    assert config.mean == (0.485, 0.456, 0.406) and config.std == (0.229, 0.224, 0.225)
    assert config.projector is None and dict(config.files) == {} and config.name is None


def test_json_lists_and_code_tuples_make_one_description():
    data = {
        "architecture": "resnet18",
        "num_features": 512,
        "pretrained_cfg": {"input_size": [3, 32, 32], "crop_pct": 1, "mean": [0.5, 0.5, 0.5]},
        "mec_hub": {"name": "t", "projector": {"in_dim": 512, "hidden_dim": 256, "out_dim": 128}},
    }
    from_json = ModelConfig.from_json_dict(data, origin="test")
    in_code = ModelConfig(
        name="t", architecture="resnet18", num_features=512, input_size=(3, 32, 32), crop_pct=1.0,
        mean=(0.5, 0.5, 0.5), projector=(512, 256, 128),
    )  # fmt: skip
    assert from_json == in_code
    assert from_json.pretrained_cfg["input_size"] == [3, 32, 32] and from_json.pretrained_cfg["crop_pct"] == 1.0
    assert from_json.to_json_dict()["mec_hub"]["projector"] == {"in_dim": 512, "hidden_dim": 256, "out_dim": 128}


def test_a_record_reads_through_to_its_description():
    record = model_info("mec_resnet50")
    # The authors' README figure for this checkpoint, under their linear protocol; named so, with its source.
    assert record.meta["linear_paper_top1"] == 70.8 and "linear_top1" not in record.meta
    assert "github.com/xinliu20/MEC" in record.meta["metrics_source"] and "Table" not in record.meta["metrics_source"]
    assert record.sha256 is None and not record.pinned and record.config.num_features == 2048
    assert (
        model_info(BUNDLED).pinned
        and model_info(BUNDLED).sha256 == model_info(BUNDLED).config.files["model.safetensors"]
    )


def test_records_need_a_name_and_register_once():
    with pytest.raises(ValueError, match="needs a name"):
        ModelRecord(ModelConfig(architecture="resnet18", num_features=512))
    with pytest.raises(ValueError, match="registered twice"):
        register(model_info(BUNDLED))
