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
    reference = T.Compose(
        [
            T.Resize(256, interpolation=T.InterpolationMode.BILINEAR),
            T.CenterCrop(224),
            T.ToImage(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )
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


def test_random_weights_take_the_architecture_of_a_weights_folder(tiny_weights_dir):
    from safetensors.torch import load_file

    torch.manual_seed(1)  # the fixture's weights are seed 0's initialisation
    model = mec_hub.create_model(config=tiny_weights_dir, head="projector")
    # The fixture folder: a ResNet-18 (512 features) with a 512-256-128 projector, 32 px preprocessing.
    assert model.config.architecture == "resnet18" and model.embed_dim == 128 and not model.training
    assert model.pretrained_cfg["input_size"] == [3, 32, 32] and model.weights_sha256 is None
    published = load_file(str(tiny_weights_dir / "model.safetensors"))
    random_init = model.backbone.state_dict()
    assert set(random_init) == set(published)
    assert not torch.equal(random_init["conv1.weight"], published["conv1.weight"])
    assert not torch.equal(random_init["layer4.1.conv2.weight"], published["layer4.1.conv2.weight"])
    with pytest.raises(ValueError, match="not from a download"):
        mec_hub.create_model(config="hf-hub:org/name")


@pytest.fixture
def no_downloads(monkeypatch):
    """Make any attempt to fetch weights fail the test."""
    from mec_hub.weights import sources

    def refuse(*args, **kwargs):
        raise AssertionError("an unpublished model must be refused before any download")

    for name in ("hf_download", "url_download", "_fetch_files"):
        monkeypatch.setattr(sources, name, refuse)
    monkeypatch.delenv("MEC_HUB_MEC_RESNET50_WEIGHTS", raising=False)


def _says_what_to_do(message: str, *, python: bool) -> None:
    assert "'mec_resnet50' has no published weights to download yet" in message
    # Python names its argument, the command line its flag, each not the other's.
    said, not_said = ("weights=DIR", "--weights") if python else ("--weights DIR", " weights=")
    assert "mec-hub convert" in message and said in message and not_said not in message, message
    assert "MEC_HUB_MEC_RESNET50_WEIGHTS=DIR" in message


def test_an_unpublished_model_is_refused_at_once(no_downloads):
    with pytest.raises(WeightsNotFoundError) as info:
        mec_hub.load("mec_resnet50")
    _says_what_to_do(str(info.value), python=True)


def test_cli_model_option_refuses_an_unpublished_model_at_once(no_downloads, photos_dir, tmp_path):
    from click.testing import CliRunner

    from mec_hub.cli.embed import main as embed_main
    from mec_hub.cli.hub import main as hub_main

    for main, args in [
        (embed_main, [str(photos_dir), "--out", str(tmp_path / "f.npy"), "--model", "mec_resnet50", "--quiet"]),
        (hub_main, ["download", "mec_resnet50"]),
    ]:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        _says_what_to_do(" ".join(result.output.split()), python=False)
