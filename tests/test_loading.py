"""``mec_hub.load`` and ``get_transform`` behaviour that does not need a server."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

import mec_hub
from mec_hub.errors import CheckpointReadError, UnknownModelError, WeightsNotFoundError


def test_transform_matches_the_authors_evaluation_pipeline(photos_dir):
    image = Image.open(photos_dir / "skimage-chelsea.png").convert("RGB")
    reference = T.Compose([
        T.Resize(256, interpolation=T.InterpolationMode.BILINEAR),
        T.CenterCrop(224),
        T.ToImage(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    got = mec_hub.get_transform("mec_resnet50")(image)
    torch.testing.assert_close(got, reference(image), rtol=0, atol=1e-6)


def test_transform_follows_the_loaded_model(tiny_weights_dir, photos_dir):
    model = mec_hub.load(weights=tiny_weights_dir)
    image = Image.open(photos_dir / "pillow-flower.jpg").convert("RGB")
    assert mec_hub.get_transform(model)(image).shape == (3, 32, 32)


def test_random_weights_and_argument_checks(tiny_weights_dir):
    model = mec_hub.load("mec_resnet50", pretrained=False)
    assert model.embed_dim == 2048 and model.weights_sha256 is None
    with pytest.raises(ValueError, match="pretrained=False"):
        mec_hub.load("mec_resnet50", weights=tiny_weights_dir, pretrained=False)
    with pytest.raises(UnknownModelError, match="Did you mean: mec_resnet50"):
        mec_hub.load("mec-resnet50")
    with pytest.raises(WeightsNotFoundError, match="no file or folder"):
        mec_hub.load(weights="missing/model.safetensors")
    with pytest.raises(ValueError, match="head must be"):
        mec_hub.load(weights=tiny_weights_dir, head="predictor")


def test_pickles_are_never_loaded_as_weights(tmp_path):
    ckpt = tmp_path / "model.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, ckpt)
    with pytest.raises(CheckpointReadError, match="mec-hub convert"):
        mec_hub.load(weights=ckpt)


def test_truncated_safetensors_without_digest(tiny_weights_dir, tmp_path):
    folder = tmp_path / "cut"
    shutil.copytree(tiny_weights_dir, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 3])
    config = json.loads((folder / "config.json").read_text())
    config["mec_hub"]["files"] = {}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointReadError, match="corrupted or truncated"):
        mec_hub.load(weights=folder)
