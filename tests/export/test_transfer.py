"""`mec-hub convert --to detectron2|torchvision`: the backbone in the layouts detection code reads.

The Detectron2 names are checked against a table built here from Detectron2's ResNet structure
(stem, res2..res5 with their block counts, convK with its norm, the projection shortcut); the
torchvision file against torchvision's own ResNet, whose pooled features must be ours.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from click.testing import CliRunner
from torch import nn
from torchvision.models.detection import fasterrcnn_resnet50_fpn

import mec_hub
from mec_hub.cli.hub import main as hub_main
from mec_hub.errors import IncompatibleWeightsError
from mec_hub.export.convert import ExtractedWeights, write_hub_folder
from mec_hub.export.detectron2 import to_detectron2
from mec_hub.weights.config import IMAGENET_MEAN, IMAGENET_STD
from tests.support.official_checkpoint import make_official_checkpoint

RESNET50_BLOCKS = (3, 4, 6, 3)
BN_PARAMS = ("weight", "bias", "running_mean", "running_var")


def detectron2_names_of_resnet(blocks: tuple[int, ...], convs_per_block: int, *, res2_shortcut: bool) -> dict[str, str]:
    """timm key -> Detectron2 key, enumerated from Detectron2's ResNet: BasicStem ``stem.conv1``
    (norm inside), stages ``res2``..``res5``, blocks with ``conv1..convN`` (norm inside each) and,
    in a stage's first block, the projection ``shortcut`` (norm inside) where the shape changes:
    every stage of a bottleneck ResNet, res3..res5 of a basic-block one."""
    table = {"conv1.weight": "stem.conv1.weight"}
    table.update({f"bn1.{p}": f"stem.conv1.norm.{p}" for p in BN_PARAMS})
    for stage_index, count in enumerate(blocks):
        timm_stage, d2_stage = f"layer{stage_index + 1}", f"res{stage_index + 2}"
        for block in range(count):
            for k in range(1, convs_per_block + 1):
                table[f"{timm_stage}.{block}.conv{k}.weight"] = f"{d2_stage}.{block}.conv{k}.weight"
                for p in BN_PARAMS:
                    table[f"{timm_stage}.{block}.bn{k}.{p}"] = f"{d2_stage}.{block}.conv{k}.norm.{p}"
        if stage_index == 0 and not res2_shortcut:
            continue
        table[f"{timm_stage}.0.downsample.0.weight"] = f"{d2_stage}.0.shortcut.weight"
        for p in BN_PARAMS:
            table[f"{timm_stage}.0.downsample.1.{p}"] = f"{d2_stage}.0.shortcut.norm.{p}"
    return table


def randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=gen) * 0.4 - 0.2)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                module.bias.copy_(torch.rand(module.bias.shape, generator=gen) * 0.4 - 0.2)
                module.num_batches_tracked.fill_(7)
    return model


@pytest.fixture(scope="module")
def resnet50_state(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A timm resnet50 (random weights, classifier included) saved as a plain state dict."""
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("resnet50"), seed=1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("r50") / "resnet50_state.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def resnet50_folder(resnet50_state, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights as a converted folder (what `mec-hub convert` writes)."""
    _, state = resnet50_state
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    extracted = ExtractedWeights(architecture="resnet50", backbone=backbone, projector=None, layout="test")
    out = tmp_path_factory.mktemp("r50folder") / "mec_resnet50_test"
    write_hub_folder(extracted, out, name="mec_resnet50_test")
    return out


def convert(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(hub_main, ["convert", *args])
    return result.exit_code, result.output


class OnlyArrays(pickle.Unpickler):
    """Loads only what NumPy 1.x and 2.x both name alike: a pickle that needs more fails here."""

    def find_class(self, module: str, name: str):  # type: ignore[override]
        if (module, name) in {("numpy", "ndarray"), ("builtins", "bytearray")}:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"the pickle needs {module}.{name}")


@pytest.mark.parametrize("source", ["state dict", "folder"])
def test_detectron2_pickle_holds_every_resnet50_tensor_under_its_detectron2_name(
    resnet50_state, resnet50_folder, tmp_path, source
):
    state_path, state = resnet50_state
    out = tmp_path / "r50.pkl"
    code, output = convert(
        str(state_path if source == "state dict" else resnet50_folder), "--to", "detectron2", "--out", str(out)
    )
    assert code == 0, output

    with open(out, "rb") as fh:  # as Detectron2's DetectionCheckpointer reads a .pkl
        data = pickle.load(fh, encoding="latin1")
    assert set(data) == {"model", "__author__", "matching_heuristics"}
    assert data["matching_heuristics"] is True and data["__author__"] == "mec-hub"

    table = detectron2_names_of_resnet(RESNET50_BLOCKS, convs_per_block=3, res2_shortcut=True)
    timm_keys = {k for k in state if not k.endswith("num_batches_tracked") and not k.startswith("fc.")}
    assert set(table) == timm_keys  # the table covers every tensor Detectron2 holds, no more
    assert sorted(data["model"]) == sorted(table.values())
    for timm_key, d2_key in table.items():
        array = data["model"][d2_key]
        assert isinstance(array, np.ndarray) and array.dtype == np.float32, d2_key
        assert np.array_equal(array, state[timm_key].numpy()), d2_key
    assert not any("num_batches_tracked" in k or k.startswith("fc") for k in data["model"])
    assert "MODEL.PIXEL_MEAN: [123.675, 116.28, 103.53]" in output and "INPUT.FORMAT: RGB" in output
    assert "MODEL.RESNETS.STRIDE_IN_1X1: False" in output and "MODEL.RESNETS.NORM: SyncBN" in output


def test_detectron2_pickle_needs_only_names_every_numpy_has(resnet50_state, tmp_path):
    state_path, state = resnet50_state
    out = tmp_path / "r50.pkl"
    assert convert(str(state_path), "--to", "detectron2", "--out", str(out))[0] == 0
    data = OnlyArrays(io.BytesIO(out.read_bytes()), encoding="latin1").load()
    array = data["model"]["res2.0.conv1.weight"]
    assert array.flags.writeable and array.flags.c_contiguous  # torch.from_numpy takes it without a warning
    assert np.array_equal(array, state["layer1.0.conv1.weight"].numpy())


def test_detectron2_pixel_statistics_come_from_the_weights_config(tmp_path):
    from tests.support.weights import make_tiny_hub_folder

    folder = make_tiny_hub_folder(tmp_path / "tiny")  # resnet18, ImageNet statistics
    code, output = convert(str(folder), "--to", "detectron2", "--out", str(tmp_path / "r18.pkl"))
    assert code == 0, output
    mean = [round(255 * m, 3) for m in IMAGENET_MEAN]
    std = [round(255 * s, 3) for s in IMAGENET_STD]
    assert f"MODEL.PIXEL_MEAN: {mean}" in output and f"MODEL.PIXEL_STD: {std}" in output
    assert "MODEL.RESNETS.DEPTH: 18" in output and "MODEL.RESNETS.RES2_OUT_CHANNELS: 64" in output
    with open(tmp_path / "r18.pkl", "rb") as fh:
        names = set(pickle.load(fh)["model"])
    assert names == set(detectron2_names_of_resnet((2, 2, 2, 2), convs_per_block=2, res2_shortcut=False).values())


def test_weights_detectron2_cannot_build_are_refused_by_name(tmp_path):
    small_stem = dict(timm.create_model("resnet18", num_classes=0).state_dict())
    small_stem["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    with pytest.raises(IncompatibleWeightsError, match="3x3"):
        to_detectron2(small_stem)
    deep_stem = timm.create_model("resnet18d", num_classes=0).state_dict()
    with pytest.raises(IncompatibleWeightsError, match=r"conv1\.0\.weight"):
        to_detectron2({"conv1.weight": torch.zeros(64, 3, 7, 7), **deep_stem})
    # The bundled model is half-width: neither framework builds it from its depth.
    for to in ("detectron2", "torchvision"):
        code, output = convert("bundled:mec_resnet18_cifar10s", "--to", to, "--out", str(tmp_path / f"x.{to}"))
        assert code == 1 and "channels" in output and "Traceback" not in output, output
        assert not (tmp_path / f"x.{to}").exists()


def test_existing_output_is_kept_without_overwrite(resnet50_state, tmp_path):
    state_path, _ = resnet50_state
    out = tmp_path / "r50.pth"
    out.write_bytes(b"keep me")
    code, output = convert(str(state_path), "--to", "torchvision", "--out", str(out))
    assert code == 1 and "--overwrite" in output and out.read_bytes() == b"keep me"
    assert convert(str(state_path), "--to", "torchvision", "--out", str(out), "--overwrite")[0] == 0
    assert torch.load(out, weights_only=True).keys()


def test_torchvision_resnet50_loads_it_missing_only_fc_and_pools_as_we_do(resnet50_folder, tmp_path):
    out = tmp_path / "r50.pth"
    code, output = convert(str(resnet50_folder), "--to", "torchvision", "--out", str(out))
    assert code == 0, output
    tv = torchvision.models.resnet50()
    report = tv.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert sorted(report.missing_keys) == ["fc.bias", "fc.weight"] and report.unexpected_keys == []
    tv.fc = nn.Identity()
    ours = mec_hub.load(weights=resnet50_folder)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(tv.eval()(x), ours(x), rtol=0, atol=0)
    # The README's detector: the file is exactly the body of torchvision's Faster R-CNN backbone.
    detector = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    detector.backbone.body.load_state_dict(torch.load(out, weights_only=True), strict=True)


def test_torchvision_export_of_the_authors_checkpoint_is_their_encoder(tmp_path):
    checkpoint = tmp_path / "mec_resnet18.pth.tar"
    original = make_official_checkpoint(checkpoint, arch="resnet18", dim=32, seed=5)
    out = tmp_path / "r18.pth"
    code, output = convert(str(checkpoint), "--to", "torchvision", "--out", str(out))
    assert code == 0, output
    tv = torchvision.models.resnet18()
    report = tv.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert sorted(report.missing_keys) == ["fc.bias", "fc.weight"] and report.unexpected_keys == []
    tv.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(tv.eval()(x), original.pooled(x), rtol=0, atol=0)


# --------------------------------------------------------------------------- where the file is written


@pytest.fixture(scope="module")
def r18_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    checkpoint = tmp_path_factory.mktemp("r18") / "mec_resnet18.pth.tar"
    make_official_checkpoint(checkpoint, arch="resnet18", dim=32, seed=5)
    return checkpoint


def _one_error_line(result) -> str:
    assert isinstance(result.exception, SystemExit), result.exception  # no exception escaped the command
    assert "Traceback" not in result.output and result.output.count("\n") == 1, result.output
    return result.output


@pytest.mark.parametrize("to", ["torchvision", "detectron2"])
def test_an_existing_folder_as_out_is_bad_usage_even_with_overwrite(r18_checkpoint, tmp_path, to):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        result = CliRunner().invoke(
            hub_main, ["convert", str(r18_checkpoint), "--to", to, "--out", str(folder), *extra]
        )
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert f"--out {folder} is a folder; --to {to} writes a file" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights"]
    assert [p.name for p in folder.iterdir()] == ["keep.txt"] and (folder / "keep.txt").read_text() == "mine"
    from mec_hub.export.outputs import OutputPathError
    from mec_hub.export.transfer import export_backbone

    with pytest.raises(OutputPathError, match="is a folder, and a file goes here"):
        export_backbone(r18_checkpoint, to, folder, overwrite=True)


@pytest.mark.parametrize("to", ["torchvision", "detectron2"])
@pytest.mark.parametrize("where", ["/proc", "under a file"])
def test_an_unwritable_out_file_is_one_line(r18_checkpoint, tmp_path, to, where):
    (tmp_path / "file.txt").write_text("not a folder")
    out = Path(f"/proc/mec_hub_test.{to}") if where == "/proc" else tmp_path / "file.txt" / "r18.pth"
    result = CliRunner().invoke(hub_main, ["convert", str(r18_checkpoint), "--to", to, "--out", str(out)])
    assert result.exit_code == 1
    assert _one_error_line(result).startswith(f"Error: cannot write {out}: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]
