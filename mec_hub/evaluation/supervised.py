"""Evaluations that train on labelled images: the authors' linear protocol and semi-supervised fine-tuning.

Both put a linear classifier on a pretrained encoder, train on an ImageFolder with augmentations,
and report top-1/top-5 on a validation folder after the last epoch. They differ in a
:class:`Recipe`:

``linear-paper`` (:data:`PAPER_LINEAR`), the protocol behind the MEC paper's linear numbers, as the
authors' ``benchmarks/linearprob/main_lincls.py`` runs it with their ``linear.sh`` (``--lars``):
the backbone frozen in eval mode (no gradient, BatchNorm statistics untouched);
``BatchNorm1d(affine=False, eps=1e-6)`` before the fc; fc weights N(0, 0.01), bias 0; SGD,
momentum 0.9, weight decay 0, lr 0.03 x batch / 256 at batch 4096, wrapped in LARC (trust
coefficient 0.001, no clipping: NVIDIA apex's ``LARC``, here timm's ``Lars`` with
``always_adapt=True``, which is the same update); the lr set once per epoch on a half cosine to 0;
100 epochs; training images RandomResizedCrop + horizontal flip, validation the model's evaluation
transform (Resize(256) + CenterCrop(224) for the ResNet-50: ``crop_pct`` 0.875).

``finetune`` (:data:`SEMI_SUPERVISED`): the whole backbone and a linear head (N(0, 0.01), bias 0)
trained on a labelled subset, the backbone's BatchNorm in train mode. MEC's authors published no
fine-tuning code; the recipe is Barlow Twins' (Zbontar et al., ICML 2021: ``evaluate.py`` and the
semi-supervised command of its README), a standard recipe of the 1% / 10% ImageNet benchmark
that MEC's paper reports: SGD momentum 0.9, weight decay 0, batch 256, 20 epochs, lr 0.002 for
the backbone and 0.5 for the head (not scaled by the batch), a per-epoch half cosine to 0 (PyTorch's
``CosineAnnealingLR``), the same augmentations. The subset: a fraction of each class by seed, or a
list file (``mec_hub.evaluation.subsets``).

Runs are resumable: ``output_dir`` holds ``checkpoint_last.pt`` (written atomically after every
epoch) and, at the end, ``report.json``; the same call again continues from the last finished
epoch and reaches the same result as an uninterrupted run (exactly, on CPU in fp32), because the
data order and every augmentation are functions of ``(seed, epoch, index)``
(``mec_hub.data.datasets``). A checkpoint of another evaluation is refused with the differences.
Under ``torchrun`` each process takes its part of every global batch; the loss is scaled so that
the gradient is the global batch's mean whatever the split, and BatchNorm layers become
SyncBatchNorm on GPUs (on CPUs each process normalises its own part: gloo has no SyncBatchNorm).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.optim import Lars
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torchvision import transforms

from mec_hub.data.datasets import GlobalBatchSampler, LabelledImages, derive_seed
from mec_hub.data.transforms import get_transform, resolve_preprocessing
from mec_hub.errors import CheckpointReadError, MecHubError
from mec_hub.evaluation.features import extract_features, list_image_folder
from mec_hub.evaluation.inputs import rank_classes, topk_hits
from mec_hub.evaluation.report import EvalReport
from mec_hub.evaluation.splits import load_eval_model, model_section
from mec_hub.evaluation.subsets import balanced_subset, read_subset_file, write_subset_file
from mec_hub.fileio import atomic_write
from mec_hub.runtime.devices import Precision, resolve_device
from mec_hub.runtime.distributed import DistEnv, batch_aligned_slice, dist_env, join_process_group
from mec_hub.weights.checkpoint import read_checkpoint

CHECKPOINT = "checkpoint_last.pt"
REPORT = "report.json"
SUBSET_FILE = "subset.txt"
CHECKPOINT_FORMAT = "mec-hub-eval-train/1"
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class Recipe:
    """How a classifier is trained on the encoder; the two published ones are module constants."""

    protocol: str
    epochs: int
    batch_size: int
    """Global batch, over all processes."""
    lr: float
    """The classifier's base learning rate (per 256 images when ``lr_per_256``)."""
    lr_backbone: float
    """The backbone's base learning rate; 0: frozen (eval mode, no gradient)."""
    lr_per_256: bool
    """The peak lr is ``lr * batch_size / 256`` (the authors' linear protocol), else ``lr`` itself."""
    momentum: float
    weight_decay: float
    larc_trust: float | None
    """LARC's trust coefficient (apex semantics, no clipping), or ``None`` for plain SGD."""
    head_norm: bool
    """``BatchNorm1d(affine=False, eps=1e-6)`` before the fc (the authors' linear protocol)."""
    source: str

    @property
    def frozen(self) -> bool:
        return self.lr_backbone == 0

    def peak_lrs(self) -> tuple[float, float]:
        """``(classifier, backbone)`` learning rates at epoch 0."""
        scale = self.batch_size / 256 if self.lr_per_256 else 1.0
        return self.lr * scale, self.lr_backbone * scale

    def lr_factor(self, epoch: int) -> float:
        """The half cosine, set at the start of each epoch: ``0.5 * (1 + cos(pi * epoch / epochs))``."""
        return 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))

    def settings(self) -> dict[str, Any]:
        """Every field but ``source``: what a run of this recipe is (its checkpoint and report record them)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "source"}

    def departures(self) -> list[str]:
        """``["epochs 2 (the protocol's: 100)", ...]``: where this recipe differs from its published one."""
        published = PUBLISHED[self.protocol].settings()
        return [f"{key} {value} (the protocol's: {published[key]})" for key, value in self.settings().items()
                if value != published[key]]  # fmt: skip

    def with_options(self, **changes: Any) -> Recipe:
        """The recipe with the options that are not ``None`` in ``changes`` replaced (checked)."""
        changes = {key: value for key, value in changes.items() if value is not None}
        recipe = dataclasses.replace(self, **changes)
        if recipe.epochs < 1 or recipe.batch_size < 1:
            raise MecHubError(f"epochs and batch size must be >= 1, got {recipe.epochs} and {recipe.batch_size}")
        if not (recipe.lr > 0 and recipe.lr_backbone >= 0):
            raise MecHubError(f"the learning rates must be > 0 (backbone >= 0), got {recipe.lr}, {recipe.lr_backbone}")
        return recipe


PAPER_LINEAR = Recipe(
    protocol="linear-paper",
    epochs=100,
    batch_size=4096,
    lr=0.03,
    lr_backbone=0.0,
    lr_per_256=True,
    momentum=0.9,
    weight_decay=0.0,
    larc_trust=0.001,
    head_norm=True,
    source=(
        "the authors' linear evaluation: github.com/xinliu20/MEC benchmarks/linearprob/main_lincls.py as run by "
        "its linear.sh (--lars): frozen backbone in eval mode, BatchNorm1d(affine=False, eps=1e-6) + fc "
        "(N(0, 0.01), bias 0), SGD momentum 0.9 wd 0 in LARC (trust 0.001, no clipping), lr 0.03 x batch/256, "
        "batch 4096, per-epoch cosine, 100 epochs, RandomResizedCrop + flip; val Resize(256) + CenterCrop(224)"
    ),
)

SEMI_SUPERVISED = Recipe(
    protocol="finetune",
    epochs=20,
    batch_size=256,
    lr=0.5,
    lr_backbone=0.002,
    lr_per_256=False,
    momentum=0.9,
    weight_decay=0.0,
    larc_trust=None,
    head_norm=False,
    source=(
        "Barlow Twins' semi-supervised fine-tuning (Zbontar et al., ICML 2021; github.com/facebookresearch/"
        "barlowtwins evaluate.py with its README's command: --weights finetune --epochs 20 --lr-backbone 0.002 "
        "--lr-classifier 0.5 --weight-decay 0, batch 256): whole backbone + linear head (N(0, 0.01), bias 0), "
        "SGD momentum 0.9, per-epoch cosine (CosineAnnealingLR), RandomResizedCrop + flip. MEC's authors "
        "published no fine-tuning recipe"
    ),
)

PUBLISHED = {recipe.protocol: recipe for recipe in (PAPER_LINEAR, SEMI_SUPERVISED)}


# --------------------------------------------------------------------------------------------
# the model, its optimizer and its transforms


class Classifier(nn.Module):
    """``encoder`` (``(N, 3, H, W) -> (N, D)``) and a linear head; a frozen encoder stays in eval mode."""

    def __init__(self, encoder: nn.Module, embed_dim: int, num_classes: int, *, head_norm: bool, frozen: bool):
        super().__init__()
        self.encoder = encoder
        fc = nn.Linear(embed_dim, num_classes)
        nn.init.normal_(fc.weight, mean=0.0, std=0.01)
        nn.init.zeros_(fc.bias)
        norm = [nn.BatchNorm1d(embed_dim, affine=False, eps=1e-6)] if head_norm else []
        self.head = nn.Sequential(*norm, fc)
        self.frozen = frozen
        if frozen:
            encoder.requires_grad_(False)
        # The evaluation transform's input size, for extract_features' empty batches.
        self.pretrained_cfg = getattr(encoder, "pretrained_cfg", None)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.frozen:
            self.encoder.eval()  # a frozen encoder's BatchNorm statistics never move
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            with torch.no_grad():
                features = self.encoder(images)
        else:
            features = self.encoder(images)
        return self.head(features.float())


def build_optimizer(recipe: Recipe, model: Classifier) -> torch.optim.Optimizer:
    """SGD (in LARC when the recipe says so) over the head and, when trained, the backbone (its own lr)."""
    head_lr, backbone_lr = recipe.peak_lrs()
    groups: list[dict[str, Any]] = [{"params": list(model.head.parameters()), "lr": head_lr, "initial_lr": head_lr}]
    if not recipe.frozen:
        params = [p for p in model.encoder.parameters() if p.requires_grad]
        groups.append({"params": params, "lr": backbone_lr, "initial_lr": backbone_lr})
    kwargs = {"lr": head_lr, "momentum": recipe.momentum, "weight_decay": recipe.weight_decay}
    if recipe.larc_trust is None:
        return torch.optim.SGD(groups, **kwargs)
    # timm's Lars with always_adapt=True and trust_clip=False is apex's LARC(SGD) with clip=False: the
    # gradient (plus wd * w) scaled by trust * ||w|| / (||g|| + wd ||w|| + eps) where both norms are
    # non-zero, then momentum SGD (tests/evaluation/test_supervised.py holds one step to the authors' loop).
    return Lars(groups, **kwargs, trust_coeff=recipe.larc_trust, trust_clip=False, always_adapt=True)


def set_epoch_lr(optimizer: torch.optim.Optimizer, recipe: Recipe, epoch: int) -> float:
    """Each group's lr for ``epoch`` (the per-epoch half cosine); returns the classifier's."""
    factor = recipe.lr_factor(epoch)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    return optimizer.param_groups[0]["lr"]


def train_transform(preprocessing: dict[str, Any]) -> transforms.Compose:
    """RandomResizedCrop to the model's input size (torchvision's defaults, bilinear) + horizontal flip."""
    size = resolve_preprocessing(preprocessing)["input_size"][-1]
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(preprocessing["mean"], preprocessing["std"]),
        ]
    )


# --------------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class LabelledFolder:
    """An ImageFolder's images (``samples``: ``(path, class index)``), the chosen ones, its classes."""

    root: Path
    samples: list[tuple[str, int]]
    classes: list[str]
    chosen: list[int]

    @property
    def files(self) -> list[str]:
        return [os.path.relpath(self.samples[i][0], self.root) for i in self.chosen]

    @property
    def labels(self) -> list[int]:
        return [self.samples[i][1] for i in self.chosen]

    def digest(self) -> str:
        """SHA-256 of the chosen files' relative paths and labels: what the run trained on."""
        h = hashlib.sha256()
        for name, label in zip(self.files, self.labels, strict=True):
            h.update(f"{label}\t{name}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()


def training_images(
    folder: str | os.PathLike[str],
    *,
    labels_fraction: float | None = None,
    subset: str | os.PathLike[str] | None = None,
    seed: int = 0,
) -> LabelledFolder:
    """The training folder's images: all of them, a class-balanced fraction (by seed), or a subset list's."""
    samples, classes = list_image_folder(folder)
    if labels_fraction is not None and subset is not None:
        raise MecHubError("give a fraction of the labels or a subset list, not both")
    if labels_fraction is not None:
        chosen = balanced_subset(samples, labels_fraction, seed=seed)
    elif subset is not None:
        chosen = read_subset_file(subset, samples, folder)
    else:
        chosen = list(range(len(samples)))
    return LabelledFolder(Path(folder), samples, classes, chosen)


# --------------------------------------------------------------------------------------------
# checkpoints


def _save(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _load(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    try:
        state = dict(read_checkpoint(path))
    except CheckpointReadError as exc:
        raise MecHubError(f"{exc}; remove it or use another output folder to start afresh") from None
    if state.get("format") != CHECKPOINT_FORMAT:
        raise MecHubError(
            f"{path} is not a checkpoint of mec-hub's supervised evaluations (format {state.get('format')!r}); "
            "use another output folder"
        )
    saved = state.get("identity", {})
    differences = [
        f"{key}: checkpoint {saved.get(key)!r}, now {identity[key]!r}"
        for key in identity
        if saved.get(key) != identity[key]
    ]
    if differences:
        raise MecHubError(
            f"{path} belongs to another evaluation, so it cannot be resumed: "
            + "; ".join(differences)
            + ". Rerun with its settings to continue it, or use another output folder"
        )
    return state


# --------------------------------------------------------------------------------------------
# the loop


def _all_sum(values: Sequence[float], env: DistEnv, device: torch.device) -> list[float]:
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    if env.distributed:
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def _validate(
    model: Classifier,
    val: LabelledFolder,
    transform: Any,
    *,
    env: DistEnv,
    device: torch.device,
    batch_size: int,
    num_workers: int,
) -> tuple[float, float, list[tuple[str, str]]]:
    """Top-1 and top-5 (%) over the readable validation images, each process its slice; the unreadable ones."""
    paths = [val.samples[i][0] for i in val.chosen]
    start, end = batch_aligned_slice(len(paths), batch_size, env.rank, env.world_size)
    top1 = top5 = counted = 0
    failed: list[tuple[int, str]] = []
    if end > start:
        try:
            logits, kept, failed = extract_features(
                model, paths[start:end], batch_size=batch_size, num_workers=num_workers, device=device,
                transform=transform,
            )  # fmt: skip
        except MecHubError:  # every image of this slice unreadable
            logits, kept = torch.zeros(0, 1), []
            failed = [(i, "unreadable") for i in range(end - start)]
        labels = torch.tensor([val.samples[val.chosen[start + i]][1] for i in kept], dtype=torch.long)
        if kept:
            ranked = rank_classes(logits, 5)  # ranked as the probe and kNN rank them
            top1, top5 = topk_hits(ranked, labels, 1), topk_hits(ranked, labels, 5)
            counted = len(kept)
    top1, top5, counted = _all_sum([top1, top5, counted], env, device)
    skipped = [(paths[start + i], reason) for i, reason in failed]
    if env.distributed:
        gathered: list[Any] = [None] * env.world_size
        torch.distributed.all_gather_object(gathered, skipped)
        skipped = [item for part in gathered for item in part]
    if counted == 0:
        raise MecHubError(f"{val.root}: none of the {len(paths)} validation images could be read")
    return 100.0 * top1 / counted, 100.0 * top5 / counted, skipped


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    precision: Precision,
    scaler: torch.amp.GradScaler | None = None,
    world_size: int = 1,
    global_batch: int | None = None,
) -> torch.Tensor:
    """One optimizer step on this process's part of a global batch; returns its summed cross-entropy (detached).

    The loss is summed here and divided by the global batch, times the processes that DDP averages
    over, so the gradient is the global batch's mean cross-entropy however the batch is split
    (with one process: the batch's mean, as ``nn.CrossEntropyLoss()``).
    """
    with precision.autocast():
        logits = model(images)
    loss = F.cross_entropy(logits.float(), labels, reduction="sum")
    scaled = loss * (world_size / (global_batch if global_batch is not None else len(labels)))
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(scaled).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        scaled.backward()
        optimizer.step()
    return loss.detach()


def run_supervised(
    recipe: Recipe,
    train_dir: str | os.PathLike[str],
    val_dir: str | os.PathLike[str],
    *,
    output_dir: str | os.PathLike[str],
    name: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    random_init: bool = False,
    labels_fraction: float | None = None,
    subset: str | os.PathLike[str] | None = None,
    seed: int = 0,
    num_workers: int = 0,
    device: str | torch.device = "auto",
    precision: str = "fp32",
    eval_every: int = 1,
    log: Any = print,
    argv: Sequence[str] = (),
) -> EvalReport:
    """Train ``recipe``'s classifier on ``train_dir`` (or its labelled subset) and report on ``val_dir``.

    ``name``/``weights``/``random_init`` pick the encoder as ``mec-hub eval`` does
    (``load_eval_model``). ``output_dir`` holds the checkpoint (resumed from when it exists), the
    subset list (``subset.txt``, when a subset was chosen) and ``report.json``. ``eval_every``:
    epochs between validations (always after the last). ``log``: where the per-epoch lines go
    (process 0 only); ``argv``: the command line, for the report. Runs under ``torchrun`` as
    described in the module docstring.
    """
    if eval_every < 1:
        raise MecHubError(f"eval_every must be >= 1, got {eval_every}")
    started = time.perf_counter()
    env = dist_env()
    target = resolve_device(device)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    created_group = join_process_group(target, timeout=PROCESS_GROUP_TIMEOUT)
    try:
        return _run(
            recipe, train_dir, val_dir, Path(output_dir), name=name, weights=weights, random_init=random_init,
            labels_fraction=labels_fraction, subset=subset, seed=seed, num_workers=num_workers,
            env=dist_env(), device=target, precision=Precision(precision, target.type), eval_every=eval_every,
            log=log if env.is_main else (lambda *a, **k: None), started=started, argv=list(argv),
        )  # fmt: skip
    finally:
        if created_group:
            torch.distributed.destroy_process_group()


def _run(
    recipe: Recipe,
    train_dir: str | os.PathLike[str],
    val_dir: str | os.PathLike[str],
    out: Path,
    *,
    name: str | None,
    weights: str | os.PathLike[str] | None,
    random_init: bool,
    labels_fraction: float | None,
    subset: str | os.PathLike[str] | None,
    seed: int,
    num_workers: int,
    env: DistEnv,
    device: torch.device,
    precision: Precision,
    eval_every: int,
    log: Any,
    started: float,
    argv: list[str],
) -> EvalReport:
    if recipe.batch_size % env.world_size:
        raise MecHubError(f"the batch of {recipe.batch_size} is not divisible by the {env.world_size} processes")
    train = training_images(train_dir, labels_fraction=labels_fraction, subset=subset, seed=seed)
    val_samples, _ = list_image_folder(val_dir, train.classes)
    val = LabelledFolder(Path(val_dir), val_samples, train.classes, list(range(len(val_samples))))

    encoder = load_eval_model(name, weights=weights, random_init=random_init, device="cpu", seed=seed)
    preprocessing = resolve_preprocessing(encoder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, 1))  # the head's initial weights
        model = Classifier(
            encoder, encoder.embed_dim, len(train.classes), head_norm=recipe.head_norm, frozen=recipe.frozen
        )
    identity = {
        **recipe.settings(),
        "weights_sha256": None if random_init else encoder.weights_sha256,
        "random_init": random_init,
        "seed": seed,
        "precision": precision.name,
        "classes": train.classes,
        "train_images": train.digest(),
    }
    if env.distributed and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif env.distributed:
        warnings.warn("SyncBatchNorm needs GPUs: on CPU each process normalises its own share", stacklevel=2)
    model.to(device)
    optimizer = build_optimizer(recipe, model)
    scaler = precision.grad_scaler()

    checkpoint = out / CHECKPOINT
    history: list[dict[str, Any]] = []
    first_epoch = 0
    if checkpoint.exists():
        state = _load(checkpoint, identity)
        model.head.load_state_dict(state["head"])
        if state.get("encoder") is not None:
            model.encoder.load_state_dict(state["encoder"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        first_epoch, history = int(state["epoch"]), list(state["history"])
        log(f"resuming {checkpoint} after epoch {first_epoch} of {recipe.epochs}")
    elif env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if labels_fraction is not None or subset is not None:
            write_subset_file(out / SUBSET_FILE, train.samples, train.chosen, train.root)

    step_model: nn.Module = model
    if env.distributed:
        step_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    dataset = LabelledImages(train.root, train.files, train.labels, train_transform(preprocessing), seed=seed)
    sampler = GlobalBatchSampler(
        len(dataset), recipe.batch_size, rank=env.rank, world_size=env.world_size, seed=seed, drop_last=False
    )
    loader = DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
    )  # fmt: skip
    val_transform = get_transform(preprocessing)
    val_batch = max(1, min(256, recipe.batch_size // env.world_size))
    if first_epoch == 0:
        departures = recipe.departures()
        log(
            f"{recipe.protocol}: {len(dataset)} training images ({len(train.classes)} classes), {len(val.chosen)} "
            f"validation images, {recipe.epochs} epochs of {sampler.steps_per_epoch} steps at batch "
            f"{recipe.batch_size} over {env.world_size} process(es) on {device}"
            + (f"; departs from the protocol: {', '.join(departures)}" if departures else "")
        )
    skipped: list[tuple[str, str]] = []
    for epoch in range(first_epoch, recipe.epochs):
        epoch_start = time.perf_counter()
        lr = set_epoch_lr(optimizer, recipe, epoch)
        sampler.set_epoch(epoch)
        model.train()
        loss_sum = seen = 0.0
        for step, (images, labels) in enumerate(loader):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            loss = train_step(
                step_model, optimizer, images, labels, precision=precision, scaler=scaler,
                world_size=env.world_size, global_batch=sampler.batch_size(step),
            )  # fmt: skip
            loss_sum += float(loss)
            seen += len(labels)
        loss_sum, seen = _all_sum([loss_sum, seen], env, device)
        if not math.isfinite(loss_sum):
            raise MecHubError(f"the loss became {loss_sum} in epoch {epoch + 1}; {checkpoint} holds the last good one")
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "loss": loss_sum / max(seen, 1)}
        if (epoch + 1) % eval_every == 0 or epoch + 1 == recipe.epochs:
            record["top1"], record["top5"], skipped = _validate(
                model, val, val_transform, env=env, device=device, batch_size=val_batch, num_workers=num_workers
            )
        record["seconds"] = time.perf_counter() - epoch_start
        history.append(record)
        scores = f" top-1 {record['top1']:.2f}% top-5 {record['top5']:.2f}%" if "top1" in record else ""
        log(
            f"epoch {epoch + 1}/{recipe.epochs} loss {record['loss']:.4f} lr {lr:.4g}{scores} "
            f"({record['seconds']:.0f} s)",
            flush=True,
        )
        if env.is_main:
            state = {
                "format": CHECKPOINT_FORMAT,
                "identity": identity,
                "epoch": epoch + 1,
                "head": model.head.state_dict(),
                "encoder": None if recipe.frozen else model.encoder.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "history": history,
            }
            _save(checkpoint, state)
        if env.distributed:
            torch.distributed.barrier()

    final = history[-1] if history else None
    if final is None or "top1" not in final:  # resumed a finished run from before its validation
        top1, top5, skipped = _validate(
            model, val, val_transform, env=env, device=device, batch_size=val_batch, num_workers=num_workers
        )
    else:
        top1, top5 = final["top1"], final["top5"]
    report = EvalReport(
        protocol=recipe.protocol,
        results={"top1": top1, "top5": top5},
        params={
            **recipe.settings(),
            "peak_lr": recipe.peak_lrs()[0],
            "peak_lr_backbone": recipe.peak_lrs()[1],
            "source": PUBLISHED[recipe.protocol].source,
            "departures": recipe.departures(),
            "seed": seed,
            "precision": precision.name,
            "processes": env.world_size,
            "history": history,
        },
        model=model_section(encoder, name, weights, random_init=random_init, head="backbone"),
        data={
            "train": {
                "folder": str(train.root),
                "count": len(train.chosen),
                "of": len(train.samples),
                "labels_fraction": labels_fraction,
                "subset": str(subset) if subset is not None else None,
                "images_sha256": identity["train_images"],
            },
            "val": {"folder": str(val.root), "count": len(val.chosen) - len(skipped), "skipped": skipped},
            "num_classes": len(train.classes),
            "classes": train.classes,
        },
        seconds={"total": time.perf_counter() - started},
        device=str(device),
        argv=argv,
    )
    if env.is_main:
        report.write(out / REPORT)
    return report


def run_linear_paper(
    train_dir: str | os.PathLike[str], val_dir: str | os.PathLike[str], *, output_dir: str | os.PathLike[str],
    epochs: int | None = None, batch_size: int | None = None, lr: float | None = None, **kwargs: Any,
) -> EvalReport:  # fmt: skip
    """The authors' linear protocol (:data:`PAPER_LINEAR`); ``epochs``/``batch_size``/``lr`` override it
    (recorded as departures). Other arguments: :func:`run_supervised`."""
    recipe = PAPER_LINEAR.with_options(epochs=epochs, batch_size=batch_size, lr=lr)
    return run_supervised(recipe, train_dir, val_dir, output_dir=output_dir, **kwargs)


def run_finetune(
    train_dir: str | os.PathLike[str], val_dir: str | os.PathLike[str], *, output_dir: str | os.PathLike[str],
    labels_fraction: float | None = None, subset: str | os.PathLike[str] | None = None,
    epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
    lr_backbone: float | None = None, **kwargs: Any,
) -> EvalReport:  # fmt: skip
    """Semi-supervised fine-tuning (:data:`SEMI_SUPERVISED`) on ``labels_fraction`` of each class (by ``seed``)
    or the images of a ``subset`` list; the overrides are recorded as departures. Other arguments:
    :func:`run_supervised`."""
    if labels_fraction is None and subset is None:
        raise MecHubError("semi-supervised fine-tuning needs a fraction of the labels or a subset list")
    recipe = SEMI_SUPERVISED.with_options(epochs=epochs, batch_size=batch_size, lr=lr, lr_backbone=lr_backbone)
    if recipe.frozen:
        raise MecHubError("fine-tuning trains the backbone: its learning rate must be > 0")
    return run_supervised(
        recipe, train_dir, val_dir, output_dir=output_dir, labels_fraction=labels_fraction, subset=subset, **kwargs
    )
