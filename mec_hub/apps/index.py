"""A FAISS index over a feature file: cosine search that does not scan every row.

``FeatureIndex.build(features)`` reads an ``(N, D)`` float array (a ``.npy`` path, memory-mapped,
or an array), L2-normalises its rows once, block by block, and adds them to a FAISS index searched
by inner product (= cosine). ``kind="auto"`` keeps exact search (``IndexFlatIP``) below
``exact_below`` rows; above it, an IVF index (``nlist`` about ``4 * sqrt(N)`` lists, trained on a
sample) whose ``nprobe`` is raised until the recall@10 measured on a sample of the file's own rows,
against exact search, reaches ``recall`` (exact search when no ``nprobe`` does).

``save(path)`` writes the FAISS file and ``PATH.json`` beside it: the kind, its parameters, the
measured recall, the row count and the SHA-256 of the ``.npy`` it was built from, so that
``FeatureIndex.load(path, features=FEATS.npy)`` refuses an index built from another file.

FAISS (``faiss-cpu``) is an optional dependency: ``pip install 'mec-hub[index]'``.

Example::

    >>> index = FeatureIndex.build("photos.npy", recall=0.95)
    >>> index.save("photos.index")
    >>> scores, rows = FeatureIndex.load("photos.index", features="photos.npy").search(queries, k=10)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mec_hub.data.featurefile import FeatureFile, open_matrix, parquet_shards
from mec_hub.errors import InvalidArgumentError, MecHubError
from mec_hub.fileio import atomic_write, atomic_write_json
from mec_hub.weights.integrity import sha256_file

KINDS = ("auto", "flat", "ivf", "hnsw")
INDEX_SUFFIX = ".index"
INFO_SUFFIX = ".json"  # FEATS.index -> FEATS.index.json
FORMAT = "mec-hub-index"
RECALL_K = 10  # recall@10 is what --recall asks for
_BLOCK_BUDGET = 1 << 23  # elements of one block of rows read from the file: 32 MiB of float32
_SIMILARITY_BUDGET = 1 << 22  # elements of one (queries, rows) block of similarities: 16 MiB


class FaissMissingError(MecHubError, ImportError):
    """FAISS is not installed."""


class StaleIndexError(MecHubError):
    """An index built from another feature file than the one it is used with."""


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise FaissMissingError("the index needs FAISS, which is not installed: pip install 'mec-hub[index]'") from None
    return faiss


def default_index_path(features: str | os.PathLike[str]) -> Path:
    """``X.npy`` or ``X.parquet`` -> ``X.index`` (another name gets ``.index`` appended)."""
    path = Path(features)
    stem = path.name
    for suffix in (".npy", ".parquet"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return path.with_name(stem + INDEX_SUFFIX)


def source_sha256(features: str | os.PathLike[str]) -> str:
    """SHA-256 of the feature file; for Parquet shards ``X-NNNNN.parquet``, of their names and digests in order."""
    path = Path(features)
    if path.is_file():
        return sha256_file(path)
    shards = parquet_shards(path) if path.suffix == ".parquet" else []
    if not shards:
        raise MecHubError(f"feature file not found: {path}")
    digest = hashlib.sha256()
    for shard in shards:
        digest.update(f"{shard.name} {sha256_file(shard)}\n".encode())
    return digest.hexdigest()


def info_path(index_path: str | os.PathLike[str]) -> Path:
    path = Path(index_path)
    return path.with_name(path.name + INFO_SUFFIX)


def open_features(features: str | os.PathLike[str]) -> np.ndarray:
    """The ``(N, D)`` matrix of a feature file: a plain ``.npy`` memory-mapped, anything else via ``FeatureFile``."""
    path = Path(features)
    # A plain N x D .npy needs no side-cars here (the paths and meta matter only to image queries).
    matrix = open_matrix(path) if path.suffix == ".npy" else FeatureFile.open(path).matrix
    _check_matrix(matrix, str(path))
    return matrix


def _check_matrix(matrix: np.ndarray, origin: str) -> None:
    if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[1] == 0 or not np.issubdtype(matrix.dtype, np.number):
        raise MecHubError(f"{origin}: expected a non-empty (N, D) array of numbers, got {matrix.shape} {matrix.dtype}")


def normalise(block: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as contiguous float32 (a zero row stays zero)."""
    block = np.asarray(block, dtype=np.float32)
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    out = np.nan_to_num(block / np.maximum(norms, 1e-12), nan=0.0, posinf=0.0, neginf=0.0)
    return np.ascontiguousarray(out, dtype=np.float32)


def exact_top_k(matrix: np.ndarray, queries: np.ndarray, k: int, *, block_rows: int | None = None) -> np.ndarray:
    """Row numbers ``(Q, k)`` of the exact cosine top ``k`` (unordered within the ``k``), in blocks.

    Memory: one ``(Q, block)`` matrix of similarities, about 16 MiB, whatever the file's size.
    """
    queries = normalise(queries)
    k = min(k, len(matrix))
    block_rows = block_rows or max(k, _SIMILARITY_BUDGET // max(len(queries), 1), 1)
    best_scores = np.empty((len(queries), 0), dtype=np.float32)
    best_rows = np.empty((len(queries), 0), dtype=np.int64)
    for start in range(0, len(matrix), block_rows):
        similarity = queries @ normalise(matrix[start : start + block_rows]).T
        rows = _top(similarity, k) if similarity.shape[1] > k else np.indices(similarity.shape)[1]
        scores = np.concatenate([best_scores, np.take_along_axis(similarity, rows, axis=1)], axis=1)
        rows = np.concatenate([best_rows, rows + start], axis=1)
        keep = _top(scores, k) if scores.shape[1] > k else np.indices(scores.shape)[1]
        best_scores, best_rows = np.take_along_axis(scores, keep, axis=1), np.take_along_axis(rows, keep, axis=1)
    return best_rows


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argpartition(-scores, k - 1, axis=1)[:, :k]


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of ``|found ∩ truth| / k``."""
    k = truth.shape[1]
    return float(np.mean([len(np.intersect1d(f[:k], t)) / k for f, t in zip(found, truth, strict=True)]))


@dataclass
class FeatureIndex:
    """A FAISS index of L2-normalised rows, searched by inner product, and what it was built from."""

    index: Any
    kind: str
    params: dict[str, Any]
    recall: float | None
    rows: int
    dim: int
    source_sha256: str | None = None
    source: str | None = None
    build_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # ----------------------------------------------------------------- build

    @classmethod
    def build(
        cls,
        features: str | os.PathLike[str] | np.ndarray,
        *,
        kind: str = "auto",
        recall: float = 0.95,
        exact_below: int = 50_000,
        nlist: int | None = None,
        sample_queries: int = 1000,
        block_rows: int | None = None,
        seed: int = 0,
    ) -> FeatureIndex:
        """Index ``features`` (a ``.npy`` path or an ``(N, D)`` array); see the module docstring."""
        if kind not in KINDS:
            raise InvalidArgumentError(f"index kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if not 0.0 < recall <= 1.0:
            raise InvalidArgumentError(f"recall must be in (0, 1], got {recall}")
        faiss = import_faiss()
        started = time.perf_counter()
        digest = source = None
        if isinstance(features, (str, os.PathLike)):
            matrix = open_features(features)
            source, digest = str(features), source_sha256(features)
        else:
            matrix = np.asarray(features) if not isinstance(features, np.memmap) else features
            _check_matrix(matrix, "features")
        num_rows, dim = matrix.shape
        block_rows = block_rows or max(1, _BLOCK_BUDGET // dim)
        if kind == "auto":
            kind = "flat" if num_rows < exact_below else "ivf"
        rng = np.random.default_rng(seed)
        params: dict[str, Any] = {}
        measured: float | None = 1.0
        if kind != "flat" and num_rows <= 4 * RECALL_K:  # too few rows to train or to measure a recall on
            kind, params = "flat", {"fallback_from": kind}
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
            _add_in_blocks(index, matrix, block_rows)
        else:
            query_rows = np.sort(rng.choice(num_rows, size=min(sample_queries, num_rows), replace=False))
            sample = _RecallSample(matrix, query_rows)
            if kind == "ivf":
                index, params, measured = _build_ivf(faiss, matrix, sample, recall, nlist, rng, block_rows)
            else:
                index, params, measured = _build_hnsw(faiss, matrix, sample, recall, block_rows)
            if measured < recall:  # no setting reaches it: exact search
                kind, params, measured = "flat", {"fallback_from": kind, "best_recall": measured}, 1.0
                index = faiss.IndexFlatIP(dim)
                _add_in_blocks(index, matrix, block_rows)
        return cls(
            index=index,
            kind=kind,
            params=params,
            recall=measured,
            rows=num_rows,
            dim=dim,
            source_sha256=digest,
            source=source,
            build_seconds=time.perf_counter() - started,
        )

    # ----------------------------------------------------------------- search

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, rows)``, each ``(Q, min(k, N))``, best first: cosine similarity and row numbers."""
        if k < 1:
            raise InvalidArgumentError(f"k must be at least 1, got {k}")
        queries = np.asarray(queries)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise MecHubError(f"queries have shape {queries.shape}; the index has {self.dim} dimensions")
        scores, rows = self.index.search(normalise(queries), min(k, self.rows))
        return scores, rows.astype(np.int64, copy=False)

    # ----------------------------------------------------------------- files

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the FAISS index at ``path`` and its record at ``path.json`` (both atomically, record last)."""
        faiss = import_faiss()
        path = Path(path)
        atomic_write(path, lambda tmp: faiss.write_index(self.index, str(tmp)))
        atomic_write_json(
            info_path(path),
            {
                "format": FORMAT,
                "kind": self.kind,
                "params": self.params,
                "recall_at_10": self.recall,
                "rows": self.rows,
                "dim": self.dim,
                "source": self.source,
                "source_sha256": self.source_sha256,
                "index_sha256": sha256_file(path),
                "build_seconds": self.build_seconds,
            },
        )
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, features: str | os.PathLike[str] | None = None) -> FeatureIndex:
        """Read an index written by ``save``; with ``features``, refuse it unless built from that very file."""
        faiss = import_faiss()
        path = Path(path)
        record_file = info_path(path)
        if not path.is_file():
            raise MecHubError(f"index not found: {path}")
        try:
            record = json.loads(record_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MecHubError(f"{path}: no {record_file.name} beside it; build it with mec-hub index") from None
        except (OSError, ValueError) as exc:
            raise MecHubError(f"{record_file}: unreadable index record ({exc})") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise MecHubError(f"{record_file}: not an index record written by mec-hub index")
        if sha256_file(path) != record.get("index_sha256"):
            raise StaleIndexError(f"{path} is not the file its record {record_file.name} describes; rebuild it")
        if features is not None:
            actual = source_sha256(features)
            if actual != record.get("source_sha256"):
                raise StaleIndexError(
                    f"{path} was built from a file with SHA-256 {record.get('source_sha256')}, but {features} has "
                    f"SHA-256 {actual}; rebuild it: mec-hub index {features} --out {path}"
                )
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise MecHubError(f"{path}: unreadable FAISS index ({str(exc).splitlines()[0]})") from None
        params = dict(record.get("params") or {})
        _apply_search_params(faiss, index, record["kind"], params)
        return cls(
            index=index,
            kind=record["kind"],
            params=params,
            recall=record.get("recall_at_10"),
            rows=int(record["rows"]),
            dim=int(record["dim"]),
            source_sha256=record.get("source_sha256"),
            source=record.get("source"),
            build_seconds=record.get("build_seconds"),
        )

    def describe(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params.items())
        recall = "" if self.recall is None else f", recall@10 {self.recall:.4f}"
        return f"{self.kind} index of {self.rows} x {self.dim}{' (' + params + ')' if params else ''}{recall}"


# --------------------------------------------------------------------------- kinds


class _RecallSample:
    """Rows of the file used as queries, and their exact neighbours other than themselves.

    A row is trivially its own nearest neighbour, which would flatter an approximate index (the
    list holding the row is the one probed first); recall is measured on the other neighbours,
    as a query from outside the file sees them.
    """

    def __init__(self, matrix: np.ndarray, query_rows: np.ndarray) -> None:
        self.rows = query_rows
        self.queries = normalise(matrix[query_rows])
        self.k = min(RECALL_K, len(matrix) - 1)
        self.truth = self._drop_self(exact_top_k(matrix, self.queries, self.k + 1))

    def _drop_self(self, found: np.ndarray) -> np.ndarray:
        return np.stack([row[row != own][: self.k] for row, own in zip(found, self.rows, strict=True)])

    def recall(self, index: Any) -> float:
        found = index.search(self.queries, self.k + 1)[1]
        return recall_at_k(self._drop_self(found), self.truth)


def _add_in_blocks(index: Any, matrix: np.ndarray, block_rows: int) -> None:
    for start in range(0, len(matrix), block_rows):
        index.add(normalise(matrix[start : start + block_rows]))


def _apply_search_params(faiss: Any, index: Any, kind: str, params: dict[str, Any]) -> None:
    if kind == "ivf" and "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    elif kind == "hnsw" and "ef_search" in params:
        index.hnsw.efSearch = int(params["ef_search"])


def _tune(measure: Any, low: int, high: int, recall: float) -> tuple[int, float]:
    """The smallest setting in ``[low, high]`` whose measured recall reaches ``recall`` (doubling, then bisecting).

    Returns ``(setting, recall)``; the highest setting and its recall when none reaches it.
    """
    setting, reached = low, measure(low)
    previous = low
    while reached < recall and setting < high:
        previous, setting = setting, min(high, setting * 2)
        reached = measure(setting)
    if reached < recall:
        return setting, reached
    lo, hi, best = previous + 1, setting - 1, (setting, reached)
    while lo <= hi:  # recall grows with the setting: bisect between the last two tried
        mid = (lo + hi) // 2
        got = measure(mid)
        if got >= recall:
            best, hi = (mid, got), mid - 1
        else:
            lo = mid + 1
    return best


def _build_ivf(
    faiss: Any,
    matrix: np.ndarray,
    sample: _RecallSample,
    recall: float,
    nlist: int | None,
    rng: np.random.Generator,
    block_rows: int,
) -> tuple[Any, dict[str, Any], float]:
    num_rows, dim = matrix.shape
    if nlist is None:
        nlist = max(1, min(int(4 * math.sqrt(num_rows)), num_rows // 39))
    train_rows = np.sort(rng.choice(num_rows, size=min(num_rows, 50 * nlist), replace=False))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = int(rng.integers(1 << 30))
    index.train(normalise(matrix[train_rows]))
    _add_in_blocks(index, matrix, block_rows)

    def measure(nprobe: int) -> float:
        index.nprobe = nprobe
        return sample.recall(index)

    nprobe, reached = _tune(measure, 1, nlist, recall)
    index.nprobe = nprobe
    return index, {"nlist": nlist, "nprobe": nprobe, "train_rows": len(train_rows)}, reached


def _build_hnsw(
    faiss: Any, matrix: np.ndarray, sample: _RecallSample, recall: float, block_rows: int
) -> tuple[Any, dict[str, Any], float]:
    num_rows, dim = matrix.shape
    m = 32
    index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
    _add_in_blocks(index, matrix, block_rows)

    def measure(ef: int) -> float:
        index.hnsw.efSearch = ef
        return sample.recall(index)

    ef, reached = _tune(measure, 16, max(16, min(4096, num_rows)), recall)
    index.hnsw.efSearch = ef
    return index, {"m": m, "ef_search": ef}, reached


def index_for(
    features: str | os.PathLike[str], index_path: str | os.PathLike[str] | None = None
) -> FeatureIndex | None:
    """The index to search ``features`` with: ``index_path``, else ``FEATS.index`` when it exists, else ``None``.

    Either is refused when built from another file than ``features``. A ``FEATS.index`` found
    beside the file while FAISS is missing is skipped with a warning (exact search still works).
    """
    if index_path is not None:
        return FeatureIndex.load(index_path, features=features)
    default = default_index_path(features)
    if not default.is_file():
        return None
    try:
        import_faiss()
    except FaissMissingError as exc:
        warnings.warn(f"{default} not used, exact search instead: {exc}", stacklevel=2)
        return None
    return FeatureIndex.load(default, features=features)
