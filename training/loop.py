"""The training loop: a :class:`Run` holds one process's data, model, optimizer and counters, and trains.

What the options make is ``training.recipe``'s; what a checkpoint holds and where a run starts is
``training.resume``'s; ``training/pretrain.py`` (the command line) puts them together.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from mec_hub.data.datasets import GlobalBatchSampler, derive_seed
from mec_hub.models.losses import warn_if_not_converging
from mec_hub.runtime.devices import Precision
from training import checkpoint as ckpt
from training import distributed, resume
from training.config import TrainConfig
from training.data import TwoViewImages, find_images, mocov3_views
from training.engine import EpochTotals, StepStats, train_step
from training.metrics import MetricsLog
from training.model import MECModel, build_mec_model
from training.monitor import KnnMonitor
from training.optim import build_optimizer
from training.progress import Progress
from training.recipe import (
    DIVERGENCE_ADVICE,
    SetupError,
    build_criterion,
    build_schedules,
    eval_preprocessing,
    recipe_config,
)
from training.schedules import ScheduleValues


class Run:
    """Everything one training process holds; ``train()`` runs from the current step to the end.

    ``build_model`` makes the model from the options (``training.model.build_mec_model``'s signature).
    """

    def __init__(
        self,
        args: TrainConfig,
        env: distributed.DistEnv,
        command: str,
        build_model: Callable[..., MECModel] = build_mec_model,
    ) -> None:
        self.args, self.env, self.command = args, env, command
        self.out = Path(args.output_dir)
        self.log = print if env.is_main else (lambda *a, **k: None)

        files = find_images(args.data)
        torch.manual_seed(args.seed)
        self.model: MECModel = build_model(
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
        self.schedules = build_schedules(args, self.steps_per_epoch)
        views = mocov3_views(args.image_size, args.augmentation)
        dataset = TwoViewImages(args.data, views, seed=args.seed, files=files)
        self.loader = DataLoader(
            dataset,
            batch_sampler=self.sampler,
            num_workers=args.num_workers,
            pin_memory=env.device.type == "cuda",
            persistent_workers=args.num_workers > 0,
            prefetch_factor=4 if args.num_workers > 0 else None,
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
        self.criterion = build_criterion(args, distributed=env.distributed)
        self.step = 0
        self.saved_step: int | None = None
        """The step of the checkpoint in ``OUT`` (``None`` before the first is written)."""
        self.stats = StepStats()
        self.epoch_totals = EpochTotals()
        self.knn_top1: float | None = None
        self.knn_measured: dict[str, Any] | None = None
        """How and when ``knn_top1`` was measured (``KnnMonitor.settings`` and the step), for the export's card."""
        self.monitor: KnnMonitor | None = None
        if args.knn_train is not None:
            self.monitor = KnnMonitor(
                args.knn_train,
                args.knn_val,
                preprocessing=eval_preprocessing(args.image_size),
                k=args.knn_k,
                temperature=args.knn_temperature,
                num_workers=min(args.num_workers, 8),
                device=env.device,
            )

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
                        resume.save(self)
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
                self.knn_top1 = self.monitor(self.export_source().backbone)
                self.knn_measured = {**self.monitor.settings(), "step": self.step}
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
        resume.save(self, snapshot_epoch=epoch if snapshot else None)
        kept = f" (+ epoch {epoch} snapshot)" if snapshot else ""
        self.log(f"saved {self.out / ckpt.LAST} at step {self.step}{kept}", flush=True)

    def export_source(self) -> nn.Module:
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
