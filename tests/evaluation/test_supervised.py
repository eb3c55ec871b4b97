"""The supervised evaluations (the authors' linear protocol, semi-supervised fine-tuning) against re-typed references.

The references are the loops of the code each recipe comes from, written out here with plain torch:
the authors' ``benchmarks/linearprob/main_lincls.py`` (with NVIDIA apex's ``LARC``, as their
``linear.sh`` runs it) and Barlow Twins' ``evaluate.py --weights finetune``. The production side
is the real wiring: ``Classifier``, ``build_optimizer``, ``set_epoch_lr`` and ``train_step``, and
``run_supervised`` end to end on generated image folders.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from torch import nn

from mec_hub.cli.hub import main as mec_hub_cli
from mec_hub.data.datasets import GlobalBatchSampler
from mec_hub.data.transforms import get_transform
from mec_hub.errors import MecHubError
from mec_hub.evaluation import supervised
from mec_hub.evaluation.splits import load_eval_model
from mec_hub.evaluation.subsets import SubsetError, balanced_subset, read_subset_file, write_subset_file
from mec_hub.evaluation.supervised import (
    PAPER_LINEAR,
    SEMI_SUPERVISED,
    Classifier,
    build_optimizer,
    run_finetune,
    run_linear_paper,
    set_epoch_lr,
    train_step,
)
from mec_hub.runtime.devices import Precision
from tests.support.paths import REPO_ROOT

CLASSES = ("dots", "plain", "stripes")


def write_folder(root: Path, per_class: int, *, seed: int) -> Path:
    """An ImageFolder of 32 px images whose classes a small network can tell apart."""
    rng = np.random.default_rng(seed)
    for label in CLASSES:
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            pixels = (rng.random((32, 32, 3)) * 120).astype("uint8")
            if label == "stripes":
                pixels[:, ::4] = 255
            elif label == "dots":
                pixels[::6, ::6] = 255
            Image.fromarray(pixels).save(root / label / f"{label}_{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("folders")
    return write_folder(root / "train", 8, seed=0), write_folder(root / "val", 4, seed=1)


def batches(count: int, size: int, *, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(count)
    ]


# --------------------------------------------------------------------------------------------
# the authors' linear protocol, one step at a time


class ApexLARC:
    """NVIDIA apex's ``apex/parallel/LARC.py`` ``LARC.step``, re-typed (the optimizer the authors' --lars wraps)."""

    def __init__(self, optimizer, trust_coefficient=0.02, clip=True, eps=1e-8):
        self.optim, self.trust_coefficient, self.clip, self.eps = optimizer, trust_coefficient, clip, eps

    def zero_grad(self):
        self.optim.zero_grad()

    def step(self):
        with torch.no_grad():
            weight_decays = []
            for group in self.optim.param_groups:
                weight_decay = group.get("weight_decay", 0)
                weight_decays.append(weight_decay)
                group["weight_decay"] = 0
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    param_norm, grad_norm = torch.norm(p.data), torch.norm(p.grad.data)
                    if param_norm != 0 and grad_norm != 0:
                        adaptive_lr = self.trust_coefficient * param_norm / (
                            grad_norm + param_norm * weight_decay + self.eps
                        )
                        if self.clip:
                            adaptive_lr = min(adaptive_lr / group["lr"], 1)
                        p.grad.data += weight_decay * p.data
                        p.grad.data *= adaptive_lr
        self.optim.step()
        for i, group in enumerate(self.optim.param_groups):
            group["weight_decay"] = weight_decays[i]


class AuthorsLinclsModel(nn.Module):
    """main_lincls.py's model: the frozen backbone and ``fc = Sequential(BatchNorm1d(affine=False, eps=1e-6), fc)``."""

    def __init__(self, backbone: nn.Module, fc: nn.Linear):
        super().__init__()
        self.backbone = backbone
        for param in self.backbone.parameters():
            param.requires_grad = False
        self.fc = nn.Sequential(nn.BatchNorm1d(fc.in_features, affine=False, eps=1e-6), fc)

    def forward(self, x):
        return self.fc(self.backbone(x))


def test_a_step_of_the_paper_protocol_is_the_authors_main_lincls_step(tiny_weights_dir):
    epochs, batch = 2, 8
    recipe = PAPER_LINEAR.with_options(epochs=epochs, batch_size=batch)
    encoder = load_eval_model(weights=tiny_weights_dir)
    original = copy.deepcopy(encoder.state_dict())
    torch.manual_seed(3)
    ours = Classifier(copy.deepcopy(encoder), encoder.embed_dim, 3, head_norm=True, frozen=True)
    optimizer = build_optimizer(recipe, ours)

    fc = copy.deepcopy(ours.head[1])  # the same initial weights; their distribution is checked below
    theirs = AuthorsLinclsModel(copy.deepcopy(encoder), fc)
    init_lr = 0.03 * batch / 256  # "infer learning rate before changing batch size"
    parameters = [p for p in theirs.parameters() if p.requires_grad]
    assert len(parameters) == 2  # fc.weight, fc.bias
    their_optimizer = ApexLARC(
        torch.optim.SGD(parameters, init_lr, momentum=0.9, weight_decay=0.0), trust_coefficient=0.001, clip=False
    )
    criterion = nn.CrossEntropyLoss()

    data = batches(3, batch)
    for step, (images, target) in enumerate(data):
        epoch = step // 2  # two steps in epoch 0, one in epoch 1: the lr changes between them
        if step % 2 == 0:
            set_epoch_lr(optimizer, recipe, epoch)
            for group in their_optimizer.optim.param_groups:  # adjust_learning_rate
                group["lr"] = init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
        ours.train()
        train_step(ours, optimizer, images, target, precision=Precision("fp32", "cpu"))
        theirs.eval()
        theirs.fc.train()
        loss = criterion(theirs(images), target)
        their_optimizer.zero_grad()
        loss.backward()
        their_optimizer.step()

        torch.testing.assert_close(ours.head[1].weight, theirs.fc[1].weight, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(ours.head[1].bias, theirs.fc[1].bias, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(ours.head[0].running_mean, theirs.fc[0].running_mean, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(ours.head[0].running_var, theirs.fc[0].running_var, rtol=1e-6, atol=1e-9)
        ours_buffer = optimizer.state[ours.head[1].weight]["momentum_buffer"]
        their_buffer = their_optimizer.optim.state[theirs.fc[1].weight]["momentum_buffer"]
        torch.testing.assert_close(ours_buffer, their_buffer, rtol=1e-6, atol=1e-12)
    # The step moved the head, by LARC's small trust-scaled steps; the frozen backbone, BN statistics included,
    # is bit for bit what was loaded (the authors' sanity_check).
    assert not torch.equal(ours.head[1].bias, torch.zeros(3))
    for key, value in ours.encoder.state_dict().items():
        assert torch.equal(value, original[key]), key
    assert optimizer.param_groups[0]["lr"] == pytest.approx(init_lr * 0.5 * (1 + math.cos(math.pi / 2)))


def test_the_head_starts_as_the_authors_fc_and_the_paper_recipe_is_theirs():
    torch.manual_seed(0)
    head = Classifier(nn.Identity(), 2048, 1000, head_norm=True, frozen=True).head.requires_grad_(False)
    norm, fc = head
    assert isinstance(norm, nn.BatchNorm1d) and not norm.affine and norm.eps == 1e-6
    assert torch.equal(fc.bias, torch.zeros(1000))
    assert float(fc.weight.std()) == pytest.approx(0.01, rel=0.01) and abs(float(fc.weight.mean())) < 1e-4
    # main_lincls.py's defaults with linear.sh's --lars: 100 epochs, batch 4096, lr 0.03 x 4096/256, wd 0.
    assert (PAPER_LINEAR.epochs, PAPER_LINEAR.batch_size, PAPER_LINEAR.peak_lrs()) == (100, 4096, (0.48, 0.0))
    assert (PAPER_LINEAR.momentum, PAPER_LINEAR.weight_decay, PAPER_LINEAR.larc_trust) == (0.9, 0.0, 0.001)
    # Barlow Twins' README command for semi-supervised fine-tuning.
    assert (SEMI_SUPERVISED.epochs, SEMI_SUPERVISED.batch_size, SEMI_SUPERVISED.peak_lrs()) == (20, 256, (0.5, 0.002))
    assert SEMI_SUPERVISED.weight_decay == 0.0 and SEMI_SUPERVISED.larc_trust is None and not SEMI_SUPERVISED.head_norm


def test_a_fine_tuning_step_is_barlow_twins_evaluate_step(tiny_weights_dir):
    epochs, batch = 2, 8
    recipe = SEMI_SUPERVISED.with_options(epochs=epochs, batch_size=batch)
    encoder = load_eval_model(weights=tiny_weights_dir)
    torch.manual_seed(4)
    ours = Classifier(copy.deepcopy(encoder), encoder.embed_dim, 3, head_norm=False, frozen=False)
    optimizer = build_optimizer(recipe, ours)

    # evaluate.py: resnet50 with its fc, every parameter trained, two groups, SGD, CosineAnnealingLR per epoch.
    backbone, fc = copy.deepcopy(encoder), copy.deepcopy(ours.head[0])
    theirs = nn.Sequential(backbone, fc)
    param_groups = [dict(params=list(fc.parameters()), lr=0.5), dict(params=list(backbone.parameters()), lr=0.002)]
    their_optimizer = torch.optim.SGD(param_groups, 0, momentum=0.9, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(their_optimizer, epochs)
    criterion = nn.CrossEntropyLoss()

    for step, (images, target) in enumerate(batches(3, batch, seed=1)):
        if step % 2 == 0:
            set_epoch_lr(optimizer, recipe, step // 2)
            if step:
                scheduler.step()
        ours.train()
        train_step(ours, optimizer, images, target, precision=Precision("fp32", "cpu"))
        theirs.train()
        loss = criterion(theirs(images), target)
        their_optimizer.zero_grad()
        loss.backward()
        their_optimizer.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([g["lr"] for g in their_optimizer.param_groups])
    for mine, reference in ((ours.encoder, backbone), (ours.head[0], fc)):  # parameters and BN buffers
        expected = reference.state_dict()
        assert mine.state_dict().keys() == expected.keys()
        for key, value in mine.state_dict().items():
            torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-7, msg=key)
    moved = [k for k, v in backbone.state_dict().items() if not torch.equal(v, encoder.state_dict()[k])]
    assert any(k.endswith("weight") for k in moved) and any(k.endswith("running_mean") for k in moved)


def test_the_loss_is_the_global_batch_mean_however_the_batch_is_split():
    """Each process's summed loss x W / B, averaged over W processes by DDP, is the mean over the global batch."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    images, labels = torch.randn(10, 4), torch.randint(0, 3, (10,))
    whole = torch.autograd.grad(F.cross_entropy(model(images), labels), model.weight)[0]
    parts = []
    for part in (slice(0, 3), slice(3, 10)):  # unequal shares, as in a kept last batch
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        train_step(model, optimizer, images[part], labels[part], precision=Precision("fp32", "cpu"), world_size=2,
                   global_batch=10)  # fmt: skip
        parts.append(model.weight.grad.clone())
    torch.testing.assert_close((parts[0] + parts[1]) / 2, whole)  # what DDP's all-reduce mean makes of them


# --------------------------------------------------------------------------------------------
# data: kept last batches, subsets


def test_kept_last_batches_are_the_same_global_batches_for_any_number_of_ranks():
    n, batch = 21, 8
    single = GlobalBatchSampler(n, batch, seed=5, drop_last=False)
    single.set_epoch(2)
    expected = list(single)
    assert [len(b) for b in expected] == [8, 8, 5]
    assert sorted(i for b in expected for _, i in b) == list(range(n))  # every image once per epoch
    for world in (2, 4):
        shards = []
        for rank in range(world):
            sampler = GlobalBatchSampler(n, batch, rank=rank, world_size=world, seed=5, drop_last=False)
            sampler.set_epoch(2)
            shards.append(list(sampler))
        joined = [[pair for r in range(world) for pair in shards[r][s]] for s in range(len(expected))]
        assert joined == expected
        assert all(len(shards[r][-1]) >= 1 for r in range(world))
    # A data set smaller than a batch is one step; a tail smaller than the ranks is dropped, not given to a few.
    assert GlobalBatchSampler(5, 8, drop_last=False).steps_per_epoch == 1
    assert GlobalBatchSampler(17, 8, world_size=2, drop_last=False).steps_per_epoch == 2
    assert GlobalBatchSampler(18, 8, world_size=2, drop_last=False).steps_per_epoch == 3


def test_a_balanced_subset_takes_the_fraction_of_each_class_by_seed():
    samples = [(f"/d/c{label}/{i:03d}.png", label) for label, n in enumerate((100, 40, 7)) for i in range(n)]
    chosen = balanced_subset(samples, 0.1, seed=0)
    per_class = np.bincount([samples[i][1] for i in chosen])
    assert per_class.tolist() == [10, 4, 1]  # round(0.1 n), at least one
    assert chosen == balanced_subset(list(reversed(samples)) and samples, 0.1, seed=0)  # deterministic
    assert chosen != balanced_subset(samples, 0.1, seed=1)
    # A class's choice depends on its own files and the seed only: other classes do not move it.
    fewer = [s for s in samples if s[1] != 1]
    mine = {samples[i][0] for i in chosen if samples[i][1] == 0}
    assert mine == {fewer[i][0] for i in balanced_subset(fewer, 0.1, seed=0) if fewer[i][1] == 0}
    with pytest.raises(SubsetError, match=r"fraction of labels must be in \(0, 1\]"):
        balanced_subset(samples, 0.0)


def test_subset_files_read_and_write_the_communitys_format(tmp_path):
    root = tmp_path / "train"
    samples = [(str(root / "n01" / "n01_1.JPEG"), 0), (str(root / "n01" / "n01_2.JPEG"), 0),
               (str(root / "n02" / "n02_1.JPEG"), 1), (str(root / "n02" / "same.png"), 1),
               (str(root / "n03" / "same.png"), 2)]  # fmt: skip
    listing = tmp_path / "1percent.txt"
    listing.write_text("# a comment\nn01_2.JPEG\n\nn03/same.png\nn02_1.JPEG\n")
    assert read_subset_file(listing, samples, root) == [1, 2, 4]
    written = write_subset_file(tmp_path / "out.txt", samples, [1, 2, 4], root)
    assert written.read_text() == "n01_2.JPEG\nn02_1.JPEG\nn03/same.png\n"  # base names where unique
    assert read_subset_file(written, samples, root) == [1, 2, 4]
    for text, message in [
        ("n09_1.JPEG\n", "line 1: no image named 'n09_1.JPEG'"),
        ("n01_1.JPEG\nsame.png\n", "line 2: 'same.png' names 2 images (n02/same.png, n03/same.png); write CLASS/NAME"),
        ("n01_1.JPEG\nn01_1.JPEG\n", "line 2: 'n01_1.JPEG' is listed twice (first on line 1)"),
        ("n05/x.png\n", "line 1: no image 'n05/x.png'"),
        ("# nothing\n", "names no image"),
    ]:
        listing.write_text(text)
        with pytest.raises(SubsetError, match="subset list .*" + message.replace("(", r"\(").replace(")", r"\)")):
            read_subset_file(listing, samples, root)
    listing.write_bytes(b"\xff\xfe\n")
    with pytest.raises(SubsetError, match="not UTF-8 text"):
        read_subset_file(listing, samples, root)
    with pytest.raises(SubsetError, match="cannot read it"):
        read_subset_file(tmp_path / "missing.txt", samples, root)


# --------------------------------------------------------------------------------------------
# whole runs


def hand_top1(model: Classifier, val: Path, classes: list[str]) -> float:
    """Top-1 over ``val`` with a loop written here: PIL decode, the model's eval transform, argmax."""
    transform = get_transform(model.encoder)
    hits = total = 0
    model.eval()
    with torch.no_grad():
        for index, name in enumerate(classes):
            for path in sorted((val / name).iterdir()):
                logits = model(transform(Image.open(path).convert("RGB"))[None])
                hits += int(logits.argmax(dim=1).item() == index)
                total += 1
    return 100.0 * hits / total


def rebuilt(output_dir: Path, weights: Path | None, *, frozen: bool, name: str | None = None) -> Classifier:
    """The trained classifier, from the run's checkpoint and the encoder's weights (loaded afresh)."""
    state = torch.load(output_dir / supervised.CHECKPOINT, map_location="cpu", weights_only=True)
    encoder = load_eval_model(name, weights=weights)
    num_classes = len(state["identity"]["classes"])
    model = Classifier(encoder, encoder.embed_dim, num_classes, head_norm=frozen, frozen=frozen)
    model.head.load_state_dict(state["head"])
    if state["encoder"] is not None:
        model.encoder.load_state_dict(state["encoder"])
    return model


def test_the_paper_protocol_runs_resumes_exactly_and_reports_what_a_hand_loop_measures(
    folders, tiny_weights_dir, tmp_path, monkeypatch
):
    train, val = folders
    kwargs = {"weights": tiny_weights_dir, "epochs": 3, "batch_size": 8, "device": "cpu", "log": lambda *a, **k: None}
    whole = run_linear_paper(train, val, output_dir=tmp_path / "whole", **kwargs)
    assert whole.protocol == "linear-paper" and [h["epoch"] for h in whole.params["history"]] == [1, 2, 3]
    assert whole.params["departures"] == ["epochs 3 (the protocol's: 100)", "batch_size 8 (the protocol's: 4096)"]
    assert whole.params["peak_lr"] == 0.03 * 8 / 256 and "main_lincls.py" in whole.params["source"]
    assert whole.data["train"]["count"] == 24 and whole.data["val"]["count"] == 12
    on_disk = json.loads((tmp_path / "whole" / supervised.REPORT).read_text())
    assert on_disk["results"] == whole.results and on_disk["model"]["weights_sha256"] == whole.model["weights_sha256"]
    model = rebuilt(tmp_path / "whole", tiny_weights_dir, frozen=True)
    assert whole.results["top1"] == pytest.approx(hand_top1(model, val, whole.data["classes"]))

    # Stopped during epoch 2's validation (after epoch 1's checkpoint), then the same call again.
    calls = []
    real_validate = supervised._validate

    def crash_on_second(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_validate(*args, **kw)

    monkeypatch.setattr(supervised, "_validate", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_linear_paper(train, val, output_dir=tmp_path / "resumed", **kwargs)
    assert torch.load(tmp_path / "resumed" / supervised.CHECKPOINT, weights_only=True)["epoch"] == 1
    monkeypatch.setattr(supervised, "_validate", real_validate)
    resumed = run_linear_paper(train, val, output_dir=tmp_path / "resumed", **kwargs)
    a = torch.load(tmp_path / "whole" / supervised.CHECKPOINT, weights_only=True)
    b = torch.load(tmp_path / "resumed" / supervised.CHECKPOINT, weights_only=True)
    for key in a["head"]:
        assert torch.equal(a["head"][key], b["head"][key]), key
    assert resumed.results == whole.results
    assert [h["loss"] for h in resumed.params["history"]] == [h["loss"] for h in whole.params["history"]]

    # Another evaluation in the same folder is refused, naming what differs.
    with pytest.raises(MecHubError, match=r"belongs to another evaluation.*seed: checkpoint 0, now 1"):
        run_linear_paper(train, val, output_dir=tmp_path / "whole", seed=1, **kwargs)


def test_fine_tuning_on_a_fraction_writes_its_subset_and_the_list_gives_the_same_run(
    folders, tiny_weights_dir, tmp_path
):
    train, val = folders
    kwargs = {"weights": tiny_weights_dir, "epochs": 2, "batch_size": 4, "device": "cpu", "log": lambda *a, **k: None}
    by_fraction = run_finetune(train, val, output_dir=tmp_path / "fraction", labels_fraction=0.25, **kwargs)
    listed = (tmp_path / "fraction" / supervised.SUBSET_FILE).read_text().splitlines()
    assert len(listed) == 6 and sorted({name.split("_")[0] for name in listed}) == list(CLASSES)  # 2 per class
    assert all((train / name.split("_")[0] / name).is_file() for name in listed)
    assert by_fraction.data["train"]["count"] == 6 and by_fraction.data["train"]["of"] == 24
    assert by_fraction.protocol == "finetune" and by_fraction.params["peak_lr_backbone"] == 0.002

    by_list = run_finetune(
        train, val, output_dir=tmp_path / "list", subset=tmp_path / "fraction" / supervised.SUBSET_FILE, **kwargs
    )
    assert by_list.data["train"]["images_sha256"] == by_fraction.data["train"]["images_sha256"]
    assert by_list.results == by_fraction.results
    model = rebuilt(tmp_path / "list", tiny_weights_dir, frozen=False)
    assert by_list.results["top1"] == pytest.approx(hand_top1(model, val, by_list.data["classes"]))
    with pytest.raises(MecHubError, match="needs a fraction of the labels or a subset list"):
        run_finetune(train, val, output_dir=tmp_path / "none", **kwargs)


def test_the_bundled_model_under_both_protocols_on_cifar_images(cifar_dir, tmp_path):
    """Tiny settings on real data: a slice of cifar10-subset (20 training, 10 test images a class)."""
    for split, count in (("train", 20), ("test", 10)):
        for folder in sorted(p for p in (cifar_dir / split).iterdir() if p.is_dir()):
            (tmp_path / split / folder.name).mkdir(parents=True)
            for src in sorted(folder.iterdir())[:count]:
                (tmp_path / split / folder.name / src.name).write_bytes(src.read_bytes())
    train, test = tmp_path / "train", tmp_path / "test"
    kwargs = {"name": "mec_resnet18_cifar10s", "device": "cpu", "log": lambda *a, **k: None}
    linear = run_linear_paper(train, test, output_dir=tmp_path / "lin", epochs=2, batch_size=64, **kwargs)
    tuned = run_finetune(
        train, test, output_dir=tmp_path / "ft", labels_fraction=0.1, epochs=2, batch_size=10, **kwargs
    )
    assert linear.data["train"]["count"] == 200 and tuned.data["train"]["count"] == 20  # 2 a class
    assert linear.data["val"]["count"] == tuned.data["val"]["count"] == 100
    for report, out, frozen in ((linear, "lin", True), (tuned, "ft", False)):
        assert report.model["model"] == "mec_resnet18_cifar10s" and report.model["weights_sha256"]
        model = rebuilt(tmp_path / out, None, frozen=frozen, name="mec_resnet18_cifar10s")
        assert report.results["top1"] == pytest.approx(hand_top1(model, test, report.data["classes"]))


def test_the_cli_runs_the_paper_protocol_and_refuses_the_probes_options(folders, tiny_weights_dir, tmp_path):
    train, val = folders
    common = ["--weights", str(tiny_weights_dir), "--train", str(train), "--val", str(val), "--device", "cpu"]
    result = CliRunner().invoke(
        mec_hub_cli,
        ["eval", "linear", "--protocol", "paper", *common, "--output-dir", str(tmp_path / "run"), "--epochs", "1",
         "--batch-size", "8", "--out", str(tmp_path / "r.json")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert f"top-1 {report['results']['top1']:.2f}%" in result.output and report["protocol"] == "linear-paper"
    assert report["argv"] and (tmp_path / "run" / "report.json").is_file()
    for extra, message in [
        (["--weight-decay", "0.1"], "--weight-decay does not go with --protocol paper"),
        (["--save-features", str(tmp_path / "f")], "--save-features does not go with --protocol paper"),
    ]:
        refused = CliRunner().invoke(mec_hub_cli, ["eval", "linear", "--protocol", "paper", *common, *extra])
        assert refused.exit_code == 2 and message in refused.output
    probe = CliRunner().invoke(mec_hub_cli, ["eval", "linear", *common, "--epochs", "3"])
    assert probe.exit_code == 2 and "--epochs does not go with --protocol probe" in probe.output
    no_dir = CliRunner().invoke(mec_hub_cli, ["eval", "linear", "--protocol", "paper", *common])
    assert no_dir.exit_code == 2 and "give --output-dir DIR" in no_dir.output
    neither = CliRunner().invoke(mec_hub_cli, ["eval", "finetune", *common, "--output-dir", str(tmp_path / "ft")])
    assert neither.exit_code == 2 and "give --labels-fraction F or --subset FILE" in neither.output


@pytest.mark.slow
def test_two_torchrun_processes_fine_tune_and_count_each_validation_image_once(folders, tiny_weights_dir, tmp_path):
    train, val = folders
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "mec_hub.cli.hub", "eval", "finetune", "--weights", str(tiny_weights_dir), "--train", str(train),
        "--val", str(val), "--labels-fraction", "0.5", "--epochs", "2", "--batch-size", "6", "--device", "cpu",
        "--output-dir", str(tmp_path / "run"),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["params"]["processes"] == 2 and report["data"]["val"]["count"] == 12
    assert report["data"]["train"]["count"] == 12 and len(report["params"]["history"]) == 2
    assert done.stdout.count("top-1") == 3  # two epoch lines and the summary, from process 0 only
