"""The recipe: what a run's options make (schedules, loss, optimizer settings) and the record of what defines it.

``recipe_config`` is the run's identity (``checkpoint.RECIPE_KEYS``, compared on resume) plus its
record; the ``*_text`` helpers say in words what it is, for the log, ``config.yaml`` and the export.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import warnings
from typing import Any

from mec_hub.models.losses import MECLoss
from mec_hub.weights.config import IMAGENET_MEAN, IMAGENET_STD
from training import checkpoint as ckpt
from training import config as train_config
from training.config import TrainConfig
from training.schedules import EXTENSION_RULE, Schedules

PAPER = "Liu et al., Self-Supervised Learning via Maximum Entropy Coding, NeurIPS 2022 (arXiv:2210.11464)"
DIVERGENCE_ADVICE = (
    "Try a lower --lr, a longer --lamda-warmup-epochs (or a larger --lamda-warmup-factor or --eps2), "
    "or --precision fp32."
)


class SetupError(RuntimeError):
    """The data or options cannot make a run (reported without a traceback)."""


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


def build_schedules(args: TrainConfig, steps_per_epoch: int) -> Schedules:
    """lr (peak ``lr * batch / 256``), 1/lamda and teacher momentum per step, over the run's (extended) length."""
    schedules = Schedules(
        total_steps=args.total_epochs * steps_per_epoch,
        lr=args.lr * args.batch_size / 256,
        lr_warmup_steps=args.warmup_epochs * steps_per_epoch,
        lamda_inv=args.batch_size * args.eps2 / args.dim,
        lamda_warmup_steps=args.lamda_warmup_epochs * steps_per_epoch,
        lamda_warmup_factor=args.lamda_warmup_factor,
        teacher_momentum=args.teacher_momentum,
    )
    if max(args.warmup_epochs, args.lamda_warmup_epochs) > args.total_epochs:
        warnings.warn(
            f"the warm-ups ({args.warmup_epochs} lr, {args.lamda_warmup_epochs} lamda epochs) are longer than "
            f"the {args.total_epochs}-epoch run: the lr never reaches its peak",
            stacklevel=2,
        )
    return schedules


def build_criterion(args: TrainConfig, *, distributed: bool) -> MECLoss:
    return MECLoss(
        args.eps2,
        args.order,
        gather_distributed=distributed,
        power_iterations=10,  # estimated on logged steps only, so it can afford more iterations
        # Checked by the loop, once per log line, rather than with a device sync every step.
        warn_on_divergence=False,
        check_finite=False,
    )


def restart_text(restart: dict[str, int]) -> str:
    return f"extended from {restart['from_epochs']} to {restart['to_epochs']} epochs at step {restart['step']}"


def restart_line(schedules: Schedules, restart: dict[str, int], steps_per_epoch: int) -> str:
    """The log line of an extension: the values before and after the restart, and the rule."""
    step = restart["step"]
    old = dataclasses.replace(schedules, total_steps=restart["from_epochs"] * steps_per_epoch)
    new = schedules.at(step)
    before = old.at(step - 1) if 0 < step <= old.total_steps else new
    return (
        f"schedule {restart_text(restart)}: lr {before.lr:.4g} (step {step - 1}) -> {new.lr:.4g} (step {step}), "
        f"teacher momentum {before.teacher_momentum:.5f} -> {new.teacher_momentum:.5f}, 1/lamda "
        f"{new.lamda_inv:.4g} unchanged; {EXTENSION_RULE}"
    )


def eps2_text(config: dict[str, Any]) -> str:
    """`` (not the paper's 64: ...)`` for a run whose eps^2 is not the paper's, else nothing."""
    rule = train_config.eps2_rule(config["eps2"], config["batch_size"])
    return "" if rule is None else f" ({rule}; the paper's is 64)"


def describe_arch(arch: dict[str, Any]) -> str:
    args = f", model_args {json.dumps(arch['model_args'])}" if arch["model_args"] else ""
    return f"{arch['arch']} ({arch['stem']} stem{args})"


def arch_options(arch: dict[str, Any]) -> str:
    return shlex.join(["--arch", arch["arch"], "--model-args", json.dumps(arch["model_args"]), "--stem", arch["stem"]])


def resolved_options(args: TrainConfig, config: dict[str, Any]) -> TrainConfig:
    """The options as ``OUT/config.yaml`` records them: eps2 and hidden_dim resolved, the run's init_from."""
    init_from = config["init_from"]["weights"] if config["init_from"] else None
    return dataclasses.replace(args, hidden_dim=config["hidden_dim"], init_from=init_from)


def config_header(args: TrainConfig, config: dict[str, Any], *, step: int, total_steps: int, command: str) -> str:
    """The comment above ``OUT/config.yaml``'s options: where, when and by what command; the run's notes."""
    lines = [
        f"training/pretrain.py options of the run in {args.output_dir}, resolved; --config with this file resumes it.",
        f"Written at step {step} of {total_steps} by: {command}",
        f"Data: {config['num_images']} images in {config['data']}",
    ]
    note = train_config.eps2_note(args.eps2, args.batch_size)
    if note is not None:
        lines.append(note)
    if config["init_from"]:
        lines.append(f"Started from: {config['init_from']['weights']} ({config['init_from']['source']})")
    for restart in config["schedule_restarts"]:
        lines.append(f"Schedule {restart_text(restart)}: {EXTENSION_RULE}")
    return "\n".join(lines)
