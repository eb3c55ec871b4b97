"""Each protocol run on ``EvalSplits``, returning its ``EvalReport`` (what ``mec-hub eval`` writes).

Example::

    >>> splits = EvalSplits.from_image_folders("data/train", "data/val", name="mec_resnet18_cifar10s")
    >>> report = run_knn(splits)
    >>> report.results["top1"], report.write("knn.json")
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from mec_hub.evaluation.knn import knn_classify
from mec_hub.evaluation.linear import DEFAULT_WEIGHT_DECAYS, linear_probe
from mec_hub.evaluation.report import EvalReport
from mec_hub.evaluation.splits import EvalSplits
from mec_hub.runtime.devices import resolve_device


def _report(
    splits: EvalSplits,
    protocol: str,
    results: dict[str, float],
    params: dict[str, Any],
    *,
    stage: str,
    seconds: float,
    device: torch.device,
) -> EvalReport:
    classes = splits.train.classes
    return EvalReport(
        protocol=protocol,
        results=results,
        params=params,
        model=splits.model,
        data={**splits.data, "num_classes": len(classes), "classes": classes},
        seconds={**splits.seconds, stage: seconds},
        device=str(device),
    )


def run_knn(
    splits: EvalSplits,
    *,
    k: int = 20,
    temperature: float = 0.07,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> EvalReport:
    """Weighted kNN (``knn_classify``: cosine, ``exp(s/T)`` votes) of val against train.

    ``seed`` is recorded with the parameters: the seed of the random weights, if any.
    """
    device = resolve_device(device)
    start = time.perf_counter()
    result = knn_classify(
        splits.train.features.to(device),
        splits.train.labels,
        splits.val.features,
        splits.val.labels,
        k=k,
        temperature=temperature,
        num_classes=len(splits.train.classes),
    )
    elapsed = time.perf_counter() - start
    params = {"k": result.k, "temperature": temperature, "similarity": "cosine", "weighting": "exp(s/T)", "seed": seed}
    results = {"top1": result.top1, "top5": result.top5}
    return _report(splits, "knn", results, params, stage="knn", seconds=elapsed, device=device)


def run_linear(
    splits: EvalSplits,
    *,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    holdout: float = 0.2,
    max_iter: int = 1000,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> EvalReport:
    """Linear probe (``linear_probe``: L-BFGS logistic regression, weight decay chosen on ``holdout``)."""
    device = resolve_device(device)
    start = time.perf_counter()
    result = linear_probe(
        splits.train.features,
        splits.train.labels,
        splits.val.features,
        splits.val.labels,
        weight_decays=weight_decays,
        holdout_fraction=holdout,
        seed=seed,
        max_iter=max_iter,
        num_classes=len(splits.train.classes),
        device=device,
    )
    elapsed = time.perf_counter() - start
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
        "seed": seed,
    }
    results = {"top1": result.top1, "top5": result.top5}
    return _report(splits, "linear", results, params, stage="linear_probe", seconds=elapsed, device=device)
