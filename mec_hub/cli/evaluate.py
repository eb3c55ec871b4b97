"""``mec-hub eval knn | linear``: options and printing; the evaluation itself is ``mec_hub.evaluation``."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mec_hub.cli.common import UserError, friendly_errors

if TYPE_CHECKING:  # imported when a command runs: `--help` stays free of torch
    import torch

    from mec_hub.evaluation.report import EvalReport
    from mec_hub.evaluation.splits import EvalSplits

HEADS = ("backbone", "projector")


@click.group("eval")
def eval_group() -> None:
    """Evaluate frozen features: weighted kNN (DINO's protocol) or a linear probe.

    \b
    Inputs, one of:
      --model NAME / --weights SPEC  with  --train DIR --val DIR   (ImageFolders)
      --train-features X.npy --val-features Y.npy   (labels from X.paths.txt, or --train-labels)
    """


def _input_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--model", "model_name", metavar="NAME", help="Registry model (see `mec-hub list`)."),
        click.option(
            "--weights",
            metavar="SPEC",
            help="Weights: a folder from `mec-hub convert`, a .safetensors file, hf-hub:org/name, a URL.",
        ),
        click.option(
            "--random-init",
            is_flag=True,
            help="Same architecture and preprocessing, random weights (seeded by --seed): the baseline.",
        ),
        click.option(
            "--head",
            type=click.Choice(HEADS),
            default="backbone",
            show_default=True,
            help="Which features to evaluate.",
        ),
        click.option("--train", "train_dir", type=click.Path(), help="Training ImageFolder (DIR/CLASS/IMAGE)."),
        click.option("--val", "val_dir", type=click.Path(), help="Validation ImageFolder."),
        click.option(
            "--train-features",
            type=click.Path(),
            help="Training features: an (N, D) .npy file, or a Parquet output of mec-embed (X.parquet or its shards).",
        ),
        click.option(
            "--train-labels",
            type=click.Path(),
            help="Labels of --train-features: an integer .npy, or a text file of CLASS/IMAGE paths "
            "[default: X.paths.txt beside X.npy].",
        ),
        click.option(
            "--val-features",
            type=click.Path(),
            help="Validation features: a .npy file or a Parquet output of mec-embed.",
        ),
        click.option("--val-labels", type=click.Path(), help="Labels of --val-features (as --train-labels)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True),
        click.option(
            "--num-workers",
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            help="Image-decoding worker processes.",
        ),
        click.option(
            "--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ... (auto: cuda if present)."
        ),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of --random-init and of the probe."),
        click.option(
            "--save-features",
            type=click.Path(file_okay=False),
            help="Also write the extracted features as DIR/train.npy and DIR/val.npy (reusable as input).",
        ),
        click.option("--out", "out_path", type=click.Path(dir_okay=False), help="Write a JSON report here."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _check_writable(flag: str, target: str | None) -> None:
    """Fail before the long part, not after it, when a result could not be written."""
    if target is None:
        return
    existing = Path(target).resolve()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() and existing != Path(target).resolve():
        raise UserError(f"{flag} {target}: {existing} is a file, not a folder")
    if not os.access(existing if existing.is_dir() else existing.parent, os.W_OK):
        raise UserError(f"{flag} {target}: cannot write in {existing}")


def _splits(opts: dict[str, Any]) -> tuple[EvalSplits, torch.device]:
    """The train and val features the options name, with the device to evaluate on."""
    from mec_hub.evaluation.splits import EvalSplits
    from mec_hub.runtime.devices import resolve_device

    folders = opts["train_dir"] is not None or opts["val_dir"] is not None
    files = opts["train_features"] is not None or opts["val_features"] is not None
    if folders and files:
        raise click.UsageError("give either --train/--val image folders or --train-features/--val-features, not both")
    if not folders and not files:
        raise click.UsageError("give --train DIR --val DIR (with --model/--weights) or --train-features/--val-features")
    for flag, target in (("--out", opts["out_path"]), ("--save-features", opts["save_features"])):
        _check_writable(flag, target)
    device = resolve_device(opts["device"])

    if files:
        if opts["train_features"] is None or opts["val_features"] is None:
            raise click.UsageError("give both --train-features and --val-features")
        for flag, value in (
            ("--model", "model_name"),
            ("--weights", "weights"),
            ("--random-init", "random_init"),
            ("--save-features", "save_features"),
        ):
            if opts[value]:
                raise click.UsageError(f"{flag} needs --train/--val image folders (features are already made)")
        splits = EvalSplits.from_feature_files(
            opts["train_features"],
            opts["val_features"],
            train_labels=opts["train_labels"],
            val_labels=opts["val_labels"],
        )
        return splits, device

    if opts["train_dir"] is None or opts["val_dir"] is None:
        raise click.UsageError("give both --train and --val")
    for flag in ("train_labels", "val_labels"):
        if opts[flag]:
            raise click.UsageError(f"--{flag.replace('_', '-')} goes with --train-features/--val-features")
    if opts["model_name"] is None and opts["weights"] is None:
        raise UserError("give --model NAME or --weights SPEC with --train/--val, or --train-features/--val-features")
    splits = EvalSplits.from_image_folders(
        opts["train_dir"],
        opts["val_dir"],
        name=opts["model_name"],
        weights=opts["weights"],
        random_init=opts["random_init"],
        head=opts["head"],
        seed=opts["seed"],
        batch_size=opts["batch_size"],
        num_workers=opts["num_workers"],
        device=device,
        progress=sys.stderr.isatty(),
    )
    if opts["save_features"]:
        try:
            splits.save_features(opts["save_features"])
        except OSError as exc:
            raise UserError(f"--save-features {opts['save_features']}: cannot write ({exc.strerror or exc})") from None
    return splits, device


def _finish(splits: EvalSplits, report: EvalReport, out_path: str | None, headline: str) -> None:
    train, val = splits.train, splits.val
    click.echo(
        f"{headline} on {len(val)} val / {len(train)} train features "
        f"({len(train.classes)} classes, D={train.features.shape[1]})"
    )
    click.echo(f"top-1 {report.results['top1']:.2f}%  top-5 {report.results['top5']:.2f}%")
    if out_path is None:
        return
    report.argv = sys.argv[1:]
    try:
        report.write(out_path)
    except OSError as exc:
        raise UserError(f"--out {out_path}: cannot write the report ({exc.strerror or exc})") from None
    click.echo(f"report: {out_path}")


@eval_group.command("knn")
@_input_options
@click.option("--k", type=click.IntRange(min=1), default=20, show_default=True, help="Neighbours per query.")
@click.option(
    "--temperature",
    type=click.FloatRange(min=0, min_open=True),
    default=0.07,
    show_default=True,
    help="Vote weight exp(similarity / T).",
)
@friendly_errors
def knn_cmd(k: int, temperature: float, **opts: Any) -> None:
    """Weighted kNN top-1/top-5 of frozen features (cosine, k=20, T=0.07 as in DINO)."""
    from mec_hub.evaluation.protocols import run_knn

    splits, device = _splits(opts)
    report = run_knn(splits, k=k, temperature=temperature, device=device, seed=opts["seed"])
    _finish(splits, report, opts["out_path"], f"kNN (k={report.params['k']}, T={temperature:g})")


@eval_group.command("linear")
@_input_options
@click.option(
    "--weight-decay",
    "weight_decays",
    type=click.FloatRange(min=0),
    multiple=True,
    help="Candidate weight decays, repeatable [default: 1e-6 ... 1, one per decade]; one value skips the sweep.",
)
@click.option(
    "--holdout",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.2,
    show_default=True,
    help="Fraction of each training class held out to choose the weight decay.",
)
@click.option("--max-iter", type=click.IntRange(min=1), default=1000, show_default=True, help="L-BFGS iterations.")
@friendly_errors
def linear_cmd(weight_decays: tuple[float, ...], holdout: float, max_iter: int, **opts: Any) -> None:
    """Linear-probe top-1/top-5: L-BFGS logistic regression on standardised frozen features."""
    from mec_hub.evaluation.linear import DEFAULT_WEIGHT_DECAYS
    from mec_hub.evaluation.protocols import run_linear

    splits, device = _splits(opts)
    report = run_linear(
        splits,
        weight_decays=weight_decays or DEFAULT_WEIGHT_DECAYS,
        holdout=holdout,
        max_iter=max_iter,
        device=device,
        seed=opts["seed"],
    )
    _finish(splits, report, opts["out_path"], f"Linear probe (weight decay {report.params['weight_decay']:g})")
