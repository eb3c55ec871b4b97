"""``mec-hub eval knn | linear | finetune``: options and printing; the evaluation itself is ``mec_hub.evaluation``."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mec_hub.cli.common import UserError, device_option, friendly_errors, option

if TYPE_CHECKING:  # imported when a command runs: `--help` stays free of torch
    import torch

    from mec_hub.evaluation.report import EvalReport
    from mec_hub.evaluation.splits import EvalSplits

HEADS = ("backbone", "projector")


@click.group("eval", short_help="Evaluate a model: kNN, linear probe or protocol, fine-tuning.")
def eval_group() -> None:
    """Evaluate a model: weighted kNN (DINO's protocol), a linear classifier, or semi-supervised fine-tuning.

    \b
    knn                       kNN on frozen features (seconds)
    linear                    fast L-BFGS probe on cached centre-crop features (default), or
    linear --protocol paper   the authors' linear protocol: 100 epochs of augmented images, LARC
    finetune                  the whole network on 1% / 10% of the labels (Barlow Twins' recipe)
    \b
    Inputs of knn and the probe, one of:
      --model NAME / --weights SPEC  with  --train DIR --val DIR   (ImageFolders)
      --train-features X --val-features Y   (feature sets of mec-embed: X.npy, or X.parquet
                                             or its shards; labels from their image paths,
                                             or --train-labels / --val-labels)
    The paper protocol and finetune train on images: --model/--weights with --train/--val, and
    --output-dir for their checkpoint (rerun the same command to resume) and report.json; under
    torchrun (torchrun --nproc_per_node N -m mec_hub.cli.hub eval ...) each process takes its
    part of every batch.
    """


_MODEL = [
    option("model", "model_name", metavar="NAME", help="Registry model (see `mec-hub list`)."),
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
]
_HEAD = [
    click.option(
        "--head",
        type=click.Choice(HEADS),
        default="backbone",
        show_default=True,
        help="Which features to evaluate.",
    ),
]
_FOLDERS = [
    click.option("--train", "train_dir", type=click.Path(), help="Training ImageFolder (DIR/CLASS/IMAGE)."),
    click.option("--val", "val_dir", type=click.Path(), help="Validation ImageFolder."),
]
_FEATURE_FILES = [
    click.option(
        "--train-features",
        type=click.Path(),
        help="Training features: an (N, D) .npy file, or a feature set of mec-embed (X.npy, or X.parquet or its "
        "shards).",
    ),
    click.option(
        "--train-labels",
        type=click.Path(),
        help="Labels of --train-features: an integer .npy, or a text file of CLASS/IMAGE paths "
        "[default: the set's image paths: X.paths.txt beside X.npy, or the Parquet path column].",
    ),
    click.option(
        "--val-features",
        type=click.Path(),
        help="Validation features, as --train-features.",
    ),
    click.option("--val-labels", type=click.Path(), help="Labels of --val-features (as --train-labels)."),
]


def _run(batch_help: str) -> list[Callable[..., Any]]:
    return [
        option("batch_size", type=click.IntRange(min=1), default=None, help=batch_help),
        option(
            "num_workers",
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            help="Image-decoding worker processes (0: decode in the main process).",
        ),
        device_option("run the model"),
        click.option(
            "--seed", type=int, default=0, show_default=True, help="Seed of --random-init, the probe or the training."
        ),
    ]


_SAVE_FEATURES = [
    click.option(
        "--save-features",
        type=click.Path(file_okay=False),
        help="Also write the extracted features as DIR/train.npy and DIR/val.npy (reusable as input).",
    ),
]
_OUT = [option("out", "out_path", type=click.Path(dir_okay=False), help="Write a JSON report here (a file).")]


def _apply(func: Callable[..., Any], options: list[Callable[..., Any]]) -> Callable[..., Any]:
    for decorate in reversed(options):
        func = decorate(func)
    return func


def _input_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options of ``knn`` and ``linear``: a model and folders, or feature files."""
    batch = (
        "Images per batch of feature extraction [default: 256]; with --protocol paper, of training, over all "
        "processes [default: the recipe's, 4096]."
    )
    return _apply(func, [*_MODEL, *_HEAD, *_FOLDERS, *_FEATURE_FILES, *_run(batch), *_SAVE_FEATURES, *_OUT])


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


def _model_options(opts: dict[str, Any], hint: str) -> dict[str, Any]:
    """The model the options name, as the evaluation functions take it; a usage error if none is named."""
    if opts["model_name"] is None and opts["weights"] is None:
        raise click.UsageError(f"give --model NAME or --weights SPEC {hint}")
    return {"name": opts["model_name"], "weights": opts["weights"], "random_init": opts["random_init"]}


def _splits(opts: dict[str, Any]) -> tuple[EvalSplits, torch.device]:
    """The train and val features the options name, with the device to evaluate on."""
    from mec_hub.evaluation.splits import EvalSplits
    from mec_hub.progress import progress_enabled
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
    splits = EvalSplits.from_image_folders(
        opts["train_dir"],
        opts["val_dir"],
        **_model_options(opts, "with --train/--val, or --train-features/--val-features"),
        head=opts["head"],
        seed=opts["seed"],
        batch_size=opts["batch_size"] or 256,
        num_workers=opts["num_workers"],
        device=device,
        progress=progress_enabled(),
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
    _report_scores(report, out_path)


def _report_scores(report: EvalReport, out_path: str | None) -> None:
    """Print top-1/top-5 and, with ``--out``, write the report there (with the command line)."""
    click.echo(f"top-1 {report.results['top1']:.2f}%  top-5 {report.results['top5']:.2f}%")
    if out_path is None:
        return
    report.argv = sys.argv[1:]
    try:
        report.write(out_path)
    except OSError as exc:
        raise UserError(f"--out {out_path}: cannot write the report ({exc.strerror or exc})") from None
    click.echo(f"report: {out_path}")


@eval_group.command("knn", short_help="Weighted kNN top-1/top-5 of frozen features (DINO's protocol).")
@_input_options
@option(
    "top_k",
    "k",
    old_names=("--k",),
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Neighbours that vote for each query's class.",
)
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


def _training_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options of the evaluations that train on images (the paper's linear protocol, finetune)."""
    options = [
        option(
            "output_dir",
            type=click.Path(file_okay=False),
            help="Folder for the run: checkpoint_last.pt (every epoch; the same command resumes from it), "
            "report.json and, for a subset, subset.txt. Required by the paper protocol and finetune.",
        ),
        click.option(
            "--epochs", type=click.IntRange(min=1), help="Epochs [default: the recipe's]. Recorded as a departure."
        ),
        click.option(
            "--lr",
            type=click.FloatRange(min=0, min_open=True),
            help="The classifier's base lr [default: the recipe's]. Recorded as a departure.",
        ),
        click.option(
            "--precision",
            type=click.Choice(["fp32", "bf16", "fp16"]),
            default="fp32",
            show_default=True,
            help="Autocast of the training forward (the recipes used fp32).",
        ),
        click.option(
            "--eval-every",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="Epochs between validations (always after the last).",
        ),
    ]
    return _apply(func, options)


# Options of the probe on cached features; refused with --protocol paper, which trains on images.
_PROBE_ONLY = ("train_features", "val_features", "train_labels", "val_labels", "save_features", "weight_decays",
               "holdout", "max_iter", "head")  # fmt: skip
_TRAINING_ONLY = ("output_dir", "epochs", "lr", "precision", "eval_every")


def _given(name: str) -> bool:
    source = click.get_current_context().get_parameter_source(name)
    return source not in (None, click.core.ParameterSource.DEFAULT)


def _flag(name: str) -> str:
    return "--" + {"weight_decays": "weight_decay"}.get(name, name).replace("_", "-")


def _run_training(recipe_name: str, opts: dict[str, Any], **recipe_options: Any) -> None:
    """The paper protocol or finetune from the command's options; prints the scores and the report's path."""
    from mec_hub.evaluation import supervised

    if opts["train_dir"] is None or opts["val_dir"] is None:
        raise click.UsageError("give --train DIR and --val DIR (ImageFolders): this evaluation trains on images")
    model = _model_options(opts, "(this evaluation trains on its features)")
    if opts["output_dir"] is None:
        raise click.UsageError("give --output-dir DIR: the run's checkpoint and report go there")
    _check_writable("--out", opts["out_path"])
    run = supervised.run_linear_paper if recipe_name == "linear-paper" else supervised.run_finetune
    report = run(
        opts["train_dir"],
        opts["val_dir"],
        output_dir=opts["output_dir"],
        **model,
        epochs=opts["epochs"],
        batch_size=opts["batch_size"],
        lr=opts["lr"],
        seed=opts["seed"],
        num_workers=opts["num_workers"],
        device=opts["device"],
        precision=opts["precision"],
        eval_every=opts["eval_every"],
        argv=sys.argv[1:],
        log=lambda *args, **kwargs: click.echo(" ".join(map(str, args))),
        **recipe_options,
    )
    from mec_hub.runtime.distributed import dist_env

    if not dist_env().is_main:
        return
    _report_scores(report, opts["out_path"])
    click.echo(f"report: {Path(opts['output_dir']) / supervised.REPORT}")


@eval_group.command("linear", short_help="Linear top-1/top-5: the fast probe, or the authors' protocol.")
@_input_options
@_training_options
@click.option(
    "--protocol",
    type=click.Choice(["probe", "paper"]),
    default="probe",
    show_default=True,
    help="probe: L-BFGS logistic regression on cached centre-crop features (fast, mec-hub's). paper: the "
    "authors' main_lincls.py (frozen backbone, BatchNorm + fc, SGD in LARC, lr 0.03 x batch/256 at batch 4096, "
    "100 epochs of RandomResizedCrop + flip), the protocol of the paper's linear numbers.",
)
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
def linear_cmd(protocol: str, weight_decays: tuple[float, ...], holdout: float, max_iter: int, **opts: Any) -> None:
    """Linear top-1/top-5: the fast probe on frozen features, or the authors' protocol (--protocol paper)."""
    from mec_hub.evaluation.linear import DEFAULT_WEIGHT_DECAYS

    forbidden = _PROBE_ONLY if protocol == "paper" else _TRAINING_ONLY
    for name in forbidden:
        if _given(name):
            other = "--protocol paper trains on images" if protocol == "paper" else "it trains with --protocol paper"
            raise click.UsageError(f"{_flag(name)} does not go with --protocol {protocol} ({other})")
    if protocol == "paper":
        _run_training("linear-paper", opts)
        return
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


def _finetune_options(func: Callable[..., Any]) -> Callable[..., Any]:
    batch = "Images per training batch, over all processes [default: the recipe's, 256]."
    return _apply(func, [*_MODEL, *_FOLDERS, *_run(batch), *_OUT])


@eval_group.command("finetune", short_help="Semi-supervised fine-tuning on 1% / 10% of the labels.")
@_finetune_options
@_training_options
@click.option(
    "--labels-fraction",
    type=click.FloatRange(0, 1, min_open=True),
    help="Fine-tune on this fraction of each class's training images (e.g. 0.01, 0.1), chosen by --seed.",
)
@click.option(
    "--subset",
    "subset",
    type=click.Path(dir_okay=False),
    help="Fine-tune on the images of this list: one file name a line, as SimCLR's 1percent.txt / 10percent.txt "
    "(CLASS/NAME lines too).",
)
@click.option(
    "--lr-backbone",
    type=click.FloatRange(min=0, min_open=True),
    help="The backbone's lr [default: the recipe's, 0.002]. Recorded as a departure.",
)
@friendly_errors
def finetune_cmd(labels_fraction: float | None, subset: str | None, lr_backbone: float | None, **opts: Any) -> None:
    """Semi-supervised fine-tuning: the whole backbone and a linear head on a labelled subset, top-1/top-5 on --val.

    The recipe is Barlow Twins' (20 epochs, batch 256, SGD momentum 0.9, lr 0.002 backbone / 0.5 head,
    cosine, no weight decay); MEC's authors published none.
    """
    if (labels_fraction is None) == (subset is None):
        raise click.UsageError("give --labels-fraction F or --subset FILE (one of them)")
    _run_training("finetune", opts, labels_fraction=labels_fraction, subset=subset, lr_backbone=lr_backbone)
