"""MEC pretraining with the official recipe, from one CPU to many GPUs.

    python training/pretrain.py --data DIR --output-dir OUT [options]
    python training/pretrain.py --config training/configs/mec_resnet50_in1k.yaml --data DIR --output-dir OUT
    torchrun --nproc_per_node=8 training/pretrain.py --data DIR --output-dir OUT [options]

The options are the fields of ``training.config.TrainConfig``; ``--config FILE`` reads them from
YAML, options on the command line override the file, and the run writes its resolved options
to ``OUT/config.yaml``.

``--data`` is any folder of images (searched recursively; class folders are just folders,
labels are ignored). ``--batch-size`` is the global batch, split evenly over the processes;
``--lr`` is the base learning rate, scaled by ``batch / 256`` as in the official code. The
recipe's defaults are the paper's (ResNet-50, 100 epochs, batch 1024, lr 0.5, wd 1e-5, eps^2 64,
order 4, teacher momentum 0.996 -> 1, 10 warm-up epochs for lr and lamda). eps^2 stays 64 at every
batch, as in the authors' code; ``--eps2 scaled`` (``64 * 1024 / batch``, ``training.config.scaled_eps2``)
keeps lamda at its batch-1024 value instead, and a run whose eps^2 is not 64 says so in its log,
``config.yaml`` and export. Without ``--eps2``, a batch so small that lamda = d / (64 m) reaches 0.5
stops before training and says what to do.

Rerunning the same command resumes from ``OUT/checkpoint_last.pt`` and reaches the same
weights as an uninterrupted run (bit for bit on CPU in fp32): the data order, every
augmentation and every other random draw are functions of (seed, step), not of the process's
history. At the end the student (or ``--export-from teacher``) is exported to ``OUT/export``,
which ``mec_hub.load(weights=OUT/export)`` and ``timm.create_model("local-dir:OUT/export")`` load.
``--init-from WEIGHTS`` starts a new run's student from weights (the teacher a copy of it);
``--extend-epochs N`` continues a run to N epochs (``training.schedules``: the extension rule).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `training` and `mec_hub` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from mec_hub.data.datasets import GlobalBatchSampler, derive_seed
from mec_hub.errors import MecHubError
from mec_hub.export.convert import TRAIN_FORMAT, extract_weights, write_hub_folder
from mec_hub.models.encoder import load_state_dict_strict
from mec_hub.models.losses import MECLoss, warn_if_not_converging
from mec_hub.runtime.devices import Precision
from mec_hub.weights.config import IMAGENET_MEAN, IMAGENET_STD
from training import checkpoint as ckpt
from training import config as train_config
from training import distributed
from training.config import ConfigError, TrainConfig
from training.data import TwoViewImages, find_images, mocov3_views
from training.engine import EpochTotals, NonFiniteLossError, StepStats, train_step
from training.metrics import MetricsLog
from training.model import MECModel, build_mec_model
from training.optim import build_optimizer
from training.progress import TRAIN_LOG, Progress, TrainLog
from training.schedules import EXTENSION_RULE, Schedules, ScheduleValues

PAPER = "Liu et al., Self-Supervised Learning via Maximum Entropy Coding, NeurIPS 2022 (arXiv:2210.11464)"
DIVERGENCE_ADVICE = (
    "Try a lower --lr, a longer --lamda-warmup-epochs (or a larger --lamda-warmup-factor or --eps2), "
    "or --precision fp32."
)


# --------------------------------------------------------------------------------------------
# options: the fields of training.config.TrainConfig


def build_parser() -> argparse.ArgumentParser:
    """The command line, generated from :class:`TrainConfig` (``--config FILE`` plus one option per field)."""
    return train_config.build_parser(
        description=__doc__.split("\n\n")[0],
        epilog="See the module docstring and README for config files, resuming, DDP and exporting.",
    )


def check_args(args: TrainConfig, parser: argparse.ArgumentParser, world_size: int) -> TrainConfig:
    """``args`` with ``--eps2`` resolved to a number; a bad option exits 2 with one line naming it."""
    try:
        checked = args.check(world_size)
    except ConfigError as exc:
        train_config.fail(parser, str(exc))
    if checked.stem == "small" and checked.image_size > 64:
        warnings.warn("--stem small is meant for 32-64 px images; at larger sizes it is slow", stacklevel=2)
    return checked


def recipe_config(args: TrainConfig, *, hidden_dim: int, num_images: int) -> dict[str, Any]:
    """What defines the run (``checkpoint.RECIPE_KEYS``, compared on resume) plus its record; JSON-able.

    Every recipe key is the option of that name, except those resolved here. Beside them: the data
    folder, ``extend_epochs`` (the schedule's length when extended; see ``checkpoint.schedule_restart``),
    ``schedule_restarts`` (one ``{"step", "from_epochs", "to_epochs"}`` per extension) and
    ``init_from`` (``{"weights", "source"}`` when the run started from weights).
    """
    resolved = {"model_args": dict(args.model_args), "hidden_dim": hidden_dim, "num_images": num_images}
    config = {key: resolved[key] if key in resolved else getattr(args, key) for key in ckpt.RECIPE_KEYS}
    record = {"extend_epochs": args.extend_epochs, "schedule_restarts": [], "init_from": None}
    return {**config, "data": str(args.data), **record}


def eval_preprocessing(image_size: int) -> dict[str, Any]:
    """Evaluation transform for weights trained at ``image_size``: small images are not center-cropped."""
    return {
        "input_size": [3, image_size, image_size],
        "interpolation": "bilinear",
        "crop_pct": 1.0 if image_size <= 64 else 0.875,
        "crop_mode": "center",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }


# --------------------------------------------------------------------------------------------
# checkpoint and export


SPLIT_FOLDER_NAMES = {"train", "training", "val", "valid", "validation", "test", "images"}


def dataset_name(data: str) -> str:
    """``/data/cifar10-subset/train`` -> ``cifar10-subset/train``: a split folder alone names nothing."""
    path = Path(data)
    if path.name.lower() in SPLIT_FOLDER_NAMES and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name or data


def export_info(config: dict[str, Any], *, step: int, steps_per_epoch: int, command: str, knn_top1: float | None):
    epochs_done = step / steps_per_epoch
    epochs = ckpt.total_epochs(config)
    dataset = dataset_name(config["data"])
    meta: dict[str, Any] = {
        "pretraining": f"MEC on {dataset} ({config['num_images']} images), {epochs_done:g} of {epochs} epochs",
        "epochs": epochs,
        "epochs_completed": epochs_done,
        "steps": step,
        "batch_size": config["batch_size"],
        "lr": config["lr"],
        "eps2": config["eps2"],
        "order": config["order"] if config["order"] is not None else "exact",
        "dim": config["dim"],
        "image_size": config["image_size"],
        "optimizer": config["optimizer"],
        "dataset": dataset,
        "recipe": (
            f"{config['optimizer'].upper()} momentum {config['momentum']}, lr {config['lr']} x batch/256 "
            f"({config['warmup_epochs']}-epoch warm-up, cosine), wd {config['weight_decay']}, "
            f"eps^2 {config['eps2']:g}{eps2_text(config)}, "
            f"1/lamda warm-up x{config['lamda_warmup_factor']:g} over {config['lamda_warmup_epochs']} epochs, "
            f"EMA teacher {config['teacher_momentum']} -> 1, "
            f"{config.get('augmentation', 'mocov3')} augmentations"
        ),
        "command": command,
        "paper": PAPER,
    }
    if config.get("schedule_restarts"):
        meta["schedule"] = "; ".join(restart_text(r) for r in config["schedule_restarts"]) + " (" + EXTENSION_RULE + ")"
    if config.get("init_from"):
        meta["init_from"] = f"{config['init_from']['weights']} ({config['init_from']['source']})"
    if knn_top1 is not None:
        meta["knn_top1"] = round(knn_top1, 2)
        meta["metrics_source"] = "kNN monitor of training/pretrain.py (k-NN on the --knn-val folder)"
    return {"preprocessing": eval_preprocessing(config["image_size"]), "meta": meta}


def eps2_text(config: dict[str, Any]) -> str:
    """`` (not the paper's 64: ...)`` for a run whose eps^2 is not the paper's, else nothing."""
    rule = train_config.eps2_rule(config["eps2"], config["batch_size"])
    return "" if rule is None else f" ({rule}; the paper's is 64)"


def describe_arch(arch: dict[str, Any]) -> str:
    args = f", model_args {json.dumps(arch['model_args'])}" if arch["model_args"] else ""
    return f"{arch['arch']} ({arch['stem']} stem{args})"


def arch_options(arch: dict[str, Any]) -> str:
    return shlex.join(["--arch", arch["arch"], "--model-args", json.dumps(arch["model_args"]), "--stem", arch["stem"]])


def restart_text(restart: dict[str, int]) -> str:
    return f"extended from {restart['from_epochs']} to {restart['to_epochs']} epochs at step {restart['step']}"


def export(state: dict[str, Any], out_dir: Path, *, source: str, name: str | None) -> Path:
    extracted = extract_weights(state, source=source, origin=str(out_dir / ckpt.LAST))
    config = state["config"]
    default_name = re.sub(r"\W", "_", f"mec_{config['arch']}_{dataset_name(config['data'])}")
    result = write_hub_folder(
        extracted,
        out_dir / "export",
        name=name or default_name,
        overwrite=True,
        origin=str(out_dir / ckpt.LAST),
        extra_meta={"source_checkpoint": ckpt.LAST, "exported_from": source},
    )
    return result.folder


# --------------------------------------------------------------------------------------------
# training


class SetupError(RuntimeError):
    """The data or options cannot make a run (reported without a traceback)."""


class Run:
    """Everything one training process holds; ``train()`` runs from the current step to the end."""

    def __init__(self, args: TrainConfig, env: distributed.DistEnv, command: str) -> None:
        self.args, self.env, self.command = args, env, command
        self.out = Path(args.output_dir)
        self.log = print if env.is_main else (lambda *a, **k: None)

        files = find_images(args.data)
        torch.manual_seed(args.seed)
        self.model: MECModel = build_mec_model(
            args.arch, args.model_args, stem=args.stem, dim=args.dim, hidden_dim=args.hidden_dim, pred_dim=args.pred_dim
        )
        hidden_dim = self.model.student.projector[0].out_features
        self.config = recipe_config(args, hidden_dim=hidden_dim, num_images=len(files))

        try:
            self.sampler = GlobalBatchSampler(
                len(files), args.batch_size, rank=env.rank, world_size=env.world_size, seed=args.seed
            )
        except ValueError as exc:
            raise SetupError(f"--data {args.data}: {exc}; lower --batch-size") from None
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = args.total_epochs * self.steps_per_epoch
        self.schedules = Schedules(
            total_steps=self.total_steps,
            lr=args.lr * args.batch_size / 256,
            lr_warmup_steps=args.warmup_epochs * self.steps_per_epoch,
            lamda_inv=args.batch_size * args.eps2 / args.dim,
            lamda_warmup_steps=args.lamda_warmup_epochs * self.steps_per_epoch,
            lamda_warmup_factor=args.lamda_warmup_factor,
            teacher_momentum=args.teacher_momentum,
        )
        if max(args.warmup_epochs, args.lamda_warmup_epochs) > args.total_epochs:
            warnings.warn(
                f"the warm-ups ({args.warmup_epochs} lr, {args.lamda_warmup_epochs} lamda epochs) are longer than "
                f"the {args.total_epochs}-epoch run: the lr never reaches its peak",
                stacklevel=2,
            )
        views = mocov3_views(args.image_size, args.augmentation)
        dataset = TwoViewImages(args.data, views, seed=args.seed, files=files)
        self.loader = DataLoader(
            dataset,
            batch_sampler=self.sampler,
            num_workers=args.workers,
            pin_memory=env.device.type == "cuda",
            persistent_workers=args.workers > 0,
            prefetch_factor=4 if args.workers > 0 else None,
        )

        if env.distributed and env.device.type == "cuda":
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        elif env.distributed:
            warnings.warn("SyncBatchNorm needs GPUs: on CPU each process normalises its own share", stacklevel=2)
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.model.to(env.device, memory_format=self.memory_format)
        self.optimizer = build_optimizer(
            args.optimizer, self.model, lr=self.schedules.lr, momentum=args.momentum, weight_decay=args.weight_decay
        )
        self.precision = Precision(args.precision, env.device.type)
        self.scaler = self.precision.grad_scaler()
        self.criterion = MECLoss(
            args.eps2,
            args.order,
            gather_distributed=env.distributed,
            power_iterations=10,  # estimated on logged steps only, so it can afford more iterations
            # Checked here, once per log line, rather than with a device sync every step.
            warn_on_divergence=False,
            check_finite=False,
        )
        self.step = 0
        self.stats = StepStats()
        self.epoch_totals = EpochTotals()
        self.knn_top1: float | None = None
        self.monitor = None
        if args.knn_train is not None:
            from training.monitor import KnnMonitor

            self.monitor = KnnMonitor(
                args.knn_train,
                args.knn_val,
                preprocessing=eval_preprocessing(args.image_size),
                k=args.knn_k,
                temperature=args.knn_temperature,
                num_workers=min(args.workers, 8),
                device=env.device,
            )

    # ---- where the run starts

    def start_from(self, spec: str) -> None:
        """``--init-from``: the student's backbone (and projector, if ``spec`` has one) from ``spec``, the
        teacher a copy of the student; the predictor and the optimizer start fresh."""
        args = self.args
        try:
            weights = ckpt.read_initial_weights(spec)
        except MecHubError as exc:
            raise SetupError(f"--init-from {spec}: {exc}") from None
        wanted = {"arch": args.arch, "model_args": dict(args.model_args), "stem": args.stem}
        found = {"arch": weights.architecture, "model_args": weights.model_args, "stem": weights.stem}
        if weights.architecture is not None and found != wanted:
            raise SetupError(
                f"--init-from {spec} holds a {describe_arch(found)}, but this run builds a {describe_arch(wanted)}: "
                f"pass {arch_options(found)}, or weights of this architecture"
            )
        student = self.model.student
        load_state_dict_strict(student.backbone, weights.backbone, origin=spec, target=f"{args.arch} backbone")
        if weights.projector is not None:
            target = f"projector of this run (--dim {args.dim}, --hidden-dim {self.config['hidden_dim']})"
            load_state_dict_strict(student.projector, weights.projector, origin=spec, target=target)
        self.model.teacher.load_state_dict(student.state_dict())
        parts = "backbone and projector" if weights.projector is not None else "backbone (projector fresh)"
        self.config["init_from"] = {"weights": spec, "source": f"{weights.source}: student {parts}"}
        self.log(f"started from {spec} ({weights.source}): student {parts}, teacher a copy of the student")

    def restart_line(self, restart: dict[str, int]) -> str:
        """The log line of an extension: the values before and after the restart, and the rule."""
        step = restart["step"]
        old = dataclasses.replace(self.schedules, total_steps=restart["from_epochs"] * self.steps_per_epoch)
        new = self.schedules.at(step)
        before = old.at(step - 1) if 0 < step <= old.total_steps else new
        return (
            f"schedule {restart_text(restart)}: lr {before.lr:.4g} (step {step - 1}) -> {new.lr:.4g} (step {step}), "
            f"teacher momentum {before.teacher_momentum:.5f} -> {new.teacher_momentum:.5f}, 1/lamda "
            f"{new.lamda_inv:.4g} unchanged; {EXTENSION_RULE}"
        )

    def resolved_options(self) -> TrainConfig:
        """The options as ``OUT/config.yaml`` records them: eps2 and hidden_dim resolved, the run's init_from."""
        init_from = self.config["init_from"]["weights"] if self.config["init_from"] else None
        return dataclasses.replace(self.args, hidden_dim=self.config["hidden_dim"], init_from=init_from)

    def config_header(self) -> str:
        lines = [
            f"training/pretrain.py options of the run in {self.out}, resolved; --config with this file resumes it.",
            f"Written at step {self.step} of {self.total_steps} by: {self.command}",
            f"Data: {self.config['num_images']} images in {self.config['data']}",
        ]
        note = train_config.eps2_note(self.args.eps2, self.args.batch_size)
        if note is not None:
            lines.append(note)
        if self.config["init_from"]:
            lines.append(f"Started from: {self.config['init_from']['weights']} ({self.config['init_from']['source']})")
        for restart in self.config["schedule_restarts"]:
            lines.append(f"Schedule {restart_text(restart)}: {EXTENSION_RULE}")
        return "\n".join(lines)

    # ---- state

    def state_dict(self) -> dict[str, Any]:
        state = {
            "format": TRAIN_FORMAT,
            "arch": self.args.arch,
            "model_args": dict(self.args.model_args),
            "stem": self.args.stem,
            "model": self.model.state_dict(),
            "export": export_info(
                self.config,
                step=self.step,
                steps_per_epoch=self.steps_per_epoch,
                command=self.command,
                knn_top1=self.knn_top1,
            ),
            "step": self.step,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "config": self.config,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "knn_top1": self.knn_top1,
            # Unlogged steps and epoch totals, so that a resumed run logs what an uninterrupted one does.
            "metrics_state": {"window": self.stats.state_dict(), "epoch": self.epoch_totals.state_dict()},
            "loss_state": self.criterion.state_dict(),
            "world_size": self.env.world_size,
            "versions": {"torch": str(torch.__version__)},
        }
        ckpt.assert_weights_only_safe(state)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.knn_top1 = state.get("knn_top1")
        self.stats.load_state_dict(state["metrics_state"]["window"], self.env.device)
        self.epoch_totals.load_state_dict(state["metrics_state"]["epoch"])
        self.criterion.load_state_dict(state["loss_state"])

    def save(self, *, snapshot_epoch: int | None = None) -> None:
        # Never save weights that a NaN step has already touched.
        self.stats.check_finite(steps_per_epoch=self.steps_per_epoch, advice=DIVERGENCE_ADVICE)
        if self.env.is_main:
            ckpt.save(self.out / ckpt.LAST, self.state_dict())
            if snapshot_epoch is not None:
                ckpt.keep_snapshot(self.out, snapshot_epoch, self.args.keep_snapshots)
        distributed.barrier(self.env)

    # ---- loop

    def train(self, metrics: MetricsLog) -> None:
        args, env = self.args, self.env
        step_model: nn.Module = self.model
        if env.distributed:
            device_ids = [env.device.index] if env.device.type == "cuda" else None
            step_model = DistributedDataParallel(self.model, device_ids=device_ids)
        if args.compile:
            step_model = torch.compile(step_model)
        if env.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        stop = min(self.total_steps, args.max_steps or self.total_steps)
        epoch_start, epoch_first = time.perf_counter(), self.step  # images/s count the steps this process ran
        progress = Progress(
            start_step=self.step,
            stop=stop,
            steps_per_epoch=self.steps_per_epoch,
            epochs=args.total_epochs,
            batch_size=args.batch_size,
            bar=None if env.is_main else False,  # a bar when stderr is a terminal
        )
        while self.step < stop:
            epoch, first_in_epoch = divmod(self.step, self.steps_per_epoch)
            self.sampler.set_epoch(epoch, first_in_epoch)
            for views in progress.batches(self.loader, epoch):
                values = self.schedules.at(self.step)
                # Drop-path and any other random op draw from (seed, step, rank), as the data does.
                torch.manual_seed(derive_seed(args.seed, self.step, env.rank, 1))
                views = tuple(v.to(env.device, non_blocking=True, memory_format=self.memory_format) for v in views)
                upcoming = self.step + 1
                logged = upcoming % args.log_every == 0 or upcoming % self.steps_per_epoch == 0 or upcoming == stop
                out = train_step(
                    step_model,
                    self.model.update_teacher,
                    self.criterion,
                    self.optimizer,
                    views,
                    values,
                    self.precision,
                    self.scaler,
                    # The norm estimate is for the log line, so only logged steps compute it.
                    estimate_norm=logged,
                    fidelity=logged if args.fidelity_every is None else _every(upcoming, args.fidelity_every),
                )
                self.stats.add(out)
                self.step += 1
                progress.step_done()
                epoch_end = self.step % self.steps_per_epoch == 0
                if logged:
                    self._log_window(metrics, values, progress)
                if epoch_end or self.step == stop:
                    break
                if args.save_every_steps and self.step % args.save_every_steps == 0:
                    with progress.paused():  # left out of images/s
                        self.save()
            finished_epoch = self.step % self.steps_per_epoch == 0
            seconds = time.perf_counter() - epoch_start
            with progress.paused():
                self._end_of_epoch(metrics, finished_epoch, stop, seconds=seconds, steps_here=self.step - epoch_first)
            epoch_start, epoch_first = time.perf_counter(), self.step

    def _log_window(self, metrics: MetricsLog, values: ScheduleValues, progress: Progress) -> None:
        steps = len(self.stats)
        summary = self.stats.flush(steps_per_epoch=self.steps_per_epoch, advice=DIVERGENCE_ADVICE)
        timing = progress.window()  # after the flush, whose device sync ends the window's compute
        self.epoch_totals.add(summary, steps)
        record = {
            "kind": "step",
            "step": self.step,
            "epoch": self.step / self.steps_per_epoch,
            **summary,
            "lr": values.lr,
            "lamda_inv": values.lamda_inv,
            "teacher_momentum": values.teacher_momentum,
            **timing.record(),
        }
        metrics.write(record)
        self.log(
            f"epoch {self.step // self.steps_per_epoch + (self.step % self.steps_per_epoch > 0)}"
            f"/{self.args.total_epochs} "
            f"step {self.step}/{self.total_steps} loss {summary['loss']:.4f} coding {summary['coding_length']:.2f} "
            f"lr {values.lr:.4g} 1/lamda {values.lamda_inv:.4g} ema {values.teacher_momentum:.5f} "
            f"|C| {summary['spectral_norm']:.3f}{_taylor_text(summary)} | {timing.text()}",
            flush=True,
        )
        if self.env.is_main:
            warn_if_not_converging(summary["spectral_norm"], order=self.args.order, context=f" at step {self.step}")

    def _end_of_epoch(
        self, metrics: MetricsLog, finished_epoch: bool, stop: int, *, seconds: float, steps_here: int
    ) -> None:
        args = self.args
        epoch = self.step // self.steps_per_epoch
        last = self.step == stop
        measured = self.monitor is not None and (last or (finished_epoch and epoch % args.knn_every == 0))
        if measured:
            if self.env.is_main:
                started = time.perf_counter()
                self.knn_top1 = self.monitor(self._export_source().backbone)
                self.log(f"kNN top-1 {self.knn_top1:.2f}% ({time.perf_counter() - started:.0f}s)", flush=True)
            distributed.barrier(self.env)
        if finished_epoch:
            totals = self.epoch_totals
            record = {
                "kind": "epoch",
                "step": self.step,
                "epoch": float(epoch),
                **totals.means(),
                "images_per_s": steps_here * args.batch_size / seconds,
                "epoch_time_s": seconds,
            }
            if measured:
                record["knn_top1"] = self.knn_top1
            metrics.write(record)
            self.epoch_totals = EpochTotals()
        elif measured:
            epoch_float = self.step / self.steps_per_epoch
            metrics.write({"kind": "knn", "step": self.step, "epoch": epoch_float, "knn_top1": self.knn_top1})
        snapshot = finished_epoch and args.snapshot_every and epoch % args.snapshot_every == 0
        self.save(snapshot_epoch=epoch if snapshot else None)
        kept = f" (+ epoch {epoch} snapshot)" if snapshot else ""
        self.log(f"saved {self.out / ckpt.LAST} at step {self.step}{kept}", flush=True)

    def _export_source(self):
        return self.model.student if self.args.export_from == "student" else self.model.teacher


def _every(step: int, n: int) -> bool:
    return n > 0 and step % n == 0


def _taylor_text(summary: dict[str, float]) -> str:
    """`` taylor err 1.20e-03 (grad 2.50e-02) at |C| 0.412``: the series' error in the value and in the gradient.

    The largest over the window's measured steps where the exact log-determinant was defined, and
    the largest exact norm; ``, undefined on 2 of 3 measured steps (det(I + C) <= 0)`` is added when it
    was undefined on some (``n/a`` for the errors when on all). Empty when no step measured it.
    """
    if "taylor_rel_error" not in summary:
        return ""
    error, grad = summary["taylor_rel_error"], summary.get("taylor_grad_rel_error", math.nan)
    shown = f"{error:.2e} (grad {grad:.2e})" if math.isfinite(error) else "n/a"
    text = f" taylor err {shown} at |C| {summary['spectral_norm_exact']:.3f}"
    undefined = int(summary.get("taylor_undefined_steps", 0))
    if undefined:
        measured = int(summary.get("taylor_measured_steps", undefined))
        text += f", undefined on {undefined} of {measured} measured steps (det(I + C) <= 0)"
    return text


def run(args: TrainConfig, env: distributed.DistEnv, command: str) -> int:
    out = Path(args.output_dir)
    last = out / ckpt.LAST
    log = print if env.is_main else (lambda *a, **k: None)
    if args.export_only:
        if env.is_main:
            state = ckpt.load(last)
            folder = export(state, out, source=args.export_from, name=args.export_name)
            log(f"exported {args.export_from} of {last} (step {state['step']}) to {folder}")
        return 0

    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier(env)
    exists = last.exists()
    if distributed.any_rank(exists, env) and not distributed.all_agree(exists, env):
        raise ckpt.ResumeMismatchError(
            f"{last} is visible to some processes only: --output-dir must be on a file system all nodes share"
        )
    state = ckpt.load(last) if exists else None

    training = Run(args, env, command)
    if state is not None:
        saved = state["config"]
        ckpt.check_resumable(saved, training.config, path=last)
        restart = ckpt.schedule_restart(saved, training.config, step=state["step"])
        if saved.get("data") != training.config["data"]:
            log(f"note: the data folder moved ({saved.get('data')} -> {training.config['data']})")
        init_from = saved.get("init_from")
        if args.init_from is not None and args.init_from != (init_from or {}).get("weights"):
            log(f"note: --init-from {args.init_from} is not read: a resumed run continues from its checkpoint")
        training.config["init_from"] = init_from
        training.config["schedule_restarts"] = [*saved.get("schedule_restarts", []), *([restart] if restart else [])]
        training.load_state_dict(state)
        log(f"resuming {last} at step {training.step} of {training.total_steps}")
        if restart:
            log(training.restart_line(restart))
        del state
    else:
        if args.extend_epochs is not None:
            raise SetupError(
                f"--extend-epochs continues the run in {out}, which has no {ckpt.LAST}: "
                f"for a new run of {args.extend_epochs} epochs, use --epochs {args.extend_epochs}"
            )
        if args.init_from is not None:
            training.start_from(args.init_from)
    if env.is_main:
        header = training.config_header()
        train_config.write_config(out / train_config.CONFIG_FILE, training.resolved_options(), header)

    tensorboard = not args.no_tensorboard
    metrics = MetricsLog(
        out,
        resume_step=training.step,
        enabled=env.is_main,
        tensorboard=tensorboard,
        wandb=args.wandb,
        run_config=training.config,
    )
    log(
        f"MEC pretraining: {args.arch} ({args.stem} stem), {training.config['num_images']} images, "
        f"batch {args.batch_size} over {env.world_size} process(es) on {env.device}, "
        f"{training.steps_per_epoch} steps/epoch, {training.total_steps} steps, precision {args.precision}"
        + ("" if metrics.tensorboard_active or not tensorboard or not env.is_main else " (no TensorBoard installed)"),
        flush=True,
    )
    note = train_config.eps2_note(args.eps2, args.batch_size)
    if note is not None:
        log(f"note: {note}", flush=True)
    try:
        if training.step < training.total_steps:
            training.train(metrics)
        else:
            log("training already complete")
    finally:
        metrics.close()
    if env.is_main:
        folder = export(training.state_dict(), out, source=args.export_from, name=args.export_name)
        log(f"exported the {args.export_from} to {folder}")
    distributed.barrier(env)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = train_config.parse_args(argv, parser)
    env = distributed.setup(args.device, timeout_minutes=args.dist_timeout_minutes)
    try:
        args = check_args(args, parser, env.world_size)
        with TrainLog(Path(args.output_dir) / TRAIN_LOG, enabled=env.is_main):  # stdout also to OUT/train.log
            return run(args, env, command=shlex.join(["training/pretrain.py", *argv]))
    except ConfigError as exc:  # e.g. no PyYAML to write OUT/config.yaml
        train_config.fail(parser, str(exc))
    except (NonFiniteLossError, ckpt.ResumeMismatchError, SetupError, MecHubError, FileNotFoundError) as exc:
        if env.is_main:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())
