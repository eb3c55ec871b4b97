"""``mec-hub eval knn | linear``: frozen-feature evaluation of any model, or of saved features."""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from mec_hub.cli.common import UserError, friendly_errors

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
        click.option("--weights", metavar="SPEC",
                     help="Weights: a folder from `mec-hub convert`, a .safetensors file, hf-hub:org/name, a URL."),
        click.option("--random-init", is_flag=True,
                     help="Same architecture and preprocessing, random weights (seeded by --seed): the baseline."),
        click.option("--head", type=click.Choice(HEADS), default="backbone", show_default=True,
                     help="Which features to evaluate."),
        click.option("--train", "train_dir", type=click.Path(), help="Training ImageFolder (DIR/CLASS/IMAGE)."),
        click.option("--val", "val_dir", type=click.Path(), help="Validation ImageFolder."),
        click.option("--train-features", type=click.Path(), help="Training features, an (N, D) .npy file."),
        click.option("--train-labels", type=click.Path(),
                     help="Labels of --train-features: an integer .npy, or a text file of CLASS/IMAGE paths "
                          "[default: X.paths.txt beside X.npy]."),
        click.option("--val-features", type=click.Path(), help="Validation features, a .npy file."),
        click.option("--val-labels", type=click.Path(), help="Labels of --val-features (as --train-labels)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True),
        click.option("--num-workers", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Image-decoding worker processes."),
        click.option("--device", default="auto", show_default=True,
                     help="cpu, cuda, cuda:1, ... (auto: cuda if present)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of --random-init and of the probe."),
        click.option("--save-features", type=click.Path(file_okay=False),
                     help="Also write the extracted features as DIR/train.npy and DIR/val.npy (reusable as input)."),
        click.option("--out", "out_path", type=click.Path(dir_okay=False), help="Write a JSON report here."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@dataclass
class _Prepared:
    train: Any
    val: Any
    model: dict[str, Any]
    data: dict[str, Any]
    device: Any
    seconds: dict[str, float] = field(default_factory=dict)


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


def _resolve_device(device: str) -> Any:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device: not a device: {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available here")
    return resolved


def _load_model(name: str | None, weights: str | None, random_init: bool, head: str, device: Any, seed: int) -> Any:
    import torch

    import mec_hub

    if name is None and weights is None:
        raise UserError("give --model NAME or --weights SPEC with --train/--val, or --train-features/--val-features")
    if not random_init:
        return mec_hub.load(name, weights=weights, head=head, device=device)

    from mec_hub.models.encoder import build_encoder
    from mec_hub.weights.config import read_config
    from mec_hub.weights.sources import parse_weights_spec

    torch.manual_seed(seed)
    if weights is None:
        return mec_hub.load(name, pretrained=False, head=head, device=device)
    spec = parse_weights_spec(weights)
    if spec.kind == "registry":
        return mec_hub.load(spec.value, pretrained=False, head=head, device=device)
    if spec.kind != "folder":
        raise UserError("--random-init takes the architecture from --model NAME or a --weights folder with config.json")
    return build_encoder(read_config(spec.value), head=head).to(device).eval()


def _features_meta(model: Any, weights: str | None, random_init: bool, head: str) -> dict[str, Any]:
    """What made the features, in the vocabulary of mec-embed's FEATS.meta.json (so search can use them)."""
    from mec_hub.weights.registry import is_registered
    from mec_hub.weights.sources import parse_weights_spec

    if weights is not None and not random_init:
        spec = parse_weights_spec(weights)
        if spec.kind == "registry":
            weights = None
        elif spec.kind in ("file", "folder"):
            weights = str(Path(spec.value).resolve())
        else:
            weights = str(spec)
    return {
        "model": model.name if model.name and is_registered(model.name) else None,
        "weights": None if random_init else weights,
        "weights_sha256": None if random_init else model.weights_sha256,
        "pretrained": not random_init,
        "architecture": model.config.architecture,
        "head": head,
        "embed_dim": model.embed_dim,
        "normalize": False,
        "precision": "fp32",
        "out_dtype": "float32",
        "preprocessing": model.pretrained_cfg,
    }


def _prepare(opts: dict[str, Any]) -> _Prepared:
    from mec_hub.evaluation.features import (
        PATHS_SUFFIX,
        extract_image_folder,
        load_feature_file,
        save_feature_file,
        sidecar,
    )

    folders = opts["train_dir"] is not None or opts["val_dir"] is not None
    files = opts["train_features"] is not None or opts["val_features"] is not None
    if folders and files:
        raise click.UsageError("give either --train/--val image folders or --train-features/--val-features, not both")
    if not folders and not files:
        raise click.UsageError("give --train DIR --val DIR (with --model/--weights) or --train-features/--val-features")
    for flag, target in (("--out", opts["out_path"]), ("--save-features", opts["save_features"])):
        _check_writable(flag, target)
    device = _resolve_device(opts["device"])
    seconds: dict[str, float] = {}

    if files:
        if opts["train_features"] is None or opts["val_features"] is None:
            raise click.UsageError("give both --train-features and --val-features")
        for flag, value in (("--model", "model_name"), ("--weights", "weights"), ("--random-init", "random_init"),
                            ("--save-features", "save_features")):
            if opts[value]:
                raise click.UsageError(f"{flag} needs --train/--val image folders (features are already made)")
        start = time.perf_counter()
        train = load_feature_file(opts["train_features"], opts["train_labels"])
        val = load_feature_file(opts["val_features"], opts["val_labels"], classes=train.classes)
        seconds["load_features"] = time.perf_counter() - start
        if train.features.shape[1] != val.features.shape[1]:
            raise UserError(
                f"{opts['train_features']} has {train.features.shape[1]} dimensions but "
                f"{opts['val_features']} has {val.features.shape[1]}; they must come from the same model"
            )
        sha_train, sha_val = train.meta.get("weights_sha256"), val.meta.get("weights_sha256")
        if sha_train and sha_val and sha_train != sha_val:
            raise UserError(
                f"{opts['train_features']} and {opts['val_features']} were made with different weights "
                f"(sha256 {sha_train[:12]}... vs {sha_val[:12]}...)"
            )
        model = {key: train.meta.get(key) for key in ("model", "weights", "weights_sha256", "head", "embed_dim")}
        model["embed_dim"] = int(train.features.shape[1])
        data = {
            split: {
                "features": opts[f"{split}_features"],
                "labels": opts[f"{split}_labels"] or str(sidecar(opts[f"{split}_features"], PATHS_SUFFIX)),
                "count": len(part),
            }
            for split, part in (("train", train), ("val", val))
        }
        return _Prepared(train, val, model, data, device, seconds)

    if opts["train_dir"] is None or opts["val_dir"] is None:
        raise click.UsageError("give both --train and --val")
    for flag in ("train_labels", "val_labels"):
        if opts[flag]:
            raise click.UsageError(f"--{flag.replace('_', '-')} goes with --train-features/--val-features")
    start = time.perf_counter()
    model = _load_model(opts["model_name"], opts["weights"], opts["random_init"], opts["head"], device, opts["seed"])
    seconds["load_model"] = time.perf_counter() - start
    extract = functools.partial(
        extract_image_folder, model, batch_size=opts["batch_size"], num_workers=opts["num_workers"],
        device=device, progress=sys.stderr.isatty(),
    )
    start = time.perf_counter()
    train = extract(opts["train_dir"])
    val = extract(opts["val_dir"], classes=train.classes)
    seconds["extract_features"] = time.perf_counter() - start
    meta = _features_meta(model, opts["weights"] or opts["model_name"], opts["random_init"], opts["head"])
    if opts["save_features"]:
        out = Path(opts["save_features"])
        for part, source, name in ((train, opts["train_dir"], "train"), (val, opts["val_dir"], "val")):
            folder = str(Path(source).resolve())
            try:
                save_feature_file(part, out / f"{name}.npy", {**meta, "inputs": [folder], "base_dir": folder})
            except OSError as exc:
                raise UserError(f"--save-features {out}: cannot write ({exc.strerror or exc})") from None
    data = {
        "train": {"folder": opts["train_dir"], "count": len(train), "skipped": [p for p, _ in train.skipped]},
        "val": {"folder": opts["val_dir"], "count": len(val), "skipped": [p for p, _ in val.skipped]},
    }
    model_info = {k: meta[k] for k in ("weights_sha256", "pretrained", "architecture", "head", "embed_dim",
                                       "preprocessing")}
    model_info = {"model": model.name, "weights": None if opts["random_init"] else opts["weights"], **model_info}
    return _Prepared(train, val, model_info, data, device, seconds)


def _finish(prepared: _Prepared, protocol: str, params: dict[str, Any], results: dict[str, Any],
            out_path: str | None, headline: str) -> None:
    import datetime

    from mec_hub import __version__
    from mec_hub.fileio import atomic_write_json

    train, val = prepared.train, prepared.val
    click.echo(f"{headline} on {len(val)} val / {len(train)} train features "
               f"({len(train.classes)} classes, D={train.features.shape[1]})")
    click.echo(f"top-1 {results['top1']:.2f}%  top-5 {results['top5']:.2f}%")
    if out_path is None:
        return
    report = {
        "protocol": protocol,
        "results": results,
        "params": params,
        "model": prepared.model,
        "data": {**prepared.data, "num_classes": len(train.classes), "classes": train.classes},
        "seconds": {k: round(v, 3) for k, v in prepared.seconds.items()},
        "device": str(prepared.device),
        "mec_hub_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
    }
    try:
        atomic_write_json(out_path, report)
    except OSError as exc:
        raise UserError(f"--out {out_path}: cannot write the report ({exc.strerror or exc})") from None
    click.echo(f"report: {out_path}")


@eval_group.command("knn")
@_input_options
@click.option("--k", type=click.IntRange(min=1), default=20, show_default=True, help="Neighbours per query.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=0.07, show_default=True,
              help="Vote weight exp(similarity / T).")
@friendly_errors
def knn_cmd(k: int, temperature: float, **opts: Any) -> None:
    """Weighted kNN top-1/top-5 of frozen features (cosine, k=20, T=0.07 as in DINO)."""
    from mec_hub.evaluation.knn import knn_classify

    prepared = _prepare(opts)
    start = time.perf_counter()
    result = knn_classify(
        prepared.train.features.to(prepared.device), prepared.train.labels, prepared.val.features,
        prepared.val.labels, k=k, temperature=temperature, num_classes=len(prepared.train.classes),
    )
    prepared.seconds["knn"] = time.perf_counter() - start
    params = {"k": result.k, "temperature": temperature, "similarity": "cosine", "weighting": "exp(s/T)",
              "seed": opts["seed"]}
    _finish(prepared, "knn", params, {"top1": result.top1, "top5": result.top5},
            opts["out_path"], f"kNN (k={result.k}, T={temperature:g})")


@eval_group.command("linear")
@_input_options
@click.option("--weight-decay", "weight_decays", type=click.FloatRange(min=0), multiple=True,
              help="Candidate weight decays, repeatable [default: 1e-6 ... 1, one per decade]; "
                   "one value skips the sweep.")
@click.option("--holdout", type=click.FloatRange(0, 1, max_open=True), default=0.2, show_default=True,
              help="Fraction of each training class held out to choose the weight decay.")
@click.option("--max-iter", type=click.IntRange(min=1), default=1000, show_default=True, help="L-BFGS iterations.")
@friendly_errors
def linear_cmd(weight_decays: tuple[float, ...], holdout: float, max_iter: int, **opts: Any) -> None:
    """Linear-probe top-1/top-5: L-BFGS logistic regression on standardised frozen features."""
    from mec_hub.evaluation.linear import DEFAULT_WEIGHT_DECAYS, linear_probe

    prepared = _prepare(opts)
    start = time.perf_counter()
    result = linear_probe(
        prepared.train.features, prepared.train.labels, prepared.val.features, prepared.val.labels,
        weight_decays=weight_decays or DEFAULT_WEIGHT_DECAYS, holdout_fraction=holdout, seed=opts["seed"],
        max_iter=max_iter, num_classes=len(prepared.train.classes), device=prepared.device,
    )
    prepared.seconds["linear_probe"] = time.perf_counter() - start
    params = {
        "classifier": "multinomial logistic regression on standardised features, full-batch L-BFGS",
        "weight_decay": result.weight_decay,
        "weight_decay_sweep": [{"weight_decay": wd, "holdout_top1": acc} for wd, acc in result.sweep.items()],
        "holdout_fraction": holdout,
        "holdout_size": result.holdout_size,
        "max_iter": max_iter,
        "iterations": result.iterations,
        "converged": result.converged,
        "notes": result.notes,
        "seed": opts["seed"],
    }
    _finish(prepared, "linear", params, {"top1": result.top1, "top5": result.top5},
            opts["out_path"], f"Linear probe (weight decay {result.weight_decay:g})")
