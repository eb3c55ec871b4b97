"""Weighted kNN and the linear probe against references written here, on synthetic features."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mec_hub.evaluation.inputs import InvalidFeaturesError
from mec_hub.evaluation.knn import knn_classify
from mec_hub.evaluation.linear import linear_probe, stratified_holdout


def clusters(num_classes: int, per_class: int, dim: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim))
    labels = np.repeat(np.arange(num_classes), per_class)
    features = centres[labels] + spread * rng.normal(size=(len(labels), dim))
    order = rng.permutation(len(labels))
    return features[order].astype(np.float32), labels[order]


def brute_force_knn(train, train_labels, queries, k, temperature, num_classes):
    """DINO's vote, one query and one neighbour at a time, in float64."""
    train = np.asarray(train, dtype=np.float64)
    queries = np.asarray(queries, dtype=np.float64)
    ranked = []
    for q in queries:
        q = q / math.sqrt(sum(v * v for v in q))
        sims = [float(np.dot(q, t / np.linalg.norm(t))) for t in train]
        nearest = sorted(range(len(train)), key=lambda j: -sims[j])[:k]
        votes = [0.0] * num_classes
        for j in nearest:
            votes[int(train_labels[j])] += math.exp(sims[j] / temperature)
        ranked.append(sorted(range(num_classes), key=lambda c: (-votes[c], c)))
    return np.array(ranked)


def test_knn_recovers_separable_labels():
    train, train_y = clusters(4, 20, 16, spread=0.05, seed=0)
    query, query_y = clusters(4, 10, 16, spread=0.05, seed=0)  # same centres, fresh noise
    result = knn_classify(torch.from_numpy(train), torch.from_numpy(train_y), torch.from_numpy(query),
                          torch.from_numpy(query_y), k=5)
    assert result.top1 == 100.0 and result.top5 == 100.0
    assert result.predictions.dtype == torch.int64
    assert np.array_equal(result.predictions.numpy(), query_y)


@pytest.mark.parametrize(("k", "temperature", "chunk_size"), [(20, 0.07, None), (7, 0.5, 3), (1, 0.07, 1)])
def test_knn_matches_brute_force(k, temperature, chunk_size):
    rng = np.random.default_rng(1)
    train = rng.normal(size=(60, 8)).astype(np.float32)
    train_y = rng.integers(0, 7, size=60)
    query = rng.normal(size=(25, 8)).astype(np.float32)
    query_y = rng.integers(0, 7, size=25)

    result = knn_classify(train, train_y, query, query_y, k=k, temperature=temperature, chunk_size=chunk_size)

    ranked = brute_force_knn(train, train_y, query, k, temperature, 7)
    assert np.array_equal(result.predictions.numpy(), ranked[:, 0])
    top = min(5, k)  # DINO's top-5 looks no further than the classes k neighbours can vote for
    assert np.array_equal(result.ranked.numpy(), ranked[:, :top])
    assert result.top1 == pytest.approx(100.0 * np.mean(ranked[:, 0] == query_y))
    assert result.top5 == pytest.approx(100.0 * np.mean([y in r[:top] for y, r in zip(query_y, ranked, strict=True)]))
    assert 0 < result.top1 < 100  # the reference is exercised on a non-trivial problem


def test_knn_small_temperature_does_not_overflow():
    train, train_y = clusters(3, 10, 8, spread=0.3, seed=2)
    result = knn_classify(train, train_y, train[:5], train_y[:5], k=10, temperature=1e-3)
    # exp(s / 1e-3) overflows float32; the ranking it defines is still the one of the nearest neighbour.
    assert np.array_equal(result.predictions.numpy(), train_y[:5])


def test_knn_without_query_labels_and_k_above_n():
    train, train_y = clusters(2, 3, 4, spread=0.01, seed=3)
    with pytest.warns(UserWarning, match="using k=6"):
        result = knn_classify(train, train_y, train, k=50)
    assert result.k == 6 and result.top1 is None and result.top5 is None
    assert result.predictions.shape == (6,)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_labels": np.zeros(9, dtype=int)}, "train labels has 9 labels but train features has 10 rows"),
        ({"query_features": np.zeros((4, 5), np.float32)}, "3 dimensions"),
        ({"train_features": np.zeros(10, np.float32)}, "2-D"),
        ({"train_labels": -np.ones(10, dtype=int)}, "negative"),
        ({"train_labels": np.full(10, 0.5)}, "integer"),
        ({"train_features": np.full((10, 3), np.nan, np.float32)}, "NaN"),
    ],
)
def test_knn_rejects_bad_input(kwargs, message):
    args = {
        "train_features": np.ones((10, 3), np.float32),
        "train_labels": np.zeros(10, dtype=int),
        "query_features": np.ones((4, 3), np.float32),
    }
    args.update(kwargs)
    with pytest.raises(InvalidFeaturesError, match=message):
        knn_classify(args["train_features"], args["train_labels"], args["query_features"])


def test_linear_probe_recovers_separable_labels():
    train, train_y = clusters(5, 20, 12, spread=0.1, seed=4)
    val, val_y = clusters(5, 8, 12, spread=0.1, seed=4)
    result = linear_probe(train, train_y, val, val_y, seed=0)
    assert result.top1 == 100.0 and result.top5 == 100.0
    assert np.array_equal(result.predictions.numpy(), val_y)
    assert set(result.sweep) == {1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0}
    assert result.holdout_size == 20  # 20% of each class of 20


def test_linear_probe_solves_its_objective():
    """At the returned classifier the gradient of the documented objective vanishes (checked in numpy)."""
    train, train_y = clusters(4, 30, 10, spread=1.5, seed=5)
    train = train * np.linspace(0.1, 10, 10, dtype=np.float32) + 3.0  # unequal scales: standardisation matters
    wd = 0.05
    result = linear_probe(train, train_y, train, train_y, weight_decays=[wd])
    assert result.converged and result.sweep == {} and result.weight_decay == wd

    x = train.astype(np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0)
    xs = (x - mean) / std
    w_raw = result.classifier.weight.detach().double().numpy()
    b_raw = result.classifier.bias.detach().double().numpy()
    w, b = w_raw * std, b_raw + w_raw @ mean  # the same map, in standardised coordinates
    logits = xs @ w.T + b
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(train_y)), train_y] -= 1.0
    grad_w = p.T @ xs / len(train_y) + wd * w
    grad_b = p.mean(axis=0)
    assert np.abs(grad_w).max() < 1e-4 and np.abs(grad_b).max() < 1e-4
    assert np.array_equal(result.predictions.numpy(), (x @ w_raw.T + b_raw).argmax(axis=1))
    assert 50 < result.top1 < 100


def test_linear_probe_is_deterministic():
    train, train_y = clusters(3, 15, 6, spread=1.0, seed=6)
    val, val_y = clusters(3, 5, 6, spread=1.0, seed=7)
    first = linear_probe(train, train_y, val, val_y, seed=3, weight_decays=[1e-3, 1e-1])
    second = linear_probe(torch.from_numpy(train), torch.from_numpy(train_y), val, val_y, seed=3,
                          weight_decays=[1e-3, 1e-1])
    assert torch.equal(first.classifier.weight, second.classifier.weight)
    assert first.sweep == second.sweep and first.top1 == second.top1


def test_stratified_holdout():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 1)
    fit, held = stratified_holdout(labels, 0.2, seed=0)
    assert sorted(fit.tolist() + held.tolist()) == list(range(16))
    assert torch.bincount(labels[held], minlength=3).tolist() == [2, 1, 0]
    again, _ = stratified_holdout(labels, 0.2, seed=0)
    assert torch.equal(fit, again)


def test_linear_probe_rejects_mismatched_labels():
    with pytest.raises(InvalidFeaturesError, match="validation labels has 3 labels but validation features has 4"):
        linear_probe(np.ones((6, 2)), np.arange(6) % 2, np.ones((4, 2)), np.zeros(3, dtype=int))
