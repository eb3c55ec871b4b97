"""Linear probe on frozen features: multinomial logistic regression, weight decay chosen on held-out data.

The protocol (after CLIP's linear probe, Radford et al. 2021, which fits L-BFGS logistic regression
on cached features and sweeps the L2 strength on a validation split):

1. Standardise each feature dimension with the mean and standard deviation (``ddof=0``) of the
   training features it is fitted on; constant dimensions become 0.
2. Minimise ``mean cross-entropy(x W^T + b, y) + weight_decay / 2 * ||W||^2`` (the bias is not
   decayed) from zero weights with full-batch L-BFGS (strong Wolfe line search). For a positive
   weight decay the problem is convex with a unique optimal ``W`` (and bias, up to a shift
   common to all classes that changes no prediction), so the result depends neither on the
   starting point nor on the order of the data.
3. Hold out ``holdout_fraction`` of each training class (a shuffle seeded by ``seed``), fit once
   per candidate weight decay on the rest (strongest first, each fit warm-started from the
   previous one), keep the one with the best held-out top-1 (ties go to the larger weight
   decay), refit it from zero on the whole training set, and report top-1/top-5 on the
   validation features.

Everything is deterministic for a given seed. The fitted classifier is returned as an
``nn.Linear`` that applies to raw (unstandardised) features.

Example::

    >>> result = linear_probe(train.features, train.labels, val.features, val.labels, seed=0)
    >>> result.top1, result.weight_decay
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mec_hub.evaluation.inputs import (
    InvalidFeaturesError,
    labelled_pair,
    rank_classes,
    topk_accuracy,
)
from mec_hub.progress import progress_bar

DEFAULT_WEIGHT_DECAYS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclass(frozen=True)
class LinearProbeResult:
    """``predictions``: int64 ``(Q,)``; ``ranked``: int64 ``(Q, min(5, C))`` classes by logit.

    ``top1``/``top5`` are percentages on the validation features (``None`` without labels);
    ``sweep`` maps each candidate weight decay to its held-out top-1 (empty when there was no
    sweep); ``classifier`` maps raw features to logits.
    """

    predictions: torch.Tensor
    ranked: torch.Tensor
    top1: float | None
    top5: float | None
    weight_decay: float
    sweep: dict[float, float]
    classifier: nn.Linear
    num_classes: int
    iterations: int
    converged: bool
    holdout_size: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Fit:
    weight: torch.Tensor  # (C, D), in standardised space
    bias: torch.Tensor  # (C,)
    mean: torch.Tensor  # (D,)
    scale: torch.Tensor  # (D,)
    iterations: int
    converged: bool

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return ((features - self.mean) / self.scale) @ self.weight.T + self.bias

    def to_linear(self) -> nn.Linear:
        """The same map on raw features: ``W' = W / s``, ``b' = b - W' mean``."""
        weight = self.weight / self.scale
        layer = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(self.bias - weight @ self.mean)
        return layer.cpu()


def fit_logistic_regression(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    weight_decay: float,
    max_iter: int = 1000,
    start: _Fit | None = None,
) -> _Fit:
    """Steps 1-2 of the protocol on one training set (see the module docstring).

    ``start``, a fit on the same features with another weight decay, only shortens the descent:
    for ``weight_decay > 0`` the optimum is unique.
    """
    mean = features.mean(dim=0)
    scale = features.std(dim=0, unbiased=False)
    scale = torch.where(scale > 1e-12, scale, torch.ones_like(scale))
    x = (features - mean) / scale
    if start is None:
        weight = torch.zeros(num_classes, x.shape[1], device=x.device)
        bias = torch.zeros(num_classes, device=x.device)
    else:
        weight, bias = start.weight.clone(), start.bias.clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, labels) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    iterations = int(optimizer.state[weight].get("n_iter", 0))
    return _Fit(weight.detach(), bias.detach(), mean, scale, iterations, iterations < max_iter)


def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fit_index, holdout_index)``: ``round(fraction * n)`` of each class held out, at least one kept."""
    generator = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    fit, held = [], []
    for cls in torch.unique(labels, sorted=True).tolist():
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_held = min(round(fraction * len(members)), len(members) - 1)
        held.append(members[:n_held])
        fit.append(members[n_held:])
    return torch.sort(torch.cat(fit)).values, torch.sort(torch.cat(held)).values


def _accuracy(fit: _Fit, features: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * int((fit.logits(features).argmax(dim=1) == labels).sum()) / len(labels)


def linear_probe(
    train_features: Any,
    train_labels: Any,
    val_features: Any,
    val_labels: Any = None,
    *,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 1000,
    num_classes: int | None = None,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> LinearProbeResult:
    """Fit a linear classifier on ``train_features`` (N, D) and evaluate it on ``val_features`` (Q, D).

    See the module docstring for the protocol. Give one weight decay (or ``holdout_fraction=0``)
    to skip the sweep. Runs on ``device`` (default: that of ``train_features``). ``progress``: a bar
    on standard error counting the fits, with an ETA (default: when standard error is a terminal,
    ``mec_hub.progress.progress_enabled``).
    """
    weight_decays = [float(wd) for wd in weight_decays]
    if not weight_decays or any(wd < 0 for wd in weight_decays):
        raise InvalidFeaturesError(f"weight_decays must be non-negative numbers, got {weight_decays}")
    if not 0 <= holdout_fraction < 1:
        raise InvalidFeaturesError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    if max_iter < 1:
        raise InvalidFeaturesError(f"max_iter must be at least 1, got {max_iter}")
    train, labels, val, targets, num_classes = labelled_pair(
        train_features, train_labels, val_features, val_labels, num_classes, query_name="validation"
    )
    device = torch.device(device) if device is not None else train.device
    train, val, labels = train.to(device), val.to(device), labels.to(device)

    notes: list[str] = []
    sweep: dict[float, float] = {}
    chosen = sorted(weight_decays)[len(weight_decays) // 2]
    holdout_size = 0
    fit_index = held_index = None
    if len(weight_decays) > 1 and holdout_fraction > 0:
        fit_index, held_index = stratified_holdout(labels, holdout_fraction, seed)
        fit_index, held_index = fit_index.to(device), held_index.to(device)
        holdout_size = len(held_index)
        if holdout_size == 0:
            notes.append(f"too few training features to hold any out; used weight decay {chosen:g}")
            warnings.warn(notes[-1], stacklevel=2)
    elif len(weight_decays) == 1:
        chosen = weight_decays[0]

    sweeping = fit_index is not None and holdout_size > 0
    fits = (len(weight_decays) if sweeping else 0) + 1  # the sweep's, then the final one
    with progress_bar(total=fits, desc="linear probe", unit="fit", progress=progress, leave=False) as bar:
        if sweeping:
            # From strong to weak decay, each fit starting where the previous one ended (a
            # regularisation path): the same optima as from zero, in far fewer iterations.
            fitted = None
            for wd in sorted(weight_decays, reverse=True):
                bar.set_postfix_str(f"weight decay {wd:g}")
                fitted = fit_logistic_regression(
                    train[fit_index], labels[fit_index], num_classes, weight_decay=wd, max_iter=max_iter,
                    start=fitted,
                )
                sweep[wd] = _accuracy(fitted, train[held_index], labels[held_index])
                bar.update()
            sweep = {wd: sweep[wd] for wd in weight_decays}
            chosen = max(sweep, key=lambda wd: (sweep[wd], wd))
        bar.set_postfix_str(f"final fit, weight decay {chosen:g}")
        final = fit_logistic_regression(train, labels, num_classes, weight_decay=chosen, max_iter=max_iter)
        bar.update()
    if len(sweep) > 2 and chosen in (min(sweep), max(sweep)) and len(set(sweep.values())) > 1:
        notes.append(f"the best weight decay, {chosen:g}, is at the edge of the grid; widen it")
        warnings.warn(notes[-1], stacklevel=2)
    if not final.converged:
        notes.append(f"L-BFGS stopped at max_iter={max_iter} before converging")
        warnings.warn(notes[-1], stacklevel=2)
    logits = final.logits(val)
    ranked = rank_classes(logits, 5).cpu()
    top1 = top5 = None
    if targets is not None:
        top1 = topk_accuracy(ranked, targets, 1)
        top5 = topk_accuracy(ranked, targets, ranked.shape[1])
    return LinearProbeResult(
        predictions=ranked[:, 0].clone(),
        ranked=ranked,
        top1=top1,
        top5=top5,
        weight_decay=chosen,
        sweep=sweep,
        classifier=final.to_linear(),
        num_classes=num_classes,
        iterations=final.iterations,
        converged=final.converged,
        holdout_size=holdout_size,
        notes=notes,
    )
