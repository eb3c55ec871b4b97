"""Exact cosine search of query images against a feature file written by ``mec-embed``.

A feature file (``mec_hub.data.featurefile``) is ``FEATS.npy`` (``(N, D)``) with
``FEATS.paths.txt`` (row ``i`` = the image of row ``i``) and ``FEATS.meta.json`` (which model,
weights SHA-256, head and preprocessing made it). Queries are embedded with that same model,
after checking that the weights loaded now are byte-identical (SHA-256) to those that made the
file. The file is read through a memory map, one block of rows at a time, so memory stays
bounded however many rows it holds.

Example::

    >>> index = FeatureFile.open("photos.npy")
    >>> for hits in search(index, ["query.jpg"], top_k=5):
    ...     print([(h.rank, round(h.score, 3), h.path) for h in hits])
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mec_hub.data.featurefile import META_SUFFIX, FeatureFile, FeatureMeta, sidecar
from mec_hub.errors import MalformedFileError, MecHubError

# Elements of one block of feature rows or similarities: 2**23 float32 = 32 MiB.
_BLOCK_BUDGET = 1 << 23


class WeightsMismatchError(MecHubError):
    """The model that would embed the queries is not the one that made the feature file."""


@dataclass(frozen=True)
class Neighbour:
    """One search result: ``rank`` from 1, ``row`` of the feature file, cosine ``score``.

    ``path`` is the row's path as recorded in ``FEATS.paths.txt``; ``resolved`` is that image
    on this machine (``None`` when it cannot be found).
    """

    rank: int
    row: int
    score: float
    path: str
    resolved: Path | None


class NonFiniteRowsError(MalformedFileError):
    """Feature rows or query vectors holding NaN or infinite values: cosine similarity is undefined for them."""


#: How many offending row numbers a ``NonFiniteRowsError`` lists before saying how many more there are.
SHOWN_ROWS = 5


class NonFiniteRows:
    """Collects, block by block, the rows holding NaN or infinite values; ``check`` raises one error naming them.

    Memory: the first ``SHOWN_ROWS`` row numbers and a count, whatever the number of rows scanned.
    """

    def __init__(self) -> None:
        self.first: list[int] = []
        self.count = 0

    def add(self, block: np.ndarray, start: int = 0) -> None:
        """Note the non-finite rows of ``block``, whose first row is row ``start`` of the whole."""
        bad = np.flatnonzero(~np.isfinite(block).all(axis=tuple(range(1, block.ndim))))
        if len(bad):
            self.first += (bad[: SHOWN_ROWS - len(self.first)] + start).tolist()
            self.count += len(bad)

    def check(self, origin: str, what: str = "row") -> None:
        if not self.count:
            return
        shown = ", ".join(map(str, self.first))
        if self.count == 1:
            told = f"{what} {shown} holds NaN or infinite values"
        else:
            more = f" and {self.count - len(self.first)} more" if self.count > len(self.first) else ""
            told = f"{what}s {shown}{more} hold NaN or infinite values ({self.count} {what}s in all)"
        raise NonFiniteRowsError(
            f"{origin}: {told}; cosine similarity is undefined for them: remove them or compute them again"
        )


def refuse_non_finite(
    matrix: np.ndarray, origin: str, *, what: str = "row", block_rows: int | None = None
) -> None:
    """Raise ``NonFiniteRowsError`` naming the rows of ``matrix`` that hold NaN or infinite values.

    Read ``block_rows`` rows at a time (default: blocks of about 32 MiB), so a memory-mapped file
    of any size is never copied whole.
    """
    matrix = np.asarray(matrix) if not isinstance(matrix, np.ndarray) else matrix
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    width = int(np.prod(matrix.shape[1:])) if matrix.ndim > 1 else 1
    block_rows = block_rows or max(1, _BLOCK_BUDGET // max(width, 1))
    found = NonFiniteRows()
    for start in range(0, len(matrix), block_rows):
        found.add(np.asarray(matrix[start : start + block_rows]), start)
    found.check(origin, what)


def normalise_rows(block: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as contiguous float32 (a zero row stays zero).

    Norms are taken in float64, so large finite values do not overflow to a zero row. Rows must
    be finite (``refuse_non_finite``): a NaN row stays NaN rather than quietly becoming zero.
    """
    block = np.asarray(block)
    wide = block.astype(np.float64, copy=False)
    norms = np.linalg.norm(wide, axis=-1, keepdims=True)
    return np.ascontiguousarray(wide / np.maximum(norms, 1e-12), dtype=np.float32)


def cosine_top_k(
    matrix: np.ndarray, queries: np.ndarray, k: int, *, chunk_rows: int | None = None, origin: str = "the feature file"
) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, rows)``, each ``(Q, min(k, N))``: the ``k`` rows of ``matrix`` most cosine-similar to each query.

    Exact. ``matrix`` (``(N, D)``, e.g. a memory map) is read ``chunk_rows`` rows at a time
    (default: blocks of about 32 MiB); rows are L2-normalised on the fly, so the file need not be.
    Results are sorted by decreasing similarity, equal similarities by increasing row. Queries or
    rows holding NaN or infinite values are refused (``NonFiniteRowsError``, naming them and
    ``origin``), the rows as the blocks are read.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    num_rows, dim = matrix.shape
    queries = np.asarray(queries)
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise MecHubError(f"queries have shape {queries.shape}; the feature file has {dim} dimensions")
    refuse_non_finite(queries, "the query vectors", what="query")
    queries = normalise_rows(queries)
    non_finite = NonFiniteRows()
    k = min(k, num_rows)
    if chunk_rows is None:
        chunk_rows = max(k, _BLOCK_BUDGET // max(dim, len(queries), 1))
    best_scores = np.empty((len(queries), 0), dtype=np.float32)
    best_rows = np.empty((len(queries), 0), dtype=np.int64)
    for start in range(0, num_rows, chunk_rows):
        raw = np.asarray(matrix[start : start + chunk_rows])
        non_finite.add(raw, start)
        if non_finite.count:  # refused once the scan is over; only the rows at fault are looked for now
            continue
        block = normalise_rows(raw)
        similarity = queries @ block.T  # (Q, rows in block)
        scores = np.concatenate([best_scores, similarity], axis=1)
        block_rows = np.broadcast_to(np.arange(start, start + len(block)), similarity.shape)
        rows = np.concatenate([best_rows, block_rows], axis=1)
        # Keep every candidate tied with the k-th best, then order by (score desc, row asc).
        kept = min(k, scores.shape[1])
        kth = -np.partition(-scores, kept - 1, axis=1)[:, kept - 1 : kept]
        next_scores, next_rows = [], []
        for q in range(len(queries)):
            keep = np.flatnonzero(scores[q] >= kth[q])
            order = np.lexsort((rows[q, keep], -scores[q, keep]))[:kept]
            next_scores.append(scores[q, keep[order]])
            next_rows.append(rows[q, keep[order]])
        best_scores, best_rows = np.stack(next_scores), np.stack(next_rows)
    non_finite.check(origin)
    return best_scores, best_rows


def load_query_embedder(meta: FeatureMeta, *, weights: str | None = None, device: str = "cpu") -> Any:
    """An object with ``.embed(paths) -> (Q, D) array`` and ``.weights_sha256``, rebuilt from ``meta``.

    ``weights`` overrides where the weights are loaded from (they must still be the same bytes).
    """
    # Deferred: torch and the model stack (3.2 s against 0.1 s, measured 2026-12-05 on the 2-core VM)
    # load only for queries that are images; a search by row or vector never needs them.
    from mec_hub.embedding.engine import Embedder, ModelMismatchError

    if weights is not None:
        meta = dataclasses.replace(meta, weights=weights)
    try:
        return Embedder.from_meta(meta, device=device)
    except ModelMismatchError as exc:
        raise WeightsMismatchError(
            f"{exc}; pass weights= pointing to the original weights, or embed the images again",
            arguments=("weights",),
        ) from None
    except (ValueError, TypeError) as exc:  # a meta file whose fields the embedder does not accept
        raise MecHubError(f"cannot rebuild the model recorded in the metadata: {exc}") from None


def check_same_weights(meta: FeatureMeta, actual: str | None, *, origin: str) -> None:
    expected = meta.weights_sha256
    where = meta.weights or meta.model
    if expected is None:
        if meta.state_dict_sha256:
            return  # weights without a file digest: the embedder compared the state_dict digest
        warnings.warn(
            f"{origin} records no weights SHA-256, so the query model cannot be checked against the one "
            "that made the file",
            stacklevel=2,
        )
        return
    if actual != expected:
        raise WeightsMismatchError(
            f"{origin} was made with weights sha256 {expected}, but {where!r} now loads "
            f"{actual or 'weights with no known digest'}; query features would not be comparable. "
            "Pass weights= pointing to the original weights, or embed the images again.",
            arguments=("weights",),
        )


def search(
    index: FeatureFile,
    queries: Sequence[str | os.PathLike[str]],
    *,
    top_k: int = 5,
    weights: str | None = None,
    device: str = "cpu",
    chunk_rows: int | None = None,
    feature_index: Any = None,
    exclude_self: bool = False,
) -> list[list[Neighbour]]:
    """For each query image, its ``top_k`` nearest rows of ``index`` by cosine similarity.

    With ``feature_index`` (a ``mec_hub.apps.index.FeatureIndex`` of the same file) the search
    goes through it; otherwise it is exact. ``exclude_self`` leaves out the row of the query
    image itself when the file holds it.
    """
    missing = [str(q) for q in queries if not Path(q).is_file()]
    if missing:
        raise MecHubError(f"query image not found: {', '.join(missing)}")
    meta_file = sidecar(index.path, META_SUFFIX)
    if index.meta is None:
        raise MecHubError(f"{index.path}: no {meta_file.name} beside it, so the model that made it is unknown")
    embedder = load_query_embedder(index.meta, weights=weights, device=device)
    check_same_weights(index.meta, embedder.weights_sha256, origin=str(meta_file))
    query_features = np.asarray(embedder.embed([str(q) for q in queries]), dtype=np.float32)
    if query_features.shape != (len(queries), index.matrix.shape[1]):
        raise MecHubError(
            f"the query model gives {query_features.shape[-1]}-d features, but {index.path} has "
            f"{index.matrix.shape[1]} dimensions (different head?)"
        )
    refuse_non_finite(query_features, "the features of the query images", what="query")
    excluded = None
    if exclude_self:
        excluded = [lambda n, q=Path(q): n.resolved is not None and _same_file(n.resolved, q) for q in queries]
    return nearest(
        index, query_features, top_k=top_k, feature_index=feature_index, chunk_rows=chunk_rows, excluded=excluded
    )


def search_rows(
    index: FeatureFile,
    rows: Sequence[int],
    *,
    top_k: int = 5,
    feature_index: Any = None,
    exclude_self: bool = False,
    chunk_rows: int | None = None,
) -> list[list[Neighbour]]:
    """For each row of ``index`` given, its ``top_k`` nearest rows (``exclude_self``: other than itself)."""
    bad = [r for r in rows if not 0 <= r < len(index.matrix)]
    if bad:
        raise MecHubError(
            f"rows= has {bad[0]}, but {index.path} has rows 0 to {len(index.matrix) - 1}", arguments=("rows",)
        )
    query_features = np.asarray(index.matrix[list(rows)], dtype=np.float32)
    non_finite = NonFiniteRows()
    non_finite.add(query_features)
    non_finite.first = [int(rows[i]) for i in non_finite.first]  # positions in ``rows`` -> rows of the file
    non_finite.check(str(index.path))
    excluded = [lambda n, r=r: n.row == r for r in rows] if exclude_self else None
    return nearest(
        index, query_features, top_k=top_k, feature_index=feature_index, chunk_rows=chunk_rows, excluded=excluded
    )


def nearest(
    index: FeatureFile,
    query_features: np.ndarray,
    *,
    top_k: int,
    feature_index: Any = None,
    chunk_rows: int | None = None,
    excluded: Sequence[Callable[[Neighbour], bool]] | None = None,
) -> list[list[Neighbour]]:
    """The ``top_k`` rows nearest each query: by ``feature_index`` (a ``FeatureIndex``) if given, else exactly.

    ``excluded[q]`` tells the neighbours of query ``q`` to leave out (one more is fetched for it).
    """
    k = top_k + (1 if excluded else 0)
    if feature_index is not None:
        scores, rows = feature_index.search(query_features, k)
    else:
        scores, rows = cosine_top_k(index.matrix, query_features, k, chunk_rows=chunk_rows, origin=str(index.path))
    results = []
    for q in range(len(query_features)):
        hits: list[Neighbour] = []
        for score, row in zip(scores[q], rows[q], strict=True):
            if row < 0 or len(hits) == top_k:
                continue
            hit = Neighbour(
                rank=len(hits) + 1,
                row=int(row),
                score=float(score),
                path=index.paths[int(row)],
                resolved=index.resolve(int(row)),
            )
            if excluded is None or not excluded[q](hit):
                hits.append(hit)
        results.append(hits)
    return results


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
