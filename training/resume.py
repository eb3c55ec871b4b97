"""A run's checkpoints: the state a run saves and reads back, where it starts (resume or ``--init-from``), its export.

The file format, atomic writes, snapshots and the resume check are ``training.checkpoint``'s; this
module is what a :class:`training.loop.Run` puts in a checkpoint and takes out of one.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mec_hub.errors import MecHubError
from mec_hub.export.convert import extract_weights, write_hub_folder
from mec_hub.models.encoder import load_state_dict_strict
from mec_hub.weights.checkpoint import TRAIN_FORMAT
from training import checkpoint as ckpt
from training import distributed
from training.config import TrainConfig
from training.recipe import (
    DIVERGENCE_ADVICE,
    PAPER,
    SetupError,
    arch_options,
    describe_arch,
    eps2_text,
    eval_preprocessing,
    restart_line,
    restart_text,
)
from training.schedules import EXTENSION_RULE

if TYPE_CHECKING:
    from training.loop import Run

# The terms of weights trained here: mec-hub's own license (LICENSE); the card adds the data's own terms.
TRAINED_HERE_LICENSE = "MIT (mec-hub's license, see its LICENSE file; trained with training/pretrain.py)"
SPLIT_FOLDER_NAMES = {"train", "training", "val", "valid", "validation", "test", "images"}


class CheckpointWriteError(MecHubError):
    """A checkpoint could not be written (a full disk, say); the one written before it is intact."""


# --------------------------------------------------------------------------------------------
# what a checkpoint holds


def state_dict(run: Run) -> dict[str, Any]:
    state = {
        "format": TRAIN_FORMAT,
        "arch": run.args.arch,
        "model_args": dict(run.args.model_args),
        "stem": run.args.stem,
        "model": run.model.state_dict(),
        "export": export_info(
            run.config,
            step=run.step,
            steps_per_epoch=run.steps_per_epoch,
            command=run.command,
            knn_top1=run.knn_top1,
            knn_measured=run.knn_measured,
        ),
        "step": run.step,
        "steps_per_epoch": run.steps_per_epoch,
        "total_steps": run.total_steps,
        "config": run.config,
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "knn_top1": run.knn_top1,
        "knn_measured": run.knn_measured,
        # Unlogged steps and epoch totals, so that a resumed run logs what an uninterrupted one does.
        "metrics_state": {"window": run.stats.state_dict(), "epoch": run.epoch_totals.state_dict()},
        "loss_state": run.criterion.state_dict(),
        "world_size": run.env.world_size,
        "versions": {"torch": str(torch.__version__)},
    }
    ckpt.assert_weights_only_safe(state)
    return state


def load_state_dict(run: Run, state: dict[str, Any]) -> None:
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.step = int(state["step"])
    run.saved_step = run.step
    run.knn_top1 = state.get("knn_top1")
    run.knn_measured = state.get("knn_measured")
    run.stats.load_state_dict(state["metrics_state"]["window"], run.env.device)
    run.epoch_totals.load_state_dict(state["metrics_state"]["epoch"])
    run.criterion.load_state_dict(state["loss_state"])


def failure_reason(exc: BaseException) -> str:
    """``OSError [Errno 28] No space left on device (ENOSPC)``, or the exception's first line."""
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno)
        return f"OSError [Errno {exc.errno}] {exc.strerror or exc}" + (f" ({name})" if name else "")
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else 'no message'}"


def write_failure(path: Path, step: int, exc: BaseException, *, previous_step: int | None) -> str:
    """One line: the file that could not be written, why, and that the previous checkpoint is intact."""
    kept = (
        f"the previous checkpoint {path} (step {previous_step}) is intact; rerun the same command to resume from it"
        if previous_step is not None
        else "no checkpoint was written before it"
    )
    return f"cannot write the checkpoint {path} at step {step}: {failure_reason(exc)}; {kept}"


def save(run: Run, *, snapshot_epoch: int | None = None) -> None:
    """Write ``OUT/checkpoint_last.pt`` (and keep it as an epoch snapshot); a failed write is one clear error."""
    # Never save weights that a NaN step has already touched.
    run.stats.check_finite(steps_per_epoch=run.steps_per_epoch, advice=DIVERGENCE_ADVICE)
    if run.env.is_main:
        path = run.out / ckpt.LAST
        state = state_dict(run)
        try:
            ckpt.save(path, state)
        except (OSError, RuntimeError) as exc:  # torch.save to a path reports a failed write as a RuntimeError
            raise CheckpointWriteError(write_failure(path, run.step, exc, previous_step=run.saved_step)) from None
        run.saved_step = run.step
        if snapshot_epoch is not None:
            try:
                ckpt.keep_snapshot(run.out, snapshot_epoch, run.args.keep_snapshots)
            except OSError as exc:
                snapshot = run.out / ckpt.snapshot_name(snapshot_epoch)
                raise CheckpointWriteError(
                    f"cannot keep the snapshot {snapshot}: {failure_reason(exc)}; {path} (step {run.step}) is written"
                ) from None
    distributed.barrier(run.env)


# --------------------------------------------------------------------------------------------
# where a run starts


def resume_or_start(run: Run, state: dict[str, Any] | None, *, log: Callable[..., None]) -> None:
    """Continue ``run`` from its checkpoint ``state`` (checked against the command), or start it fresh."""
    args, last = run.args, run.out / ckpt.LAST
    if state is None:
        if args.extend_epochs is not None:
            raise SetupError(
                f"--extend-epochs continues the run in {run.out}, which has no {ckpt.LAST}: "
                f"for a new run of {args.extend_epochs} epochs, use --epochs {args.extend_epochs}"
            )
        if args.init_from is not None:
            start_from(run, args.init_from)
        return
    saved = state["config"]
    ckpt.check_resumable(saved, run.config, path=last)
    restart = ckpt.schedule_restart(saved, run.config, step=state["step"])
    if saved.get("data") != run.config["data"]:
        log(f"note: the data folder moved ({saved.get('data')} -> {run.config['data']})")
    init_from = saved.get("init_from")
    if args.init_from is not None and args.init_from != (init_from or {}).get("weights"):
        log(f"note: --init-from {args.init_from} is not read: a resumed run continues from its checkpoint")
    run.config["init_from"] = init_from
    run.config["schedule_restarts"] = [*saved.get("schedule_restarts", []), *([restart] if restart else [])]
    load_state_dict(run, state)
    log(f"resuming {last} at step {run.step} of {run.total_steps}")
    if restart:
        log(restart_line(run.schedules, restart, run.steps_per_epoch))


def start_from(run: Run, spec: str) -> None:
    """``--init-from``: the student's backbone (and projector, if ``spec`` has one) from ``spec``, the
    teacher a copy of the student; the predictor and the optimizer start fresh."""
    args = run.args
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
    student = run.model.student
    load_state_dict_strict(student.backbone, weights.backbone, origin=spec, target=f"{args.arch} backbone")
    if weights.projector is not None:
        target = f"projector of this run (--dim {args.dim}, --hidden-dim {run.config['hidden_dim']})"
        load_state_dict_strict(student.projector, weights.projector, origin=spec, target=target)
    run.model.teacher.load_state_dict(student.state_dict())
    parts = "backbone and projector" if weights.projector is not None else "backbone (projector fresh)"
    run.config["init_from"] = {"weights": spec, "source": f"{weights.source}: student {parts}"}
    run.log(f"started from {spec} ({weights.source}): student {parts}, teacher a copy of the student")


# --------------------------------------------------------------------------------------------
# the export


def dataset_name(data: str) -> str:
    """``/data/cifar10-subset/train`` -> ``cifar10-subset/train``: a split folder alone names nothing."""
    path = Path(data)
    if path.name.lower() in SPLIT_FOLDER_NAMES and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name or data


def export_info(
    config: dict[str, Any],
    *,
    step: int,
    steps_per_epoch: int,
    command: str,
    knn_top1: float | None,
    knn_measured: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What the export's ``config.json`` and card say of the run: its recipe, data, license (mec-hub's,
    with the data's own terms: the card's), and the kNN monitor's last figure with how and when it was
    measured (``knn_measured``: ``KnnMonitor.settings`` and the step)."""
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
        "license": TRAINED_HERE_LICENSE,
    }
    if config.get("schedule_restarts"):
        meta["schedule"] = "; ".join(restart_text(r) for r in config["schedule_restarts"]) + " (" + EXTENSION_RULE + ")"
    if config.get("init_from"):
        meta["init_from"] = f"{config['init_from']['weights']} ({config['init_from']['source']})"
    if knn_top1 is not None:
        meta["knn_top1"] = round(knn_top1, 2)
        meta["metrics_source"] = "kNN monitor of training/pretrain.py (k-NN on the --knn-val folder)"
    if knn_top1 is not None and knn_measured is not None:
        at = knn_measured["step"]
        meta["knn_top1_protocol"] = (
            f"weighted kNN: cosine, k={knn_measured['k']}, T={knn_measured['temperature']:g}, DINO's protocol, "
            f"on the run's evaluation preprocessing"
        )
        meta["eval_data"] = (
            f"{dataset_name(knn_measured['val'])} (classified), bank {dataset_name(knn_measured['bank'])}"
        )
        meta["metrics_source"] = (
            f"measured by the kNN monitor of training/pretrain.py (--knn-train/--knn-val) at step {at} "
            f"(epoch {at / steps_per_epoch:g}) of this run"
        )
    return {"preprocessing": eval_preprocessing(config["image_size"]), "meta": meta}


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


def export_only(args: TrainConfig, *, log: Callable[..., None]) -> None:
    """``--export-only``: write ``OUT/export`` from the run's last checkpoint."""
    last = Path(args.output_dir) / ckpt.LAST
    state = ckpt.load(last)
    folder = export(state, Path(args.output_dir), source=args.export_from, name=args.export_name)
    log(f"exported {args.export_from} of {last} (step {state['step']}) to {folder}")
