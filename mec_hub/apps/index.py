"""A FAISS index over a feature set: cosine search that does not scan every row.

``FeatureIndex.build(features)`` reads an ``(N, D)`` float array (a ``.npy`` path, memory-mapped,
a Parquet set, or an array), refuses rows holding NaN or infinite values (naming them),
L2-normalises its rows once, block by block, and adds them to a FAISS index searched by inner
product (= cosine). ``kind="auto"`` keeps exact search (``IndexFlatIP``) below ``exact_below``
rows; above it, an IVF index (``nlist`` about ``4 * sqrt(N)`` lists, trained on a sample) whose
``nprobe`` is raised until the recall@10 measured on a sample of the set's own rows, against exact
search, reaches ``recall`` (exact search when no ``nprobe`` does). The recall recorded is measured
again on a second sample, held out from tuning and training, so it estimates what unseen queries
get (it may come out a little under ``recall``: sampling noise, not a bias).

``save(path)`` writes the FAISS file and ``PATH.json`` beside it: the kind, its parameters, the
measured recall, the row count, the dimension and the SHA-256 of the feature set it was built from,
so that ``FeatureIndex.load(path, features=FEATS.npy)`` refuses an index built from another set.
``default_index_path`` is the one name of a set's index (``X.npy``, ``X.parquet`` and the shards
``X-00000.parquet`` -> ``X.index``). ``load`` believes nothing in either file before checking it
(see its docstring): a hostile or damaged index is one ``MecHubError`` naming the file.

FAISS (``faiss-cpu``) is an optional dependency: ``pip install 'mec-hub[index]'``.

Example::

    >>> index = FeatureIndex.build("photos.npy", recall=0.95)
    >>> index.save("photos.index")
    >>> scores, rows = FeatureIndex.load("photos.index", features="photos.npy").search(queries, k=10)
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import struct
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mec_hub.apps.search import normalise_rows, refuse_non_finite
from mec_hub.data.featurefile import PARQUET_SUFFIX, FeatureFile, open_matrix, parquet_shards
from mec_hub.errors import InvalidArgumentError, MalformedFileError, MecHubError
from mec_hub.fileio import NotRegularFileError, atomic_write, atomic_write_json, open_regular_file, read_json
from mec_hub.weights.integrity import sha256_file

KINDS = ("auto", "flat", "ivf", "hnsw")
INDEX_SUFFIX = ".index"
INFO_SUFFIX = ".json"  # FEATS.index -> FEATS.index.json
FORMAT = "mec-hub-index"
RECALL_K = 10  # recall@10 is what --recall asks for
_BLOCK_BUDGET = 1 << 23  # elements of one block of rows read from the file: 32 MiB of float32
_SIMILARITY_BUDGET = 1 << 22  # elements of one (queries, rows) block of similarities: 16 MiB
# The FAISS file of each kind (all searched by inner product): its fourcc, then the header every index
# starts with: d (int32), ntotal (int64), two unused int64, is_trained (uint8), metric_type (int32).
_FOURCC = {"flat": b"IxFI", "ivf": b"IwFl", "hnsw": b"IHNf"}
_HEADER = struct.Struct("<4siqqqBi")
_METRIC_INNER_PRODUCT = 0
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHARD = re.compile(r"(?P<set>.+?)-(?P<number>\d+)(?P<of>-of-\d+)?")  # X-00000.parquet, X-00000-of-00003.parquet
_FAISS_LIMITS = threading.Lock()  # FAISS's deserialization limits are process-wide: one reader at a time


class FaissMissingError(MecHubError, ImportError):
    """FAISS is not installed."""


class StaleIndexError(MecHubError):
    """An index built from another feature file than the one it is used with."""


class MalformedIndexError(MalformedFileError):
    """An index file or its record that is corrupt, truncated, inconsistent or hostile."""


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise FaissMissingError("the index needs FAISS, which is not installed: pip install 'mec-hub[index]'") from None
    return faiss


def default_index_path(features: str | os.PathLike[str]) -> Path:
    """The index of a feature set, beside it: THE one name ``index``, ``search`` and ``serve`` use.

    ``X.npy`` -> ``X.index``; ``X.parquet`` -> ``X.index``, and so do its shards ``X-00000.parquet``
    or ``X-00000-of-00003.parquet``: a set's index is named for the set, never for one of its
    shards. Another name gets ``.index`` appended.
    """
    path = Path(features)
    path = shard_set(path) or path
    for suffix in (".npy", PARQUET_SUFFIX):
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return path.with_name(path.name[: -len(suffix)] + INDEX_SUFFIX)
    return path.with_name(path.name + INDEX_SUFFIX)


def shard_set(path: str | os.PathLike[str]) -> Path | None:
    """``X.parquet`` when ``path`` is one of its shards (``X-00000.parquet``, ``X-00000-of-00003.parquet``)."""
    path = Path(path)
    match = _SHARD.fullmatch(path.name[: -len(PARQUET_SUFFIX)]) if path.name.endswith(PARQUET_SUFFIX) else None
    if match is None:
        return None
    whole = path.with_name(match["set"] + PARQUET_SUFFIX)
    if match["of"] or any(shard.name == path.name for shard in parquet_shards(whole)):
        return whole
    return None


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


def open_features(features: str | os.PathLike[str] | FeatureFile) -> np.ndarray:
    """The ``(N, D)`` matrix of a feature set: a plain ``.npy`` memory-mapped, anything else via ``FeatureFile``."""
    if isinstance(features, FeatureFile):
        matrix, origin = features.matrix, str(features.path)
    else:
        path = Path(features)
        # A plain N x D .npy needs no side-cars here (the paths and meta matter only to image queries).
        matrix, origin = (open_matrix(path) if path.suffix == ".npy" else FeatureFile.open(path).matrix), str(path)
    _check_matrix(matrix, origin)
    return matrix


def _check_matrix(matrix: np.ndarray, origin: str) -> None:
    if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[1] == 0 or not np.issubdtype(matrix.dtype, np.number):
        raise MecHubError(f"{origin}: expected a non-empty (N, D) array of numbers, got {matrix.shape} {matrix.dtype}")
    if np.issubdtype(matrix.dtype, np.complexfloating):
        raise MecHubError(f"{origin}: expected real numbers, got {matrix.dtype}")


def normalise(block: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as contiguous float32 (a zero row stays zero); see ``normalise_rows``."""
    return normalise_rows(block)


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
    path: Path | None = None  # the file it was loaded from or saved to

    @property
    def origin(self) -> str:
        return str(self.path) if self.path is not None else f"the {self.kind} index"

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
        """Index ``features`` (a ``.npy`` or ``.parquet`` set, or an ``(N, D)`` array); see the module docstring."""
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
        refuse_non_finite(matrix, source or "features", block_rows=block_rows)
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
            # Two disjoint samples of rows as queries: one to tune the setting on, one held out to
            # measure the recall recorded (a setting picked as the first to reach ``recall`` on a
            # sample looks better on that sample than it is); IVF trains on neither.
            per_sample = max(1, min(sample_queries, num_rows // 4))
            order = rng.permutation(num_rows)
            tuning = _RecallSample(matrix, np.sort(order[:per_sample]))
            held_out = _RecallSample(matrix, np.sort(order[per_sample : 2 * per_sample]))
            if kind == "ivf":
                pool = order[2 * per_sample :]
                index, params, tuned = _build_ivf(faiss, matrix, tuning, recall, nlist, rng, block_rows, pool)
            else:
                index, params, tuned = _build_hnsw(faiss, matrix, tuning, recall, block_rows)
            if tuned < recall:  # no setting reaches it: exact search
                kind, params, measured = "flat", {"fallback_from": kind, "best_recall": tuned}, 1.0
                index = faiss.IndexFlatIP(dim)
                _add_in_blocks(index, matrix, block_rows)
            else:
                measured = held_out.recall(index)
                params["recall_queries"] = per_sample
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
        refuse_non_finite(queries, "the query vectors", what="query")
        scores, rows = self.index.search(normalise(queries), min(k, self.rows))
        rows = rows.astype(np.int64, copy=False)
        if np.any((rows < -1) | (rows >= self.rows)):  # load checks the ids; this guards an index made in memory
            raise MalformedIndexError(f"{self.origin}: answered row numbers outside 0 to {self.rows - 1}")
        return scores, rows

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
        self.path = path
        return path

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, features: str | os.PathLike[str] | FeatureFile | None = None
    ) -> FeatureIndex:
        """Read an index written by ``save``; with ``features`` (a path or an opened ``FeatureFile``),
        refuse it unless built from that very feature set.

        Nothing in either file is believed before it is checked: every field of the record
        (``path.json``), the FAISS header (kind, dimension and row count against the record and
        against the file's size) before FAISS reads it, FAISS's own allocations bounded by the
        file's size, and, once read, the row numbers it stores and, with ``features``, its vectors
        against the rows of the set. Each failure is one ``MecHubError`` naming the file.
        """
        faiss = import_faiss()
        path = Path(path)
        record_file = info_path(path)
        if not path.exists():
            raise MecHubError(f"index not found: {path}")
        try:
            raw = read_json(record_file)
        except FileNotFoundError:
            raise MecHubError(f"{path}: no {record_file.name} beside it; build it with mec-hub index") from None
        record = _IndexRecord.parse(raw, record_file)
        if _sha256_regular(path) != record.index_sha256:
            raise StaleIndexError(f"{path} is not the file its record {record_file.name} describes; rebuild it")
        matrix = None
        if features is not None:
            where = features.path if isinstance(features, FeatureFile) else Path(features)
            actual = source_sha256(where)
            if actual != record.source_sha256:
                built_from = (
                    "an array, not a file" if record.source_sha256 is None
                    else f"a feature set with SHA-256 {record.source_sha256}"
                )
                raise StaleIndexError(
                    f"{path} is stale: it was built from {built_from}, but {where} has SHA-256 {actual}; "
                    f"rebuild it: mec-hub index {where} --out {path}"
                )
            matrix = open_features(features)
            if matrix.shape != (record.rows, record.dim):
                raise StaleIndexError(
                    f"{path} indexes {record.rows} x {record.dim} rows but {where} holds "
                    f"{matrix.shape[0]} x {matrix.shape[1]}; rebuild it: mec-hub index {where} --out {path}"
                )
        index = _read_faiss(faiss, path, record)
        params = dict(record.params)
        _check_search_params(faiss, index, record, path)
        _apply_search_params(faiss, index, record.kind, params)
        if matrix is not None:
            _check_vectors(faiss, index, record.kind, matrix, path)
        return cls(
            index=index,
            kind=record.kind,
            params=params,
            recall=record.recall_at_10,
            rows=record.rows,
            dim=record.dim,
            source_sha256=record.source_sha256,
            source=record.source,
            build_seconds=record.build_seconds,
            path=path,
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
    as a query from outside the file sees them: the row and the other ``N - 1`` are then drawn
    alike, as an unseen query and the ``N`` rows are. For that to hold, the rows of a sample are
    not among those an IVF index is trained on, and the sample a setting is tuned on is not the
    one whose recall is recorded.
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


def _check_search_params(faiss: Any, index: Any, record: _IndexRecord, path: Path) -> None:
    """A search setting bounded as ``build`` bounds it: FAISS allocates for it at every search."""
    if record.kind == "ivf":
        limit, name = faiss.extract_index_ivf(index).nlist, "nprobe"
    elif record.kind == "hnsw":
        limit, name = max(16, min(4096, record.rows)), "ef_search"
    else:
        return
    value = record.params.get(name, 1)
    if value > limit:
        raise MalformedIndexError(f"{info_path(path)}: field 'params.{name}' is {value}, over {limit} for this index")


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
    train_pool: np.ndarray,
) -> tuple[Any, dict[str, Any], float]:
    """``train_pool``: the rows training may use (not the recall samples'); ``nlist``: one list per 39 at most."""
    num_rows, dim = matrix.shape
    if nlist is None:
        nlist = max(1, min(int(4 * math.sqrt(num_rows)), len(train_pool) // 39))
    if not 1 <= nlist <= len(train_pool):
        raise InvalidArgumentError(f"nlist must be in [1, {len(train_pool)}] for {num_rows} rows, got {nlist}")
    train_rows = np.sort(rng.choice(train_pool, size=min(len(train_pool), 50 * nlist), replace=False))
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


# --------------------------------------------------------------------------- reading what strangers wrote


_PARAM_TYPES: dict[str, dict[str, type]] = {
    "flat": {"fallback_from": str, "best_recall": float},
    "ivf": {"nlist": int, "nprobe": int, "train_rows": int, "recall_queries": int},
    "hnsw": {"m": int, "ef_search": int, "recall_queries": int},
}


@dataclass(frozen=True)
class _IndexRecord:
    """``X.index.json``, every field checked (``parse``)."""

    kind: str
    params: dict[str, Any]
    recall_at_10: float | None
    rows: int
    dim: int
    source: str | None
    source_sha256: str | None
    index_sha256: str
    build_seconds: float | None

    @classmethod
    def parse(cls, data: Any, origin: Path) -> _IndexRecord:
        def bad(name: str, value: Any, expected: str) -> MalformedIndexError:
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            return MalformedIndexError(f"{origin}: field {name!r} is {shown}, expected {expected}")

        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise MalformedIndexError(f"{origin}: not an index record written by mec-hub index (field 'format')")
        kind = data.get("kind")
        if not isinstance(kind, str) or kind not in _FOURCC:
            raise bad("kind", kind, " or ".join(_FOURCC))
        params = data.get("params", {})
        if not isinstance(params, dict):
            raise bad("params", params, "an object")
        for key, value in params.items():
            wanted = _PARAM_TYPES[kind].get(key)
            if wanted is None:
                raise bad(f"params.{key}", value, f"no such parameter of a {kind} index")
            if wanted is int and not (_is_int(value) and 1 <= value <= 1 << 40):
                raise bad(f"params.{key}", value, "a whole number from 1")
            if wanted is float and not (_is_number(value) and 0.0 <= value <= 1.0):
                raise bad(f"params.{key}", value, "a number from 0 to 1")
            if wanted is str and value not in ("ivf", "hnsw"):
                raise bad(f"params.{key}", value, "'ivf' or 'hnsw'")
        recall = data.get("recall_at_10")
        if recall is not None and not (_is_number(recall) and 0.0 <= recall <= 1.0):
            raise bad("recall_at_10", recall, "a number from 0 to 1, or null")
        sizes = {}
        for name in ("rows", "dim"):
            value = data.get(name)
            if not (_is_int(value) and 1 <= value < 1 << 40):
                raise bad(name, value, "a whole number from 1")
            sizes[name] = value
        source = data.get("source")
        if source is not None and not isinstance(source, str):
            raise bad("source", source, "a path, or null")
        digests = {}
        for name in ("source_sha256", "index_sha256"):
            value = data.get(name)
            hex_digest = isinstance(value, str) and _SHA256.fullmatch(value) is not None
            if not hex_digest and (value is not None or name == "index_sha256"):
                raise bad(name, value, "64 lowercase hex digits" + (", or null" if name == "source_sha256" else ""))
            digests[name] = value
        seconds = data.get("build_seconds")
        if seconds is not None and not (_is_number(seconds) and 0.0 <= seconds < math.inf):
            raise bad("build_seconds", seconds, "a number of seconds, or null")
        return cls(kind, params, recall, sizes["rows"], sizes["dim"], source, digests["source_sha256"],
                   digests["index_sha256"], seconds)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _sha256_regular(path: Path) -> str:
    """SHA-256 of a regular file (a FIFO or a device is refused, never read)."""
    digest = hashlib.sha256()
    try:
        with open_regular_file(path) as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    except NotRegularFileError as exc:
        raise MalformedIndexError(f"{path}: {exc}") from None
    except OSError as exc:
        raise MalformedIndexError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return digest.hexdigest()


@contextlib.contextmanager
def _faiss_limits(faiss: Any, size: int) -> Iterator[None]:
    """FAISS's deserialization limits set from a file of ``size`` bytes, the previous ones restored after.

    No vector read can hold more bytes than the file, nor any loop run more times than it has
    bytes; without this, a header claiming 2**34 floats in a file of 100 bytes allocates them.
    """
    if not hasattr(faiss, "set_deserialization_vector_byte_limit"):
        raise MecHubError(
            f"FAISS {getattr(faiss, '__version__', '')} cannot bound what it allocates while reading an index "
            "(no set_deserialization_vector_byte_limit); upgrade it: pip install -U faiss-cpu"
        )
    with _FAISS_LIMITS:
        vector, loop = faiss.get_deserialization_vector_byte_limit(), faiss.get_deserialization_loop_limit()
        faiss.set_deserialization_vector_byte_limit(size)
        faiss.set_deserialization_loop_limit(size)
        try:
            yield
        finally:
            faiss.set_deserialization_vector_byte_limit(vector)
            faiss.set_deserialization_loop_limit(loop)


def _read_faiss(faiss: Any, path: Path, record: _IndexRecord) -> Any:
    """The FAISS index at ``path``, its header checked against ``record`` and its size before FAISS reads it."""
    try:
        with open_regular_file(path) as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(_HEADER.size)
    except OSError as exc:
        raise MalformedIndexError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(head) < _HEADER.size:
        raise MalformedIndexError(f"{path}: {size} bytes, too short to be a FAISS index")
    fourcc, dim, ntotal, _, _, trained, metric = _HEADER.unpack(head)
    if fourcc != _FOURCC[record.kind]:
        raise MalformedIndexError(
            f"{path}: not a FAISS {record.kind} index as its record says (starts with {fourcc!r}, "
            f"not {_FOURCC[record.kind]!r})"
        )
    if (dim, ntotal) != (record.dim, record.rows):
        raise MalformedIndexError(
            f"{path}: the header says {ntotal} x {dim}, its record {info_path(path).name} {record.rows} x {record.dim}"
        )
    if ntotal * dim * 4 > size:  # every kind here stores the vectors as float32
        raise MalformedIndexError(f"{path}: the header claims {ntotal} vectors of {dim} floats; it has {size} bytes")
    if trained not in (0, 1) or metric != _METRIC_INNER_PRODUCT:
        raise MalformedIndexError(f"{path}: not an inner-product index written by mec-hub index")
    try:
        with _faiss_limits(faiss, size):
            index = faiss.read_index(str(path))
    except RuntimeError as exc:
        raise MalformedIndexError(f"{path}: unreadable FAISS index ({str(exc).splitlines()[0][:300]})") from None
    if (index.d, index.ntotal, index.metric_type) != (record.dim, record.rows, _METRIC_INNER_PRODUCT):
        raise MalformedIndexError(f"{path}: FAISS read {index.ntotal} x {index.d}, not {record.rows} x {record.dim}")
    _check_structure(faiss, index, record, path)
    return index


def _check_structure(faiss: Any, index: Any, record: _IndexRecord, path: Path) -> None:
    """The row numbers an index can answer are ``0`` to ``rows - 1``; an HNSW graph stays inside itself."""
    rows = record.rows
    if record.kind == "ivf":
        ivf = faiss.extract_index_ivf(index)
        nlist = ivf.nlist
        if record.params.get("nlist", nlist) != nlist or ivf.quantizer.ntotal != nlist:
            raise MalformedIndexError(f"{path}: {nlist} lists, {ivf.quantizer.ntotal} centroids; its record says "
                                      f"{record.params.get('nlist')}")
        if ivf.code_size != 4 * record.dim or ivf.quantizer.d != record.dim:
            raise MalformedIndexError(f"{path}: vectors of {ivf.code_size} bytes, not {4 * record.dim}")
        seen = np.zeros(rows, dtype=bool)
        total = 0
        for number in range(nlist):
            length = ivf.invlists.list_size(number)
            total += length
            if total > rows:
                break
            if length:
                ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(number), length)
                if ids.min() < 0 or ids.max() >= rows or seen[ids].any():
                    raise MalformedIndexError(f"{path}: list {number} holds row numbers outside 0 to {rows - 1} "
                                              "or held twice")
                seen[ids] = True
        if total != rows:
            raise MalformedIndexError(f"{path}: its lists hold {total} rows, not {rows}")
    elif record.kind == "hnsw":
        graph = index.hnsw
        levels = faiss.vector_to_array(graph.levels)
        offsets = faiss.vector_to_array(graph.offsets)
        neighbours = faiss.vector_to_array(graph.neighbors)
        cumulative = faiss.vector_to_array(graph.cum_nneighbor_per_level)
        storage = faiss.downcast_index(index.storage)
        problem = None
        if len(levels) != rows or len(offsets) != rows + 1 or storage.ntotal != rows or storage.d != record.dim:
            problem = "its graph does not have one node per row"
        elif levels.min() < 1 or levels.max() >= len(cumulative) or offsets[0] != 0 or offsets[-1] != len(neighbours):
            problem = "its graph's levels or offsets are out of range"
        elif np.any(np.diff(offsets) != cumulative[levels]) or np.any(np.diff(cumulative) < 0):
            problem = "its graph's offsets do not match its levels"
        elif len(neighbours) and (neighbours.min() < -1 or neighbours.max() >= rows):
            problem = f"its graph links to nodes outside 0 to {rows - 1}"
        elif not 0 <= graph.entry_point < rows or graph.max_level != levels[graph.entry_point] - 1:
            problem = "its graph's entry point is out of range"
        elif not _links_stay_on_their_level(levels, offsets, neighbours, cumulative):
            problem = "its graph links to nodes at levels they are not on"
        if problem:
            raise MalformedIndexError(f"{path}: {problem}")


def _links_stay_on_their_level(levels: np.ndarray, offsets: np.ndarray, neighbours: np.ndarray,
                               cumulative: np.ndarray) -> bool:
    """Every link at level ``l`` leads to a node that is on level ``l`` (HNSW reads that node's level-``l`` links)."""
    block = 1 << 22
    for start in range(0, len(neighbours), block):
        slots = np.arange(start, min(start + block, len(neighbours)))
        targets = neighbours[slots]
        linked = targets >= 0
        node = np.searchsorted(offsets, slots[linked], side="right") - 1
        level = np.searchsorted(cumulative, slots[linked] - offsets[node], side="right") - 1
        if np.any(levels[targets[linked]] <= level):
            return False
    return True


def _stored_vectors(faiss: Any, index: Any, kind: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(row numbers, vectors)`` blocks of what an index stores, read in place (no copy of the whole)."""
    if kind == "ivf":
        ivf = faiss.extract_index_ivf(index)
        for number in range(ivf.nlist):
            length = ivf.invlists.list_size(number)
            if length:
                ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(number), length)
                codes = faiss.rev_swig_ptr(ivf.invlists.get_codes(number), length * ivf.code_size)
                yield ids, codes.view(np.float32).reshape(length, ivf.d)
        return
    flat = faiss.downcast_index(index.storage) if kind == "hnsw" else index
    vectors = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)
    for start in range(0, flat.ntotal, 1 << 16):
        rows = np.arange(start, min(start + (1 << 16), flat.ntotal))
        yield rows, vectors[rows]


def _check_vectors(faiss: Any, index: Any, kind: str, matrix: np.ndarray, path: Path) -> None:
    """The index stores the set's rows, normalised: row ``i`` of the index is row ``i`` of ``matrix``.

    An index whose vectors were altered (with a record to match) would answer rows of the set that
    are not the nearest, at scores that are not theirs.
    """
    for rows, vectors in _stored_vectors(faiss, index, kind):
        order = np.argsort(rows)
        wanted = normalise(matrix[rows[order]])
        if not np.allclose(vectors[order], wanted, rtol=0.0, atol=1e-5):
            raise StaleIndexError(
                f"{path}: its vectors are not the rows of the feature set it is used with; rebuild it: "
                f"mec-hub index FEATURES --out {path}"
            )


def index_for(
    features: str | os.PathLike[str] | FeatureFile,
    index_path: str | os.PathLike[str] | None = None,
    *,
    note: Callable[[str], None] | None = None,
) -> FeatureIndex | None:
    """The index to search ``features`` with: ``index_path``, else ``default_index_path(features)`` when it
    exists, else ``None`` (exact search).

    Either is refused (``StaleIndexError``, saying to rebuild) when built from another feature set
    than ``features``. When the search is to be exact, ``note`` (if given) is told why in one line:
    no index beside the set, or FAISS missing (a warning when ``note`` is not given).
    """
    where = features.path if isinstance(features, FeatureFile) else Path(features)
    if index_path is not None:
        return FeatureIndex.load(index_path, features=features)
    default = default_index_path(where)
    if not default.exists():
        if note is not None:
            note(f"no index {default} (mec-hub index {where} builds one): exact search")
        return None
    try:
        import_faiss()
    except FaissMissingError as exc:
        message = f"{default} not used, exact search instead: {exc}"
        if note is not None:
            note(message)
        else:
            warnings.warn(message, stacklevel=2)
        return None
    return FeatureIndex.load(default, features=features)
