"""What a weights file says about itself is a claim: names are verified, configs are validated.

A file (or folder, or download) that names a registry model is checked against that model's
published SHA-256; one that no known digest vouches for loads with the loud warning and not
under the registry's name. ``config.json`` and the safetensors header steer timm only through
an allow-list of architecture arguments and sane preprocessing values.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

import mec_hub
from mec_hub.errors import ChecksumMismatchError, MecHubError
from mec_hub.weights.config import METADATA_KEY, ModelConfig
from mec_hub.weights.integrity import UnverifiedWeightsWarning
from tests.support.weights import make_tiny_hub_folder

BUNDLED = Path(mec_hub.__file__).parent / "bundled" / "mec_resnet18_cifar10s"
X48 = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("imgs")
    for i in range(2):
        Image.new("RGB", (40, 30), (60 * i, 100, 200 - 50 * i)).save(folder / f"im{i}.png")
    return folder


def _flip_exponent_bit(src: Path, dst: Path) -> None:
    """Copy a safetensors file with bit 30 (an exponent bit) of its first float32 flipped."""
    data = bytearray(src.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    name = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    data[8 + header_len + header[name]["data_offsets"][0] + 3] ^= 0x40  # little-endian: byte 3 holds bit 30
    dst.write_bytes(bytes(data))


def _embed(args: list[str]):
    from mec_hub.cli.embed import main

    return CliRunner().invoke(main, args)


def _one_line_error(result, exit_code: int = 1) -> str:
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


# -- defect 4: a file that claims a registry identity ---------------------------------------------


def test_lone_copy_of_the_bundled_file_with_a_flipped_bit_is_refused(tmp_path, images):
    bad = tmp_path / "copy.safetensors"
    _flip_exponent_bit(BUNDLED / "model.safetensors", bad)
    with pytest.raises(ChecksumMismatchError) as info:
        mec_hub.load(weights=bad)
    assert str(bad) in str(info.value)
    assert hashlib.sha256(bad.read_bytes()).hexdigest() in str(info.value)
    assert bad.exists()  # a user's own file is reported, never deleted

    line = _one_line_error(_embed([str(images), "--out", str(tmp_path / "f.npy"), "--weights", str(bad), "-q"]))
    assert "SHA-256 mismatch" in line and str(bad) in line
    assert not (tmp_path / "f.npy").exists()


def test_an_intact_lone_copy_is_the_registry_model(tmp_path):
    good = tmp_path / "copy.safetensors"
    shutil.copyfile(BUNDLED / "model.safetensors", good)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = mec_hub.load(weights=good)
    assert model.name == "mec_resnet18_cifar10s"
    assert model.weights_sha256 == hashlib.sha256((BUNDLED / "model.safetensors").read_bytes()).hexdigest()
    with torch.no_grad():
        torch.testing.assert_close(model(X48), mec_hub.load()(X48), rtol=0, atol=0)


def test_a_folder_cannot_vouch_for_itself_under_a_registry_name(tmp_path):
    """Tampered weights with config.json's digest updated to match: the registry's digest decides."""
    folder = tmp_path / "copy"
    shutil.copytree(BUNDLED, folder)
    _flip_exponent_bit(BUNDLED / "model.safetensors", folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config["mec_hub"]["files"]["model.safetensors"] = hashlib.sha256(
        (folder / "model.safetensors").read_bytes()
    ).hexdigest()
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ChecksumMismatchError, match=r"SHA-256 mismatch for .*copy/model\.safetensors"):
        mec_hub.load(weights=folder)
    with pytest.raises(ChecksumMismatchError):
        mec_hub.load(weights=folder / "model.safetensors")


def test_a_claim_no_digest_can_check_loads_unverified_and_unnamed(tmp_path):
    """mec_resnet50 has no published digest: a folder or lone file calling itself that is not it."""
    folder = make_tiny_hub_folder(tmp_path / "claims_r50", name="mec_resnet50")
    lone = tmp_path / "lone" / "weights.safetensors"
    lone.parent.mkdir()
    shutil.copyfile(folder / "model.safetensors", lone)
    reference = load_file(str(folder / "model.safetensors"))
    for weights in (folder, lone):
        with pytest.warns(UnverifiedWeightsWarning, match="UNVERIFIED WEIGHTS.*mec_resnet50"):
            model = mec_hub.load(weights=weights)
        assert model.name != "mec_resnet50"
        assert model.config.architecture == "resnet18"  # the file's own description, unnamed
        for key, value in model.backbone.state_dict().items():
            assert torch.equal(value, reference[key]), key


def test_a_file_naming_no_registry_model_keeps_its_name_quietly(tiny_weights_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = mec_hub.load(weights=tiny_weights_dir)
    assert model.name == "tiny_resnet18"


# -- defect 5 and item 6: config.json and header metadata are validated ---------------------------


def _mutate(data: dict, change: str) -> str:
    """Apply one malformation; return the field the error must name."""
    if change == "mec_hub as a string":
        data["mec_hub"] = "mec_resnet18"
        return "mec_hub"
    if change == "pretrained_cfg as a list":
        data["pretrained_cfg"] = [3, 32, 32]
        return "pretrained_cfg"
    if change == "extra projector key":
        data["mec_hub"]["projector"]["extra_dim"] = 7
        return "extra_dim"
    if change == "unknown model arg":
        data["model_args"] = {"checkpoint_path": "evil.pt"}
        return "checkpoint_path"
    if change == "model_args as a list":
        data["model_args"] = [32, 64, 128, 224]
        return "model_args"
    if change == "input_size as a string":
        data["pretrained_cfg"]["input_size"] = "3x32x32"
        return "input_size"
    if change == "unknown interpolation":
        data["pretrained_cfg"]["interpolation"] = "fancy"
        return "interpolation"
    if change == "unknown stem":
        data["mec_hub"]["stem"] = "tiny"
        return "stem"
    raise AssertionError(change)


MALFORMED = [
    "mec_hub as a string",
    "pretrained_cfg as a list",
    "extra projector key",
    "unknown model arg",
    "model_args as a list",
    "input_size as a string",
    "unknown interpolation",
    "unknown stem",
]


@pytest.mark.parametrize("change", MALFORMED)
def test_malformed_config_json_is_one_clear_line(change, tiny_weights_dir, tmp_path, images):
    folder = tmp_path / "w"
    shutil.copytree(tiny_weights_dir, folder)
    data = json.loads((folder / "config.json").read_text())
    field = _mutate(data, change)
    (folder / "config.json").write_text(json.dumps(data))

    with pytest.raises(MecHubError) as info:
        mec_hub.load(weights=folder)
    message = str(info.value)
    assert str(folder / "config.json") in message and field in message, message
    with pytest.raises(MecHubError, match=field):
        mec_hub.create_model(config=folder)

    line = _one_line_error(_embed([str(images), "--out", str(tmp_path / "f.npy"), "--weights", str(folder), "-q"]))
    assert str(folder / "config.json") in line and field in line


def _evil_pickle(path: Path) -> Path:
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"state_dict": {"x": Evil()}}, path)
    return path


def test_model_args_from_a_header_never_reach_torch_load(tiny_weights_dir, tmp_path, monkeypatch):
    """The safetensors header, like config.json, cannot make timm unpickle a file."""
    evil = _evil_pickle(tmp_path / "evil.pt")
    data = json.loads((tiny_weights_dir / "config.json").read_text())
    data["model_args"] = {"checkpoint_path": str(evil)}
    lone = tmp_path / "lone.safetensors"
    save_file(
        load_file(str(tiny_weights_dir / "model.safetensors")), str(lone), metadata={METADATA_KEY: json.dumps(data)}
    )

    def spy(*args, **kwargs):
        raise AssertionError(f"torch.load was reached with {args}")

    monkeypatch.setattr(torch, "load", spy)
    for build in (mec_hub.load, mec_hub.create_model):  # the weights, or random ones in their architecture
        with pytest.raises(MecHubError, match=r"model_args\.checkpoint_path"):
            build(**{"weights" if build is mec_hub.load else "config": lone})


def test_a_huge_input_size_is_refused_at_once(tiny_weights_dir, tmp_path):
    folder = tmp_path / "w"
    shutil.copytree(tiny_weights_dir, folder)
    data = json.loads((folder / "config.json").read_text())
    data["pretrained_cfg"]["input_size"] = [3, 100000, 100000]
    (folder / "config.json").write_text(json.dumps(data))
    start = time.monotonic()
    with pytest.raises(MecHubError, match=r"input_size"):
        mec_hub.Embedder(weights=folder)
    assert time.monotonic() - start < 30


def _base() -> dict:
    return json.loads((BUNDLED / "config.json").read_text())


def _set(data: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    node = data
    for key in parents:
        node = node[key]
    node[last] = value
    return data


@pytest.mark.parametrize(
    ("dotted", "value"),
    [
        ("architecture", "hf-hub:org/model"),
        ("architecture", "local-dir:/tmp/x"),
        ("architecture", "vit_base_patch16_224"),  # not a ResNet
        ("architecture", 18),
        ("num_features", True),
        ("num_features", -1),
        ("model_args.pretrained_cfg_overlay", {"file": "x.pth"}),
        ("model_args.channels", [32, 64, "many", 224]),
        ("model_args.channels", [1_000_000, 64, 128, 224]),
        ("model_args.layers", [2, 2, 2, 100_000]),
        ("model_args.stem_type", "huge"),
        ("model_args.cardinality", 2.5),
        ("pretrained_cfg.input_size", [3, 100000, 100000]),
        ("pretrained_cfg.input_size", [3, 4, 4]),
        ("pretrained_cfg.input_size", [1, 48, 48]),
        ("pretrained_cfg.input_size", [3, 48]),
        ("pretrained_cfg.input_size", [3, 48.5, 48]),
        ("pretrained_cfg.crop_pct", 0),
        ("pretrained_cfg.crop_pct", 2.0),
        ("pretrained_cfg.crop_pct", 1e-6),
        ("pretrained_cfg.crop_pct", "0.9"),
        ("pretrained_cfg.mean", [0.5, 0.5]),
        ("pretrained_cfg.mean", [0.5, float("nan"), 0.5]),
        ("pretrained_cfg.std", [0.2, 0.0, 0.2]),
        ("pretrained_cfg.std", [0.2, -1, 0.2]),
        ("pretrained_cfg.crop_mode", "zoom"),
        ("pretrained_cfg.interpolation", "random"),
        ("mec_hub.projector.out_dim", 0),
        ("mec_hub.projector.hidden_dim", 10**9),
        ("mec_hub.format_version", 99),
        ("mec_hub.files", ["model.safetensors"]),
        ("mec_hub.files.model.safetensors", "not-a-digest"),
        ("mec_hub.name", ["a"]),
        ("mec_hub.meta", "text"),
        ("mec_hub.surprise", 1),
    ],
)
def test_each_field_outside_the_allowed_values_is_named(dotted, value):
    data = _base()
    if dotted == "mec_hub.files.model.safetensors":
        data["mec_hub"]["files"]["model.safetensors"] = value
        field = "files"
    elif dotted == "model_args.pretrained_cfg_overlay":
        data["model_args"]["pretrained_cfg_overlay"] = value
        field = "pretrained_cfg_overlay"
    else:
        _set(data, dotted, value)
        field = dotted.split(".")[-1]
    with pytest.raises(MecHubError) as info:
        ModelConfig.from_json_dict(data, origin="cfg.json")
    message = str(info.value)
    assert message.startswith("cfg.json:") and field in message and "\n" not in message, message


def test_every_shipped_and_timm_resnet_argument_still_reads():
    """The allow-list keeps what real configs hold: the bundled model and timm's ResNet variants."""
    shipped = ModelConfig.from_json_dict(_base(), origin="bundled")
    assert replace(shipped, meta={}) == replace(mec_hub.model_info("mec_resnet18_cifar10s").config, meta={})
    data = _base()
    data["model_args"] = {
        "layers": [1, 1, 1, 1],
        "channels": [16, 32, 64, 128],
        "stem_width": 16,
        "stem_type": "deep_tiered",
        "avg_down": True,
        "cardinality": 2,
        "base_width": 32,
        "replace_stem_pool": False,
        "block_reduce_first": 1,
        "down_kernel_size": 1,
    }
    data["architecture"] = "resnet50d"
    data["num_features"] = 512
    data["mec_hub"]["files"] = {}
    config = ModelConfig.from_json_dict(data, origin="t")
    model = mec_hub.models.encoder.build_encoder(config)
    assert model(torch.zeros(1, 3, 48, 48)).shape == (1, 512)


# -- smaller ones ---------------------------------------------------------------------------------


def test_hub_ids_hf_would_reject_are_one_clear_line(tmp_path, images):
    for bad in ("hf-hub:../../etc@main", "hf-hub:org/na me", "hf-hub:a/b/c"):
        with pytest.raises(MecHubError, match="repo id"):
            mec_hub.load(weights=bad, endpoint="http://127.0.0.1:9", cache_dir=tmp_path)
    line = _one_line_error(
        _embed([str(images), "--out", str(tmp_path / "f.npy"), "--weights", "hf-hub:../../etc@main", "-q"]),
        exit_code=2,
    )
    assert "../../etc" in line


def test_arguments_of_the_wrong_type_are_named():
    with pytest.raises(TypeError, match="name"):
        mec_hub.load(123)
    with pytest.raises(TypeError, match="name"):
        mec_hub.model_info(None)
    with pytest.raises(TypeError, match="weights"):
        mec_hub.load(weights=123)
    with pytest.raises(MecHubError, match=r"device.*'tpu'"):
        mec_hub.load(device="tpu")
