"""Checks shared by the evaluation functions: features and labels that fit together, or a clear error."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mec_hub.errors import MecHubError


class InvalidFeaturesError(MecHubError, ValueError):
    """Features or labels that cannot be evaluated: wrong shape, mismatched lengths, bad label values."""


def as_feature_matrix(features: Any, *, what: str) -> torch.Tensor:
    """A float32 ``(N, D)`` tensor (on the input's device) from a tensor or array-like."""
    tensor = features if isinstance(features, torch.Tensor) else torch.from_numpy(np.asarray(features))
    if tensor.ndim != 2:
        raise InvalidFeaturesError(f"{what} must be a 2-D (N, D) array, got shape {tuple(tensor.shape)}")
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise InvalidFeaturesError(f"{what} is empty (shape {tuple(tensor.shape)})")
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise InvalidFeaturesError(f"{what} must hold numbers, got dtype {tensor.dtype}")
    tensor = tensor.float()
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).any(dim=1).sum())
        raise InvalidFeaturesError(f"{what} has {bad} rows with NaN or infinite values")
    return tensor


def as_label_vector(labels: Any, *, what: str, length: int, length_of: str) -> torch.Tensor:
    """An int64 ``(N,)`` tensor of non-negative class indices, ``N == length``."""
    tensor = labels if isinstance(labels, torch.Tensor) else torch.from_numpy(np.asarray(labels))
    if tensor.ndim == 2 and tensor.shape[1] == 1:
        tensor = tensor[:, 0]
    if tensor.ndim != 1:
        raise InvalidFeaturesError(
            f"{what} must be a 1-D vector of class indices, got shape {tuple(tensor.shape)}"
        )
    if tensor.is_floating_point():
        if not bool((tensor == tensor.round()).all()):
            raise InvalidFeaturesError(f"{what} must hold integer class indices, got fractional values")
    elif tensor.dtype == torch.bool or tensor.is_complex():
        raise InvalidFeaturesError(f"{what} must hold integer class indices, got dtype {tensor.dtype}")
    tensor = tensor.long()
    if tensor.shape[0] != length:
        raise InvalidFeaturesError(
            f"{what} has {tensor.shape[0]} labels but {length_of} has {length} rows; "
            "they must match one to one"
        )
    if length and int(tensor.min()) < 0:
        raise InvalidFeaturesError(f"{what} has negative class indices (min {int(tensor.min())})")
    return tensor


def resolve_num_classes(num_classes: int | None, *labels: torch.Tensor | None) -> int:
    """``num_classes`` if given (checked against the labels), else one more than the largest label."""
    largest = max((int(t.max()) for t in labels if t is not None and t.numel()), default=-1)
    if num_classes is None:
        return largest + 1
    if num_classes < 1:
        raise InvalidFeaturesError(f"num_classes must be positive, got {num_classes}")
    if largest >= num_classes:
        raise InvalidFeaturesError(f"label {largest} is out of range for num_classes={num_classes}")
    return num_classes


def check_same_dim(a: torch.Tensor, b: torch.Tensor, *, what_a: str, what_b: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise InvalidFeaturesError(
            f"{what_a} has {a.shape[1]} dimensions but {what_b} has {b.shape[1]}; "
            "they must come from the same model and head"
        )


def labelled_pair(
    train_features: Any,
    train_labels: Any,
    query_features: Any,
    query_labels: Any | None,
    num_classes: int | None,
    *,
    query_name: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """Checked ``(train, train_labels, queries, query_labels or None, num_classes)`` of a protocol's inputs."""
    train = as_feature_matrix(train_features, what="train features")
    queries = as_feature_matrix(query_features, what=f"{query_name} features")
    check_same_dim(train, queries, what_a="train features", what_b=f"{query_name} features")
    labels = as_label_vector(train_labels, what="train labels", length=train.shape[0], length_of="train features")
    targets = None
    if query_labels is not None:
        targets = as_label_vector(
            query_labels, what=f"{query_name} labels", length=queries.shape[0], length_of=f"{query_name} features"
        )
    return train, labels, queries, targets, resolve_num_classes(num_classes, labels, targets)


def rank_classes(scores: torch.Tensor, most: int) -> torch.Tensor:
    """``(N, min(most, C))`` class indices of ``(N, C)`` scores, best first; ties go to the lower class index."""
    return scores.argsort(dim=1, descending=True, stable=True)[:, : min(most, scores.shape[1])]


def topk_hits(ranked: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """How many rows have their label among the first ``k`` columns of ``ranked`` (classes, best first)."""
    return int((ranked[:, :k] == labels[:, None].to(ranked.device)).any(dim=1).sum())


def topk_accuracy(ranked: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Percent of rows whose label is among the first ``k`` columns of ``ranked`` (classes, best first)."""
    return 100.0 * topk_hits(ranked, labels, k) / len(labels)
