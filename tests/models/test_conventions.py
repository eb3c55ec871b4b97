"""The field's habits: torchvision's ``weights="DEFAULT"`` and timm's model interface.

The reference throughout is timm itself: ``timm.create_model("local-dir:<bundled folder>")``
builds the bundled model from its own ``config.json`` and loads its ``model.safetensors``, with
none of mec_hub's code.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file
from timm.data import resolve_data_config
from torch import nn

import mec_hub
from mec_hub.errors import InvalidArgumentError
from mec_hub.models import hub_entrypoints
from tests.support.embedding import make_images
from tests.support.paths import REPO_ROOT

NAME = "mec_resnet18_cifar10s"
BUNDLED = Path(str(resources.files("mec_hub") / "bundled" / NAME))


@pytest.fixture(scope="module")
def timm_model() -> nn.Module:
    return timm.create_model(f"local-dir:{BUNDLED}", pretrained=True, num_classes=0).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 3, 48, 48, generator=torch.Generator().manual_seed(0))


# -- torchvision: weights="DEFAULT", None and pretrained=False ---------------------------------------


def test_default_weights_are_the_published_ones_everywhere(timm_model, images):
    with torch.no_grad():
        expected = timm_model(images)
        loaded = {
            "load(weights='DEFAULT')": mec_hub.load(weights="DEFAULT"),
            "load(NAME, weights='DEFAULT')": mec_hub.load(NAME, weights="DEFAULT"),
            "torch.hub.load(..., weights='DEFAULT')": torch.hub.load(
                str(REPO_ROOT), NAME, source="local", weights="DEFAULT", trust_repo=True
            ),
            "entry point, weights=None": hub_entrypoints.mec_resnet18_cifar10s(weights=None),
        }
        for how, model in loaded.items():
            torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-6, msg=how)

        embedder = mec_hub.Embedder(weights="DEFAULT", device="cpu", num_workers=0)
        assert embedder.name == NAME and embedder.weights is None
        np.testing.assert_allclose(embedder.embed(images), expected.numpy(), rtol=1e-4, atol=1e-4)


def test_default_weights_on_the_command_line(timm_model, tmp_path):
    from mec_hub.cli.embed import main as embed_main

    paths = make_images(tmp_path / "images", 3)
    out = tmp_path / "f.npy"
    args = [str(tmp_path / "images"), "--out", str(out), "--weights", "DEFAULT", "--device", "cpu", "-j", "0", "-q"]
    result = CliRunner().invoke(embed_main, args)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "f.meta.json").read_text())["model"] == NAME
    transform = timm.data.create_transform(**resolve_data_config({}, model=timm_model))
    order = [tmp_path / "images" / line for line in (tmp_path / "f.paths.txt").read_text().splitlines()]
    assert sorted(order) == sorted(paths)
    with torch.no_grad():
        expected = timm_model(torch.stack([transform(Image.open(p).convert("RGB")) for p in order]))
    np.testing.assert_allclose(np.load(out), expected.numpy(), rtol=1e-4, atol=1e-4)


def test_random_weights_are_pretrained_false_and_never_mixed_with_weights(timm_model, images):
    published = load_file(str(BUNDLED / "model.safetensors"))
    random = hub_entrypoints.mec_resnet18_cifar10s(pretrained=False)
    assert random.weights_sha256 is None
    assert not torch.equal(random.backbone.state_dict()["conv1.weight"], published["conv1.weight"])

    mixes = [
        lambda: hub_entrypoints.mec_resnet18_cifar10s(weights="DEFAULT", pretrained=False),
        lambda: hub_entrypoints.mec_resnet50(weights=str(BUNDLED), pretrained=False),
        lambda: mec_hub.load(weights=BUNDLED, pretrained=False),
    ]
    for call in mixes:
        with pytest.raises(InvalidArgumentError) as info:
            call()
        message = str(info.value)
        assert "weights=" in message and "pretrained=" in message and "--" not in message, message

    # torchvision's builders take keywords only; a positional pretrained flag is refused.
    for entry in (hub_entrypoints.mec_resnet50, hub_entrypoints.mec_resnet18_cifar10s):
        with pytest.raises(TypeError):
            entry(False)
        doc = entry.__doc__ or ""
        assert "None" in doc and '"DEFAULT"' in doc and "pretrained: False for random weights" in doc, entry


def test_random_weights_in_the_architecture_of_a_folder(timm_model, images):
    torch.manual_seed(3)
    model = mec_hub.create_model(config=BUNDLED)
    assert model.weights_sha256 is None and not model.training
    assert model.pretrained_cfg["input_size"] == [3, 48, 48]
    # timm's own model of the folder has the same tensors, by name and shape, but other values.
    reference = timm_model.state_dict()
    mine = model.backbone.state_dict()
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in reference.items()}
    assert not torch.equal(mine["layer1.0.conv1.weight"], reference["layer1.0.conv1.weight"])
    with pytest.raises(InvalidArgumentError, match="name= and config="):
        mec_hub.create_model(NAME, config=BUNDLED)


# -- timm: the model interface ---------------------------------------------------------------------


def finetune_one_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """A fine-tuning step as written for any timm backbone: nothing in it knows mec_hub."""
    model.reset_classifier(10)
    classifier = model.get_classifier()
    assert isinstance(classifier, nn.Linear) and classifier.in_features == model.num_features
    data_config = resolve_data_config({}, model=model)
    assert tuple(model.default_cfg["input_size"]) == tuple(data_config["input_size"])
    x = F.interpolate(images, size=tuple(model.default_cfg["input_size"][1:]), mode="bilinear")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    features = model.forward_features(x)
    pre_logits = model.forward_head(features, pre_logits=True)
    logits = model.forward_head(features)
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        after = model(x)
    return {
        "features": features.detach(),
        "pre_logits": pre_logits.detach(),
        "logits": logits.detach(),
        "after": after,
        "classifier.weight": classifier.weight.detach(),
        "num_features": torch.tensor(model.num_features),
    }


def test_a_timm_finetuning_snippet_runs_unchanged_and_agrees_with_timm(timm_model):
    images = torch.rand(8, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(8) % 10
    results = {}
    for name, model in (("timm", copy.deepcopy(timm_model)), ("mec_hub", mec_hub.load(NAME))):
        torch.manual_seed(7)  # the new classifier's initial weights
        results[name] = finetune_one_step(model, images, labels)
    ours, theirs = results["mec_hub"], results["timm"]
    assert ours["features"].shape == (8, 224, 2, 2) and ours["logits"].shape == (8, 10)
    assert int(ours["num_features"]) == 224
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-5, msg=key)
    assert not torch.allclose(ours["after"], ours["logits"], atol=1e-3)  # the step changed the model


def test_the_projector_is_the_head_timm_code_sees(timm_model, images):
    model = mec_hub.load(NAME, head="projector")
    in_dim, hidden_dim, out_dim = model.config.projector
    projector = mec_hub.build_projector(in_dim, hidden_dim, out_dim)
    projector.load_state_dict(load_file(str(BUNDLED / "projector.safetensors")))
    projector.eval()
    with torch.no_grad():
        pooled = timm_model(images)
        features = model.forward_features(images)
        torch.testing.assert_close(features, timm_model.forward_features(images), rtol=0, atol=1e-6)
        torch.testing.assert_close(model.forward_head(features, pre_logits=True), pooled, rtol=0, atol=1e-6)
        torch.testing.assert_close(model.forward_head(features), projector(pooled), rtol=0, atol=1e-5)
        torch.testing.assert_close(model(images), projector(pooled), rtol=0, atol=1e-5)
    assert model.get_classifier() is model.projector
    assert model.num_features == 224 and model.num_classes == out_dim
    assert model.default_cfg == dict(model.pretrained_cfg)

    # Resetting the classifier to none leaves timm's headless model: the pooled features.
    model.reset_classifier(0)
    assert model.projector is None and model.head == "backbone" and model.num_classes == 0
    assert isinstance(model.get_classifier(), nn.Identity) and model.embed_dim == 224
    with torch.no_grad():
        torch.testing.assert_close(model(images), pooled, rtol=0, atol=1e-6)
    assert model.weights_sha256 == mec_hub.model_info(NAME).sha256  # still the published backbone


def test_a_classifier_changes_the_identity_but_not_the_backbone(timm_model, images):
    model = mec_hub.load(NAME)
    model.reset_classifier(5, global_pool="max")
    reference = copy.deepcopy(timm_model)
    torch.manual_seed(0)
    reference.reset_classifier(5, global_pool="max")
    model.get_classifier().load_state_dict(reference.get_classifier().state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), rtol=0, atol=1e-6)
    assert model.head == "classifier" and model.embed_dim == 5 and model.num_classes == 5
    assert model.weights_sha256 is None and model.identity.head == "classifier"
