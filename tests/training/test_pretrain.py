"""training/pretrain.py end to end on tiny generated images: metrics, checkpoint, export, exact resume, DDP."""

from __future__ import annotations

import errno
import inspect
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
from mec_hub.models.losses import MECLoss, MECLossOutput
from tests.support.images import write_noise_images
from tests.support.paths import REPO_ROOT
from training import checkpoint as ckpt
from training import config as train_config
from training import distributed, loop, recipe, resume
from training.config import parse_args
from training.metrics import read_metrics

SCRIPT = REPO_ROOT / "training" / "pretrain.py"
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
        "--eps2", "64",  # the paper's value (the default), stated as the recipes do
        "--num-workers", "0", "--log-every", "1", "--device", "cpu", "--no-tensorboard",
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


# 5 s; test_stopping_at_max_steps_and_rerunning_reaches_the_same_weights keeps resume in the default suite
@pytest.mark.slow  # a run killed and resumed
def test_a_killed_run_resumes_to_the_same_weights(uninterrupted, images, tmp_path):
    log = tmp_path / "killed.log"
    with open(log, "w") as fh:
        process = subprocess.Popen(
            [sys.executable, str(SCRIPT), *arguments(images, tmp_path, "--save-every-steps", "1")],
            cwd=REPO_ROOT, stdout=fh, stderr=subprocess.STDOUT,
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
    real_step = loop.train_step
    calls = []

    def poisoned_step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # the first step of epoch 2
            return MECLossOutput(out.loss * math.nan, out.coding_length * math.nan, out.spectral_norm)
        return out

    monkeypatch.setattr(loop, "train_step", poisoned_step)
    assert pretrain.main(arguments(images, tmp_path)) == 1
    err = capsys.readouterr().err
    assert "the loss is nan at step 3 (epoch 2, step 1 of 2)" in err and "--lr" in err and "fp32" in err
    assert load(tmp_path)["step"] == 2  # the end of epoch 1, before the bad step


@pytest.mark.slow
def test_two_processes_with_torchrun(images, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
         *arguments(images, tmp_path, "--max-steps", "2", "--knn-every", "1")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
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
    assert resume.dataset_name(data) == expected


def authors_lamda_schedule(lamda: float, epochs: int, steps_per_epoch: int, warmup_epochs: int = 10) -> np.ndarray:
    """1/lamda per step as the authors' main_pretrain.py makes it (``lamda_scheduler``), re-typed."""
    warmup = np.linspace(8 / lamda, 1 / lamda, warmup_epochs * steps_per_epoch)
    return np.concatenate((warmup, np.ones(epochs * steps_per_epoch - len(warmup)) / lamda))


def authors_loss(p1, z1, p2, z2, lamda_inv, order=4):
    """The authors' training loss (main_pretrain.py ``loss_func`` and its use), re-typed; one process."""

    def loss_func(p, z):
        p, z = torch.nn.functional.normalize(p), torch.nn.functional.normalize(z)
        c = p @ z.T / lamda_inv
        power, total = c, torch.zeros_like(c)
        for k in range(1, order + 1):
            if k > 1:
                power = power @ c
            total = total + power / k if (k + 1) % 2 == 0 else total - power / k
        return torch.trace(total)

    m = p1.shape[0]
    return -((loss_func(p1, z2) + loss_func(p2, z1)) * 0.5 / m) * lamda_inv


def structured_views(m: int, d: int, rank: int, seed: int = 0):
    """Float64 teacher embeddings z1, z2 and student predictions p1, p2 of m images lying near a rank-``rank``
    subspace, as trained embeddings do (a spread the series notices, unlike isotropic noise)."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    base = torch.randn(m, rank, generator=g, dtype=f64) @ torch.randn(rank, d, generator=g, dtype=f64)
    scale = base.norm(dim=1, keepdim=True).mean() / d**0.5

    def near(x, amount):
        return x + amount * scale * torch.randn(m, d, generator=g, dtype=f64)

    z1, z2 = near(base, 0.5), near(base, 0.5)
    return near(z1, 0.3).requires_grad_(), z1, near(z2, 0.3).requires_grad_(), z2


def test_without_eps2_a_run_at_batch_256_trains_the_authors_objective(tmp_path):
    """The run's own schedules and loss, built from the command line with no --eps2, against the authors' code."""
    m, d, epochs = 256, 2048, 12
    (tmp_path / "images").mkdir()
    data = write_noise_images(tmp_path / "images", count=m, size=8)
    parser = pretrain.build_parser()
    argv = ["--data", str(data), "--output-dir", str(tmp_path / "out"), "--arch", "resnet10t", "--image-size", "8",
            "--batch-size", str(m), "--epochs", str(epochs), "--num-workers", "0", "--device", "cpu"]  # fmt: skip
    args = pretrain.check_args(parse_args(argv, parser), parser, world_size=1)
    run = loop.Run(args, distributed.setup("cpu"), command="test")
    assert run.args.dim == d and run.steps_per_epoch == 1 and run.criterion.eps2 == 64.0
    theirs = authors_lamda_schedule(d / (m * 64.0), epochs, 1)  # their lamda = d / (m * eps), eps = 64
    ours = [run.schedules.at(step).lamda_inv for step in range(epochs)]
    np.testing.assert_allclose(ours, theirs, rtol=1e-13)

    p1, z1, p2, z2 = structured_views(m, d, rank=128)
    lamda_inv = run.schedules.at(epochs - 1).lamda_inv
    out = run.criterion(p1, z1, p2, z2, lamda_inv=lamda_inv)
    assert 0.2 < float(out.spectral_norm) < 1  # inside the series' region, where the objectives can differ
    expected = authors_loss(p1, z1, p2, z2, theirs[-1])
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=0)
    got, want = (torch.cat([g.flatten() for g in torch.autograd.grad(x, (p1, p2))]) for x in (out.loss, expected))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-15)
    # What the default was before (64 x 1024 / m, lamda as at batch 1024) is another objective, not a rescaling.
    scaled = MECLoss(64.0 * 1024 / m, warn_on_divergence=False)(p1, z1, p2, z2, lamda_inv=m * 256.0 / d)
    other = torch.cat([g.flatten() for g in torch.autograd.grad(scaled.loss, (p1, p2))])
    assert torch.nn.functional.cosine_similarity(other, want, dim=0) < 0.99


@pytest.mark.parametrize("batch", [4096, 1024, 256, 128, 65])
def test_the_default_eps2_is_the_papers_at_every_batch_and_scaled_is_asked_for(batch):
    parser = pretrain.build_parser()
    base = ["--data", "d", "--output-dir", "o", "--batch-size", str(batch)]
    assert pretrain.check_args(parse_args(base, parser), parser, world_size=1).eps2 == 64.0
    scaled = pretrain.check_args(parse_args([*base, "--eps2", "scaled"], parser), parser, world_size=1)
    assert scaled.eps2 == 64.0 * 1024 / batch
    assert 2048 / (batch * scaled.eps2) == 2048 / (1024 * 64.0)  # lamda as at the paper's batch
    config = recipe.recipe_config(scaled, hidden_dim=512, num_images=5000)
    assert config["eps2"] == 64.0 * 1024 / batch  # the checkpoint records the number, as resolved


@pytest.mark.parametrize(("batch", "dim"), [(64, 2048), (8, 2048), (16, 512)])
def test_a_tiny_batch_without_eps2_stops_and_names_both_ways_out(batch, dim, capsys):
    parser = pretrain.build_parser()
    argv = ["--data", "d", "--output-dir", "o", "--batch-size", str(batch), "--dim", str(dim)]
    with pytest.raises(SystemExit) as stopped:
        pretrain.check_args(parse_args(argv, parser), parser, world_size=1)
    assert stopped.value.code == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and line.startswith("training/pretrain.py: error: --batch-size")
    assert f"= {dim / (batch * 64):.3g} at or above 0.5" in line
    assert f"a global batch of at least {dim // 32 + 1}" in line and "--eps2 scaled" in line
    # Given explicitly, any eps^2 is the user's choice: no refusal.
    for eps2 in ("64", "scaled"):
        pretrain.check_args(parse_args([*argv, "--eps2", eps2], parser), parser, world_size=1)


def test_a_run_whose_eps2_is_not_the_papers_says_so_at_its_start_and_in_its_config(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    data = write_noise_images(tmp_path / "images", count=8, size=16)
    out = tmp_path / "run"
    argv = ["--data", str(data), "--output-dir", str(out), "--arch", "resnet10t", "--image-size", "16",
            "--dim", "32", "--hidden-dim", "32", "--pred-dim", "8", "--batch-size", "8", "--epochs", "1",
            "--warmup-epochs", "0", "--lamda-warmup-epochs", "0",
            "--eps2", "scaled", "--num-workers", "0", "--device", "cpu", "--no-tensorboard"]  # fmt: skip
    assert pretrain.main(argv) == 0
    printed = capsys.readouterr().out
    note = "eps^2 is 8192, not the paper's 64 (--eps2 scaled: 64 x 1024 / 8, lamda as at the paper's batch of 1024)"
    assert f"note: {note}" in printed
    config = (out / "config.yaml").read_text()
    assert f"# {note}" in config and yaml_value(config, "eps2") == 8192.0
    meta = load(out)["export"]["meta"]
    assert meta["eps2"] == 8192.0 and "eps^2 8192 (--eps2 scaled" in meta["recipe"]
    # The paper's value says nothing of the kind.
    assert train_config.eps2_note(64.0, 8) is None


def yaml_value(text: str, key: str):
    import yaml

    return yaml.safe_load(text)[key]


def test_resuming_a_run_of_the_old_default_names_the_option_that_continues_it():
    saved = {"eps2": 256.0, "batch_size": 256}
    current = {"eps2": 64.0, "batch_size": 256}
    (line,) = [d for d in ckpt.recipe_differences(saved, current) if d.startswith("--eps2")]
    assert line.startswith("--eps2: checkpoint 256.0, command 64.0") and "pass --eps2 scaled" in line
    explicit = ckpt.recipe_differences({"eps2": 100.0, "batch_size": 256}, current)
    assert not any("scaled" in d for d in explicit)  # only the old default's value gets the hint


def test_the_recipe_config_holds_every_option_the_resume_check_compares():
    parser = pretrain.build_parser()
    args = parse_args(["--data", "imgs", "--output-dir", "o", "--arch", "resnet18", "--lr", "0.3"], parser)
    args = pretrain.check_args(args, parser, world_size=1)
    config = recipe.recipe_config(args, hidden_dim=512, num_images=5000)
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


# --------------------------------------------------------------------------------------------
# what a run says when it cannot go on (issue 21: one line, no traceback)


def test_a_full_disk_at_a_checkpoint_is_one_line_naming_the_intact_previous_one(images, tmp_path, monkeypatch, capsys):
    """The second checkpoint's write fails with ENOSPC; the first stays as it was, byte for byte."""
    last = tmp_path / "checkpoint_last.pt"
    real_save = torch.save
    previous: list[bytes] = []

    def save_until_the_disk_is_full(obj, f, *args, **kwargs):
        if last.exists():  # the second checkpoint: the disk is full now
            previous.append(last.read_bytes())
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    assert pretrain.main(arguments(images, tmp_path, "--save-every-steps", "1")) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"{last} at step 2" in err and "[Errno 28]" in err and "ENOSPC" in err
    assert f"the previous checkpoint {last} (step 1) is intact" in err
    assert len(previous) == 1 and last.read_bytes() == previous[0]
    assert load(tmp_path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # no half-written file left


def test_a_model_argument_the_architecture_does_not_take_is_one_line_before_any_data_is_read(images, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exited:
        pretrain.main(arguments(images, out, "--model-args", '{"width_multiplier": 0.25}'))
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "resnet10t" in err and "'width_multiplier'" in err
    # The arguments it does take, as timm's ResNet declares them.
    accepted = [name for name in inspect.signature(timm.models.resnet.ResNet.__init__).parameters if name != "self"]
    assert f"it takes: {', '.join(accepted)}" in err
    assert not out.exists()  # stopped before the run made its folder or listed the images


def test_device_cuda_without_a_gpu_is_one_line_and_exit_2(images, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exited:
        pretrain.main(arguments(images, out, "--device", "cuda"))  # the later --device wins
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("training/pretrain.py: error: --device cuda asks for CUDA, but torch"), err
    assert "sees no GPU" in err
    assert not out.exists()
