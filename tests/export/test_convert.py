"""Conversion of checkpoints to the published folder, checked against the original networks."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors import safe_open

import mec_hub
from mec_hub.cli.hub import main as hub_main
from mec_hub.errors import CheckpointReadError, IncompatibleWeightsError
from mec_hub.export.convert import convert_checkpoint
from mec_hub.export.outputs import OutputPathError
from mec_hub.weights.checkpoint import TRAIN_FORMAT
from mec_hub.weights.integrity import UnverifiedWeightsWarning, sha256_file
from tests.support.official_checkpoint import make_official_checkpoint
from tests.support.paths import REPO_ROOT


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("official")
    ckpt = folder / "mec_resnet18.pth.tar"
    model = make_official_checkpoint(ckpt, arch="resnet18", dim=64, seed=3)
    return ckpt, model


@pytest.fixture(scope="module")
def converted(official, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ckpt, _ = official
    out = tmp_path_factory.mktemp("converted") / "mec_resnet18"
    convert_checkpoint(ckpt, out, name="mec_resnet18_test")
    return out


def _images(seed: int = 0, n: int = 3, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_backbone_equals_original_encoder_pooled_output(official, converted):
    _, original = official
    x = _images()
    model = mec_hub.load(weights=converted)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original.pooled(x), rtol=0, atol=1e-5)
    assert model.embed_dim == 512 and not model.training


def test_projector_head_equals_original_encoder_output(official, converted):
    _, original = official
    x = _images(1)
    model = mec_hub.load(weights=converted, head="projector")
    with torch.no_grad():
        torch.testing.assert_close(model(x), original.encoder(x), rtol=0, atol=1e-5)
    assert model.embed_dim == 64


def test_teacher_export_holds_the_teacher(official, tmp_path):
    ckpt, original = official
    out = convert_checkpoint(ckpt, tmp_path / "teacher", source="teacher").folder
    x = _images(2)
    with torch.no_grad():
        got = mec_hub.load(weights=out)(x)
        torch.testing.assert_close(got, original.pooled(x, "teacher"), rtol=0, atol=1e-5)
        assert not torch.allclose(got, original.pooled(x, "encoder"), atol=1e-3)


def test_folder_layout_digests_and_card(converted):
    names = sorted(p.name for p in converted.iterdir())
    assert names == ["README.md", "config.json", "model.safetensors", "projector.safetensors"]
    config = json.loads((converted / "config.json").read_text())
    assert config["architecture"] == "resnet18" and config["num_classes"] == 0 and config["num_features"] == 512
    assert config["pretrained_cfg"]["input_size"] == [3, 224, 224]
    card = (converted / "README.md").read_text()
    for fname in ("model.safetensors", "projector.safetensors"):
        digest = sha256_file(converted / fname)
        assert config["mec_hub"]["files"][fname] == digest
        assert digest in card
    with safe_open(str(converted / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
    assert "conv1.weight" in keys and not any(k.startswith("fc.") for k in keys)


def test_conversion_is_deterministic(official, converted, tmp_path):
    ckpt, _ = official
    again = convert_checkpoint(ckpt, tmp_path / "again", name="mec_resnet18_test").folder
    for fname in ("model.safetensors", "projector.safetensors", "config.json"):
        assert (again / fname).read_bytes() == (converted / fname).read_bytes(), fname


def test_timm_local_dir_loads_the_folder_identically(official, converted):
    _, original = official
    x = _images(3)
    model = timm.create_model(f"local-dir:{converted}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), original.pooled(x), rtol=0, atol=1e-5)
    assert model.pretrained_cfg["crop_pct"] == 0.875


def test_lone_safetensors_file_is_self_describing(official, converted, tmp_path):
    _, original = official
    lone = tmp_path / "weights.safetensors"
    lone.write_bytes((converted / "model.safetensors").read_bytes())
    x = _images(4)
    with torch.no_grad():
        torch.testing.assert_close(mec_hub.load(weights=lone)(x), original.pooled(x), rtol=0, atol=1e-5)


def test_torch_hub_local_entrypoint_with_weights_path(tmp_path):
    ckpt = tmp_path / "r50.pth.tar"
    original = make_official_checkpoint(ckpt, arch="resnet50", dim=32, seed=5)
    folder = convert_checkpoint(ckpt, tmp_path / "r50").folder
    x = _images(5, n=2)
    with pytest.warns(UnverifiedWeightsWarning, match="UNVERIFIED"):
        model = torch.hub.load(str(REPO_ROOT), "mec_resnet50", source="local", weights=str(folder))
    with torch.no_grad():
        torch.testing.assert_close(model(x), original.pooled(x), rtol=0, atol=1e-4)
    assert model.pretrained_cfg["input_size"] == [3, 224, 224]
    # torch.hub.help reads GitHub only; it prints the entry point's docstring, checked here.
    spec = importlib.util.spec_from_file_location("hubconf_under_test", REPO_ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    assert "70.8% ImageNet linear top-1 under the authors' linear protocol" in hubconf.mec_resnet50.__doc__
    assert {"torch", "timm", "safetensors"} <= set(hubconf.dependencies)


def test_registry_model_refuses_weights_of_another_architecture(converted):
    with pytest.raises(mec_hub.errors.MecHubError, match=r"holds a resnet18.*resnet50"):
        mec_hub.load("mec_resnet50", weights=converted)


def test_plain_state_dict_drops_classifier(tmp_path):
    torch.manual_seed(0)
    net = timm.create_model("resnet18", num_classes=10).eval()
    ckpt = tmp_path / "plain.pt"
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, ckpt)
    result = convert_checkpoint(ckpt, tmp_path / "plain", arch="resnet18")
    assert result.dropped == ["fc.bias", "fc.weight"]
    assert not (result.folder / "projector.safetensors").exists()
    x = _images(6)
    with torch.no_grad():
        expected = net.forward_head(net.forward_features(x), pre_logits=True)
        torch.testing.assert_close(mec_hub.load(weights=result.folder)(x), expected)


def test_training_checkpoint_layout(tmp_path):
    from mec_hub.models.encoder import build_backbone
    from mec_hub.models.heads import build_projector

    torch.manual_seed(1)
    parts = {
        "student.backbone": build_backbone("resnet18", stem="small"),
        "student.projector": build_projector(512, 128, 32),
        "teacher.backbone": build_backbone("resnet18", stem="small"),
        "teacher.projector": build_projector(512, 128, 32),
    }
    state = {f"{prefix}.{k}": v for prefix, m in parts.items() for k, v in m.state_dict().items()}
    ckpt = tmp_path / "checkpoint_last.pt"
    preprocessing = {"input_size": [3, 32, 32], "crop_pct": 1.0, "interpolation": "bilinear"}
    torch.save(
        {
            "format": TRAIN_FORMAT,
            "arch": "resnet18",
            "model_args": {},
            "stem": "small",
            "model": state,
            "export": {"preprocessing": preprocessing, "meta": {"epochs": 3}},
        },
        ckpt,
    )
    folder = convert_checkpoint(ckpt, tmp_path / "export", source="teacher").folder
    model = mec_hub.load(weights=folder)
    x = _images(7, size=32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), parts["teacher.backbone"].eval()(x))
    assert model.pretrained_cfg["input_size"] == [3, 32, 32]
    assert json.loads((folder / "config.json").read_text())["mec_hub"]["stem"] == "small"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"this is not a checkpoint", "not a readable PyTorch checkpoint"),
    ],
)
def test_unreadable_checkpoints(tmp_path, content, message):
    ckpt = tmp_path / "bad.pth.tar"
    ckpt.write_bytes(content)
    with pytest.raises(CheckpointReadError, match=message):
        convert_checkpoint(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_checkpoint(official, tmp_path):
    ckpt, _ = official
    cut = tmp_path / "cut.pth.tar"
    cut.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(CheckpointReadError, match="corrupted or truncated"):
        convert_checkpoint(cut, tmp_path / "out")


def test_pickled_objects_are_refused(tmp_path):
    ckpt = tmp_path / "with_args.pth.tar"
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=0.5)}, ckpt)
    with pytest.raises(CheckpointReadError, match="weights_only"):
        convert_checkpoint(ckpt, tmp_path / "out")


def test_wrong_architecture_lists_the_keys(official, tmp_path):
    ckpt, _ = official
    with pytest.raises(IncompatibleWeightsError, match=r"resnet34 backbone.*missing keys: layer1\.2\."):
        convert_checkpoint(ckpt, tmp_path / "out", arch="resnet34")


def test_existing_output_is_kept(official, converted, tmp_path):
    ckpt, _ = official
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputPathError, match="already exists"):
        convert_checkpoint(ckpt, out)
    assert (out / "keep.txt").read_text() == "mine"


def test_missing_and_unexpected_keys_are_listed_on_load(converted, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "edited"
    folder.mkdir()
    state = load_file(str(converted / "model.safetensors"))
    del state["layer4.1.bn2.weight"]
    state["head.extra"] = torch.zeros(1)
    save_file(state, str(folder / "model.safetensors"))
    config = json.loads((converted / "config.json").read_text())
    config["mec_hub"]["files"] = {}
    (folder / "config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expected = r"missing keys: layer4\.1\.bn2\.weight.*unexpected keys: head\.extra"
        with pytest.raises(IncompatibleWeightsError, match=expected):
            mec_hub.load(weights=folder)


def test_corrupted_local_file_is_refused_by_digest(converted, tmp_path):
    folder = tmp_path / "corrupt"
    folder.mkdir()
    for p in converted.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-100] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(mec_hub.errors.ChecksumMismatchError, match=r"expected [0-9a-f]{64}, got [0-9a-f]{64}"):
        mec_hub.load(weights=folder)
    assert (folder / "model.safetensors").exists()  # a user's own file is reported, never deleted


class _RunsACommand:
    """Unpickling this would call os.system("true"): what a hostile checkpoint does."""

    def __reduce__(self):
        return (os.system, ("true",))


def _write_hostile(path: Path, how: str) -> Path:
    payload = {"state_dict": {"conv1.weight": _RunsACommand()}}
    if how == "zip":
        torch.save(payload, path)
    elif how == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload))
    return path


@pytest.mark.parametrize("how", ["zip", "legacy", "plain pickle"])
def test_a_pickle_that_would_run_a_command_is_refused_as_unsafe(tmp_path, how):
    ckpt = _write_hostile(tmp_path / "hostile.pth.tar", how)
    with pytest.raises(CheckpointReadError) as info:
        convert_checkpoint(ckpt, tmp_path / "out")
    result = CliRunner().invoke(hub_main, ["convert", str(ckpt), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    for message in (str(info.value), result.output):
        assert "refused" in message and "unsafe" in message and "system" in message, message
        assert "corrupted" not in message and "truncated" not in message, message
        assert "weights_only=False" not in message and "weights_only` set to `False" not in message, message
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- where convert writes


def _one_error_line(result) -> str:
    """The CLI's whole output, checked to be one ``Error:`` line and no traceback."""
    assert isinstance(result.exception, SystemExit), result.exception  # no exception escaped the command
    assert "Traceback" not in result.output and result.output.count("\n") == 1, result.output
    assert result.output.startswith("Error: "), result.output
    return result.output


@pytest.mark.parametrize("where", ["/proc", "under a file"])
def test_convert_to_an_unwritable_place_is_one_line(official, tmp_path, where):
    ckpt, _ = official
    (tmp_path / "file.txt").write_text("not a folder")
    out = Path("/proc/mec_hub_test_out") if where == "/proc" else tmp_path / "file.txt" / "out"
    result = CliRunner().invoke(hub_main, ["convert", str(ckpt), "--out", str(out)])
    assert result.exit_code == 1
    assert _one_error_line(result).startswith(f"Error: cannot write {out}: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # nothing else, no temporary folder


def test_a_failed_write_keeps_the_old_folder_and_leaves_nothing(official, converted, tmp_path, monkeypatch):
    ckpt, _ = official
    old = tmp_path / "out"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    import mec_hub.export.convert as convert_module

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise OSError(28, "No space left on device", filename)

    monkeypatch.setattr(convert_module, "save_file", disk_full)
    result = CliRunner().invoke(hub_main, ["convert", str(ckpt), "--out", str(old), "--overwrite"])
    assert result.exit_code == 1
    assert _one_error_line(result).startswith(f"Error: cannot write {old}: No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and [p.name for p in old.iterdir()] == ["keep.txt"]
    # Folders made for an output that was never written are removed again.
    nested = tmp_path / "new" / "deeper" / "out"
    result = CliRunner().invoke(hub_main, ["convert", str(ckpt), "--out", str(nested)])
    assert result.exit_code == 1 and not (tmp_path / "new").exists()


def test_a_file_as_out_folder_is_bad_usage_even_with_overwrite(official, tmp_path):
    ckpt, _ = official
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    result = CliRunner().invoke(hub_main, ["convert", str(ckpt), "--out", str(out), "--overwrite"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"--out {out} is a file" in result.output
    assert out.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    with pytest.raises(OutputPathError, match="is a file, and a folder goes here"):
        convert_checkpoint(ckpt, out, overwrite=True)
    assert out.read_text() == "mine"


def test_a_folder_or_fifo_as_checkpoint_says_what_it_is(tmp_path):
    from mec_hub.weights.checkpoint import read_checkpoint

    with pytest.raises(CheckpointReadError, match="is a folder"):
        read_checkpoint(tmp_path)
    fifo = tmp_path / "pipe.pth"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointReadError, match="named pipe"):
        read_checkpoint(fifo)  # refused at once, without blocking on the pipe
