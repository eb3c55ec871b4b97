"""Defaults that are easy to change by accident: kNN's k=20, T=0.07 and coding_length's gram="auto" side."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mec_hub.evaluation.knn import knn_classify
from mec_hub.models.losses import coding_length

# --------------------------------------------------------------------------------------------
# knn_classify: DINO's k=20, T=0.07


def reference_knn(
    train: np.ndarray, train_labels: np.ndarray, queries: np.ndarray, k: int, temperature: float, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """DINO's weighted vote in float64: ``(votes (Q, C), classes ranked by vote (Q, C))``, ties to the smaller class."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    votes = np.zeros((len(queries), num_classes))
    for row, query in enumerate(queries):
        sims = train @ (query / np.linalg.norm(query))
        for j in np.argsort(-sims, kind="stable")[:k]:
            votes[row, train_labels[j]] += math.exp(sims[j] / temperature)
    ranked = np.array([sorted(range(num_classes), key=lambda c, v=v: (-v[c], c)) for v in votes])
    return votes, ranked


def knn_probe() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Two queries whose vote order changes if one neighbour fewer is used, or if T is 1 instead of 0.07.

    Every training point gets its own extra dimension, so its cosine similarity to the queries
    ``e0`` and ``e1`` is exactly the one chosen here.

    * Query ``e0``: 10 class-0 neighbours at 0.9000-0.9009 and 9 class-1 ones at 0.9010-0.9018
      (the votes are nearly flat), the 20th nearest is class 1 at 0.8995 and the 21st class 0: with
      20 neighbours class 1 wins; with 19 (or 21) class 0 does.
    * Query ``e1``: one class-0 neighbour at 0.99, three class-1 ones at 0.90 and 16 class-2 ones near
      0.3: at T=0.07 the close neighbour outvotes the three (exp(0.09/0.07) > 3); at T=1 the many
      far ones win.
    """
    sims_a = [0.9000 + 0.0001 * i for i in range(10)] + [0.9010 + 0.0001 * i for i in range(9)] + [0.8995, 0.8990]
    labels_a = [0] * 10 + [1] * 9 + [1, 0]
    sims_b = [0.99, 0.900, 0.901, 0.902] + [0.30 + 0.001 * i for i in range(16)]
    labels_b = [0, 1, 1, 1] + [2] * 16
    rows = [(s, 0.0) for s in sims_a] + [(0.0, s) for s in sims_b]
    dim = 2 + len(rows)
    train = np.zeros((len(rows), dim))
    for i, (on_a, on_b) in enumerate(rows):
        train[i, 0], train[i, 1] = on_a, on_b
        train[i, 2 + i] = math.sqrt(1.0 - on_a**2 - on_b**2)
    queries = np.zeros((2, dim))
    queries[0, 0] = queries[1, 1] = 1.0
    return train.astype(np.float32), np.array(labels_a + labels_b), queries.astype(np.float32), np.array([1, 0])


def test_knn_defaults_are_dinos_k20_and_t007():
    train, train_y, queries, query_y = knn_probe()
    votes, ranked = reference_knn(train, train_y, queries, k=20, temperature=0.07, num_classes=3)
    assert ranked.tolist() == [[1, 0, 2], [0, 1, 2]]
    # The probe tells the defaults apart from the likely slips (else this test could not fail).
    for k, temperature in ((19, 0.07), (21, 0.07), (20, 1.0), (20, 0.1)):
        other = reference_knn(train, train_y, queries, k=k, temperature=temperature, num_classes=3)[1]
        assert (other[:, 0] != ranked[:, 0]).any(), (k, temperature)

    result = knn_classify(train, train_y, queries, query_y)  # no k, no temperature

    assert result.ranked.tolist() == ranked.tolist()  # every class in vote order, not just the winner
    assert result.predictions.tolist() == [1, 0] == votes.argmax(axis=1).tolist()
    assert result.top1 == 100.0 and result.top5 == 100.0
    assert (result.k, result.temperature, result.num_classes) == (20, 0.07, 3)


# --------------------------------------------------------------------------------------------
# coding_length: gram="auto" works on the smaller of the m x m and d x d matrices


class MatrixShapes(TorchDispatchMode):
    """Records the shape of every matrix product and log-determinant input computed under it."""

    WATCHED = ("aten.mm", "aten.matmul", "aten.bmm", "aten.addmm", "aten._linalg_slogdet", "aten.linalg_slogdet")

    def __init__(self) -> None:
        super().__init__()
        self.products: list[tuple[int, ...]] = []
        self.logdets: list[tuple[int, ...]] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        if "slogdet" in name:
            self.logdets.append(tuple(args[0].shape))
        elif name in self.WATCHED:
            self.products.append(tuple(out.shape))
        return out


@pytest.mark.parametrize(("m", "d"), [(8, 40), (40, 8)])
@pytest.mark.parametrize("order", [4, None])
def test_auto_gram_forms_the_smaller_matrix(m: int, d: int, order: int | None):
    small, large = min(m, d), max(m, d)
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(m, d, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(m, d, generator=g, dtype=torch.float64, requires_grad=True)
    lamda = 0.5 / math.sqrt(m * d)  # ||C|| well below 1: the series converges and the logdet is real

    with MatrixShapes() as recorded:
        value = coding_length(z1, z2, lamda, order)  # gram="auto"
        value.backward()

    square = {s for s in recorded.products if len(s) == 2 and s[0] == s[1]}
    assert square == {(small, small)}, recorded.products  # the Gram matrix and its powers
    assert (large, large) not in recorded.products
    if order is None:
        assert recorded.logdets == [(small, small)]
    # The same value as the other side: auto chose a side, it did not change the quantity.
    other = "features" if m < d else "samples"
    torch.testing.assert_close(value, coding_length(z1.detach(), z2.detach(), lamda, order, gram=other))
