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

This module is the command line and puts the pieces together: ``training.recipe`` (what the
options make), ``training.loop`` (the training loop), ``training.resume`` (what a checkpoint holds,
resuming, ``--init-from`` and the export; the file format is ``training.checkpoint``'s).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `training` and `mec_hub` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mec_hub.errors import MecHubError
from training import checkpoint as ckpt
from training import config as train_config
from training import distributed, recipe, resume
from training.config import ConfigError, TrainConfig
from training.engine import NonFiniteLossError
from training.loop import Run
from training.metrics import MetricsLog
from training.model import build_mec_model, model_args_error
from training.progress import TRAIN_LOG, TrainLog


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
    if not checked.export_only:  # an argument the architecture does not take, before any data is read
        problem = model_args_error(checked.arch, checked.model_args)
        if problem is not None:
            train_config.fail(parser, problem)
    if checked.stem == "small" and checked.image_size > 64:
        warnings.warn("--stem small is meant for 32-64 px images; at larger sizes it is slow", stacklevel=2)
    return checked


def run(args: TrainConfig, env: distributed.DistEnv, command: str) -> int:
    out = Path(args.output_dir)
    last = out / ckpt.LAST
    log = print if env.is_main else (lambda *a, **k: None)
    if args.export_only:
        if env.is_main:
            resume.export_only(args, log=log)
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
    # The module's build_mec_model, looked up now, so that a test may replace it.
    training = Run(args, env, command, build_model=build_mec_model)
    resume.resume_or_start(training, state, log=log)
    del state
    if env.is_main:
        header = recipe.config_header(
            args, training.config, step=training.step, total_steps=training.total_steps, command=command
        )
        options = recipe.resolved_options(args, training.config)
        train_config.write_config(out / train_config.CONFIG_FILE, options, header)

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
        folder = resume.export(resume.state_dict(training), out, source=args.export_from, name=args.export_name)
        log(f"exported the {args.export_from} to {folder}")
    distributed.barrier(env)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = train_config.parse_args(argv, parser)
    try:
        env = distributed.setup(args.device, timeout_minutes=args.dist_timeout_minutes)
    except ConfigError as exc:  # e.g. --device cuda on a machine without a GPU
        train_config.fail(parser, str(exc))
    try:
        args = check_args(args, parser, env.world_size)
        with TrainLog(Path(args.output_dir) / TRAIN_LOG, enabled=env.is_main):  # stdout also to OUT/train.log
            return run(args, env, command=shlex.join(["training/pretrain.py", *argv]))
    except ConfigError as exc:  # e.g. no PyYAML to write OUT/config.yaml
        train_config.fail(parser, str(exc))
    except (NonFiniteLossError, ckpt.ResumeMismatchError, recipe.SetupError, MecHubError, FileNotFoundError) as exc:
        if env.is_main:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())
