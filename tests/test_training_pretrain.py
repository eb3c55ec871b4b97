"""training/pretrain.py end to end on tiny generated images: metrics, checkpoint, export, exact resume, DDP."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import mec_hub
import training.pretrain as pretrain
from mec_hub.models.losses import MECLossOutput
from training import checkpoint as ckpt
from training.config import parse_args
from training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training" / "pretrain.py"
STEPS = 6  # 16 images, batch 8: 2 steps per epoch, 3 epochs
TIMING = ("images_per_s", "epoch_time_s", "data_time_s", "compute_time_s", "elapsed_s", "eta_s")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """16 PNGs of 32 px in two class folders that a kNN can tell apart (one has a white left half)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in ("plain", "striped"):
        (root / label).mkdir()
        for i in range(8):
            pixels = (rng.random((32, 32, 3)) * 255).astype("uint8")
            if label == "striped":
                pixels[:, :16] = 255
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


def arguments(images: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data", str(images), "--output-dir", str(out),
        "--arch", "resnet10t", "--image-size", "32", "--dim", "32", "--hidden-dim", "64", "--pred-dim", "16",
        "--batch-size", "8", "--epochs", "3", "--warmup-epochs", "1", "--lamda-warmup-epochs", "1",
        "--eps2", "64",  # the paper's value, which the default would scale up for a batch of 8
        "--workers", "0", "--log-every", "1", "--device", "cpu", "--no-tensorboard",
        "--knn-train", str(images), "--knn-val", str(images), "--knn-every", "2", "--knn-k", "5",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    assert pretrain.main(arguments(images, out)) == 0
    return out


def load(out: Path) -> dict:
    return torch.load(out / "checkpoint_last.pt", map_location="cpu", weights_only=True)


def assert_same_training_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for index, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][index]["momentum_buffer"])


def logged(out: Path) -> list[dict]:
    """Step and epoch lines without the timing fields, which no two runs share."""
    return [
        {k: v for k, v in r.items() if k not in TIMING}
        for r in read_metrics(out / "metrics.jsonl")
        if r["kind"] in ("step", "epoch")
    ]


def test_a_run_logs_checkpoints_and_exports(uninterrupted, images):
    records = read_metrics(uninterrupted / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    keys = {
        "step",
        "epoch",
        "loss",
        "coding_length",
        "lr",
        "lamda_inv",
        "teacher_momentum",
        "images_per_s",
        "spectral_norm",
    }
    for record in steps:
        assert keys <= record.keys()
        assert all(isinstance(record[k], float | int) and np.isfinite(record[k]) for k in keys)
    assert steps[0]["lr"] == 0.0 and steps[0]["lamda_inv"] == 8 * 8 * 64.0 / 32  # 8 / lamda, lamda = d / (m eps^2)
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1.0, 2.0, 3.0]
    assert ["knn_top1" in r for r in epochs] == [False, True, True]
    assert 0 <= epochs[-1]["knn_top1"] <= 100

    state = load(uninterrupted)  # weights_only=True: plain data only
    assert state["format"] == "mec-hub-train/1" and state["step"] == STEPS
    assert state["arch"] == "resnet10t" and state["stem"] == "default" and state["model_args"] == {}
    prefixes = {k.split(".")[0] + "." + k.split(".")[1] for k in state["model"] if not k.startswith("predictor.")}
    assert prefixes == {"student.backbone", "student.projector", "teacher.backbone", "teacher.projector"}
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model"])
    pre = state["export"]["preprocessing"]
    assert pre["input_size"] == [3, 32, 32] and pre["crop_pct"] == 1.0 and pre["interpolation"] == "bilinear"
    meta = state["export"]["meta"]
    assert meta["epochs"] == 3 and meta["batch_size"] == 8 and meta["eps2"] == 64.0 and meta["order"] == 4
    assert "training/pretrain.py --data" in meta["command"] and meta["knn_top1"] == round(epochs[-1]["knn_top1"], 2)

    # The export loads with mec_hub and with plain timm, and computes what the checkpoint's student does.
    student = timm.create_model("resnet10t", num_classes=0)
    student.load_state_dict(
        {k[len("student.backbone.") :]: v for k, v in state["model"].items() if k.startswith("student.backbone.")}
    )
    student.eval()
    x = torch.randn(3, 3, 32, 32)
    loaded = mec_hub.load(weights=uninterrupted / "export")
    assert loaded.pretrained_cfg["input_size"] == [3, 32, 32] and loaded.pretrained_cfg["crop_pct"] == 1.0
    with torch.no_grad():
        expected = student(x)
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-6)
        plain = timm.create_model(f"local-dir:{uninterrupted / 'export'}", pretrained=True).eval()
        torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-6)
        with_projector = mec_hub.load(weights=uninterrupted / "export", head="projector")
        assert with_projector(x).shape == (3, 32)


def test_export_only_writes_the_teacher_on_request(uninterrupted, images, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(uninterrupted, out)
    shutil.rmtree(out / "export")
    assert pretrain.main(["--output-dir", str(out), "--export-only", "--export-from", "teacher"]) == 0
    loaded = mec_hub.load(weights=out / "export")
    teacher = {
        k[len("teacher.backbone.") :]: v for k, v in load(out)["model"].items() if k.startswith("teacher.backbone.")
    }
    for key, value in loaded.backbone.state_dict().items():
        assert torch.equal(value, teacher[key])


def test_stopping_at_max_steps_and_rerunning_reaches_the_same_weights(uninterrupted, images, tmp_path):
    assert pretrain.main(arguments(images, tmp_path, "--max-steps", "3")) == 0
    assert load(tmp_path)["step"] == 3
    assert (tmp_path / "export" / "model.safetensors").exists()  # a smoke run exports too
    assert pretrain.main(arguments(images, tmp_path)) == 0
    assert_same_training_state(load(tmp_path), load(uninterrupted))
    assert logged(tmp_path) == logged(uninterrupted)


def test_a_killed_run_resumes_to_the_same_weights(uninterrupted, images, tmp_path):
    log = tmp_path / "killed.log"
    with open(log, "w") as fh:
        process = subprocess.Popen(
            [sys.executable, str(SCRIPT), *arguments(images, tmp_path, "--save-every-steps", "1")],
            cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        try:
            while not (tmp_path / "checkpoint_last.pt").exists():
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "no checkpoint after 300 s"
                time.sleep(0.05)
        finally:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
    killed_at = load(tmp_path)["step"]
    assert 1 <= killed_at < STEPS, log.read_text()
    assert pretrain.main(arguments(images, tmp_path, "--save-every-steps", "1")) == 0
    assert_same_training_state(load(tmp_path), load(uninterrupted))
    assert logged(tmp_path) == logged(uninterrupted)  # no line lost or repeated


def test_rerunning_with_another_recipe_is_refused(uninterrupted, images, capsys):
    before = (uninterrupted / "checkpoint_last.pt").stat().st_mtime_ns
    assert pretrain.main(arguments(images, uninterrupted, "--lr", "0.25", "--epochs", "4")) == 1
    err = capsys.readouterr().err
    assert "--lr: checkpoint 0.5, command 0.25" in err and "--epochs: checkpoint 3, command 4" in err
    assert (uninterrupted / "checkpoint_last.pt").stat().st_mtime_ns == before


def test_a_non_finite_loss_stops_the_run_before_saving(images, tmp_path, monkeypatch, capsys):
    real_step = pretrain.train_step
    calls = []

    def poisoned_step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # the first step of epoch 2
            return MECLossOutput(out.loss * math.nan, out.coding_length * math.nan, out.spectral_norm)
        return out

    monkeypatch.setattr(pretrain, "train_step", poisoned_step)
    assert pretrain.main(arguments(images, tmp_path)) == 1
    err = capsys.readouterr().err
    assert "the loss is nan at step 3 (epoch 2, step 1 of 2)" in err and "--lr" in err and "fp32" in err
    assert load(tmp_path)["step"] == 2  # the end of epoch 1, before the bad step


def test_two_processes_with_torchrun(images, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
         *arguments(images, tmp_path, "--max-steps", "2", "--knn-every", "1")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = load(tmp_path)
    assert state["step"] == 2 and state["world_size"] == 2
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "step"] == [1, 2]
    assert mec_hub.load(weights=tmp_path / "export").embed_dim == 512


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("/data/cifar10-subset/train", "cifar10-subset/train"),
        ("/data/imagenet/val", "imagenet/val"),
        ("/data/my_photos", "my_photos"),
        ("train", "train"),
    ],
)
def test_exports_name_the_data_set_not_just_its_split_folder(data, expected):
    assert pretrain.dataset_name(data) == expected


@pytest.mark.parametrize(
    ("batch", "eps2"),
    [(1024, 64.0), (4096, 64.0), (256, 256.0), (128, 512.0), (64, 1024.0), (8, 8192.0)],
)
def test_default_eps2_is_the_papers_at_its_batch_and_keeps_lamda_below(batch, eps2):
    parser = pretrain.build_parser()
    args = parse_args(["--data", "d", "--output-dir", "o", "--batch-size", str(batch)], parser)
    args = pretrain.check_args(args, parser, world_size=1)
    assert args.eps2 == eps2
    d = args.dim
    assert d / (batch * args.eps2) == min(d / (batch * 64.0), d / (1024 * 64.0))  # lamda never above the paper's
    explicit = parse_args(["--data", "d", "--output-dir", "o", "--batch-size", str(batch), "--eps2", "64"], parser)
    explicit = pretrain.check_args(explicit, parser, world_size=1)
    assert explicit.eps2 == 64.0
    config = pretrain.recipe_config(args, hidden_dim=512, num_images=5000)
    assert config["eps2"] == eps2 and config["batch_size"] == batch


def test_the_recipe_config_holds_every_option_the_resume_check_compares():
    parser = pretrain.build_parser()
    args = parse_args(["--data", "imgs", "--output-dir", "o", "--arch", "resnet18", "--lr", "0.3"], parser)
    args = pretrain.check_args(args, parser, world_size=1)
    config = pretrain.recipe_config(args, hidden_dim=512, num_images=5000)
    assert set(config) == {*ckpt.RECIPE_KEYS, "data", "extend_epochs", "schedule_restarts", "init_from"}
    assert config["arch"] == "resnet18" and config["lr"] == 0.3 and config["eps2"] == 64.0
    assert config["hidden_dim"] == 512 and config["num_images"] == 5000 and config["data"] == "imgs"
    assert config["weight_decay"] == 1e-5 and config["order"] == 4 and config["model_args"] == {}
    # What the resume check compared before the options became TrainConfig's fields is still compared.
    assert set(ckpt.RECIPE_KEYS) >= {
        "arch", "model_args", "stem", "image_size", "augmentation", "dim", "hidden_dim", "pred_dim", "epochs",
        "batch_size", "lr", "weight_decay", "momentum", "optimizer", "eps2", "order", "teacher_momentum",
        "warmup_epochs", "lamda_warmup_epochs", "lamda_warmup_factor", "seed", "num_images",
    }  # fmt: skip
