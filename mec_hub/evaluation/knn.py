"""Weighted k-nearest-neighbour classification of frozen features (DINO's protocol).

Caron et al., Emerging Properties in Self-Supervised Vision Transformers (DINO), ICCV 2021,
after Wu et al. 2018: features are L2-normalised, each query takes its ``k`` most cosine-similar
training features, neighbour ``j`` votes for its class with weight ``exp(s_j / T)``, and the class
with the largest summed vote wins. Defaults are the paper's (``k=20``, ``T=0.07``).

Example::

    >>> result = knn_classify(train.features, train.labels, val.features, val.labels)
    >>> result.top1, result.top5
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mec_hub.evaluation.inputs import (
    InvalidFeaturesError,
    labelled_pair,
    rank_classes,
    topk_accuracy,
)

# Similarity block of one query chunk, in elements: 2**25 float32 = 128 MiB.
_SIMILARITY_BUDGET = 1 << 25


@dataclass(frozen=True)
class KnnResult:
    """``predictions``: int64 ``(Q,)`` class per query; ``ranked``: int64 ``(Q, min(5, k, C))`` classes by vote.

    ``top1``/``top5`` are percentages (``None`` without query labels); as in DINO, ``top5`` counts
    a hit among the first ``min(5, k)`` classes (with fewer neighbours, the other classes got no
    vote). ``k`` is the number of neighbours actually used (at most the number of training features).
    """

    predictions: torch.Tensor
    ranked: torch.Tensor
    top1: float | None
    top5: float | None
    k: int
    temperature: float
    num_classes: int

    @property
    def num_queries(self) -> int:
        return int(self.predictions.shape[0])


def knn_classify(
    train_features: Any,
    train_labels: Any,
    query_features: Any,
    query_labels: Any = None,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int | None = None,
) -> KnnResult:
    """Classify ``query_features`` (Q, D) by a weighted vote of their ``k`` nearest ``train_features`` (N, D).

    Inputs may be torch tensors or numpy arrays; the work runs on the device of
    ``train_features``. Queries are processed ``chunk_size`` at a time (default: as many as keep
    the ``chunk x N`` similarity block near 128 MiB), so memory does not grow with ``Q``.
    Votes use ``exp((s - s_max) / T)`` with ``s_max`` the query's best similarity: the same
    ranking as ``exp(s / T)``, without overflow at small temperatures. Ties go to the smaller class
    index. ``num_classes`` defaults to one more than the largest label seen.
    """
    if k < 1:
        raise InvalidFeaturesError(f"k must be at least 1, got {k}")
    if not temperature > 0:
        raise InvalidFeaturesError(f"temperature must be positive, got {temperature}")
    train, labels, queries, targets, num_classes = labelled_pair(
        train_features, train_labels, query_features, query_labels, num_classes, query_name="query"
    )
    if k > train.shape[0]:
        warnings.warn(f"k={k} is more than the {train.shape[0]} training features; using k={train.shape[0]}",
                      stacklevel=2)
        k = train.shape[0]

    device = train.device
    train = F.normalize(train, dim=1)
    labels = labels.to(device)
    if chunk_size is None:
        chunk_size = max(1, _SIMILARITY_BUDGET // train.shape[0])
    if chunk_size < 1:
        raise InvalidFeaturesError(f"chunk_size must be at least 1, got {chunk_size}")
    num_ranked = min(5, k, num_classes)

    predictions, ranked = [], []
    for start in range(0, queries.shape[0], chunk_size):
        chunk = F.normalize(queries[start : start + chunk_size].to(device), dim=1)
        similarity = chunk @ train.T
        top_similarity, top_index = similarity.topk(k, dim=1)
        weights = ((top_similarity - top_similarity[:, :1]) / temperature).exp()
        votes = torch.zeros(chunk.shape[0], num_classes, device=device, dtype=weights.dtype)
        votes.scatter_add_(1, labels[top_index], weights)
        order = rank_classes(votes, num_ranked)
        ranked.append(order.cpu())
        predictions.append(order[:, 0].cpu())

    ranked_all = torch.cat(ranked)
    top1 = top5 = None
    if targets is not None:
        top1 = topk_accuracy(ranked_all, targets, 1)
        top5 = topk_accuracy(ranked_all, targets, num_ranked)
    return KnnResult(
        predictions=torch.cat(predictions),
        ranked=ranked_all,
        top1=top1,
        top5=top5,
        k=k,
        temperature=float(temperature),
        num_classes=num_classes,
    )
