"""A FAISS index over a feature set: cosine search that does not scan every row.

``FeatureIndex.build(features)`` reads an ``(N, D)`` float array (a ``.npy`` path, memory-mapped,
a Parquet set, or an array), refuses rows holding NaN or infinite values (naming them),
L2-normalises its rows once, block by block, and adds them to a FAISS index searched by inner
product (= cosine). ``kind="auto"`` keeps exact search (``IndexFlatIP``) below ``exact_below``
rows; above it, an IVF index (``nlist`` about ``4 * sqrt(N)`` lists, trained on a sample) whose
``nprobe`` is raised until the recall@10 measured on a sample of the set's own rows, against exact
search, reaches ``recall`` (exact search when no ``nprobe`` does); and above ``compress_above``
rows (default: rows whose float32 copy passes ``COMPRESS_ABOVE_BYTES``, 2 GiB), the compressed
``ivfpq`` kind. The recall recorded is measured again on a second sample, held out from tuning and
training, so it estimates what unseen queries get (it may come out a little under ``recall``:
sampling noise, not a bias).

``kind="ivfpq"`` (``IndexIVFPQ``) keeps no row in memory, only a product-quantization code of each:
``m`` bytes (``pq_shape``: ``m = D / 4`` sub-quantizers of 8 bits, one per 4 dimensions) and its
8-byte row number, 40 bytes a row at 128-d against 512 for the other kinds, so 10^8 rows take
4 GB instead of 51 GB. The codes only propose candidates: the ``k_factor * k`` best by PQ are
re-ranked exactly (``rerank``) from the feature set itself, so the scores returned are exact
cosine similarities and the order among candidates is exact. Searching one therefore needs the
feature set: a ``.npy`` is read through its memory map, candidate rows only; a Parquet set is
read whole into memory by ``FeatureFile`` (Parquet cannot be memory-mapped), which forfeits the
saving: convert a set too large for memory to ``.npy``. Training uses a sample; rows are added a
block at a time from the memory map, so the build holds the codes and one block, never the
normalised matrix.

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

KINDS = ("auto", "flat", "ivf", "hnsw", "ivfpq")
APPROXIMATE = ("ivf", "hnsw", "ivfpq")
_IVF_KINDS = ("ivf", "ivfpq")  # the kinds with inverted lists (nprobe, the IVF file layout)
INDEX_SUFFIX = ".index"
INFO_SUFFIX = ".json"  # FEATS.index -> FEATS.index.json
FORMAT = "mec-hub-index"
RECALL_K = 10  # recall@10 is what --recall asks for
_BLOCK_BUDGET = 1 << 23  # elements of one block of rows read from the file: 32 MiB of float32
_SIMILARITY_BUDGET = 1 << 22  # elements of one (queries, rows) block of similarities: 16 MiB
# kind="auto" compresses (ivfpq) once the IVF index's copy of the rows, 4 * D bytes each, would pass
# this: 4,194,304 rows at 128-d, 262,144 at 2048-d. Its build peaks at about 2.5 times that copy
# (1.3 GB for 512 MB of rows, benchmarks/RESULTS.md), so a set past 2 GiB would ask for 5 GB and more.
COMPRESS_ABOVE_BYTES = 2 << 30
# The re-rank depths an ivfpq index tries, deepest first: ``k_factor * k`` candidates re-ranked per query.
_K_FACTORS = (64, 32, 16, 8, 4, 2, 1)
# What re-ranking one candidate costs, counted in PQ codes scanned: reading a row of the memory map
# at random, normalising it and one dot product, against a table look-up per byte of code (measured
# on 1M and 10M x 128, m = 32, on the 2-core VM: about 0.6 us against 10 ns). ``_build_ivfpq`` picks
# the setting of least cost per query among those that reach the recall.
_RERANK_COST = 60
# The FAISS file of each kind (all searched by inner product): its fourcc, then the header every index
# starts with: d (int32), ntotal (int64), two unused int64, is_trained (uint8), metric_type (int32).
_FOURCC = {"flat": b"IxFI", "ivf": b"IwFl", "hnsw": b"IHNf", "ivfpq": b"IwPQ"}
_HEADER = struct.Struct("<4siqqqBi")
_METRIC_INNER_PRODUCT = 0
_NO_SCORE = -np.finfo(np.float32).max  # the score FAISS gives a missing answer (row -1) by inner product
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
    return float(np.mean((truth[:, :, None] == found[:, None, :k]).any(axis=2).sum(axis=1) / k))  # rows once each


def compress_above_rows(dim: int) -> int:
    """The row count above which ``kind="auto"`` builds ``ivfpq``: rows filling ``COMPRESS_ABOVE_BYTES`` as float32."""
    return COMPRESS_ABOVE_BYTES // (4 * dim)


def pq_shape(dim: int, train_rows: int | None = None) -> tuple[int, int]:
    """``(m, nbits)`` of an ivfpq index of ``dim`` dimensions: ``m`` sub-quantizers of ``nbits`` bits.

    ``m`` is the largest divisor of ``dim`` not over ``dim / 4`` (FAISS splits a row into ``m`` equal
    parts): 32 at 128-d, 192 at 768-d, 512 at 2048-d. A row then takes ``dim / 4`` bytes of code and
    8 of row number, against ``4 * dim`` as float32: at most 1/8 of it from 32 dimensions up (1/12.8
    at 128-d, 1/15.8 at 2048-d). Why not ``dim / 8``, 24 bytes a row at 128-d: on 1M x 128 clustered
    rows its codes ranked the true neighbours so coarsely that 640 candidates had to be re-ranked for
    recall@10 0.96, against 160 for 0.95-0.98 with ``dim / 4``, and re-ranking is most of a search's
    time. ``nbits`` is 8 (256 centroids per part), fewer when ``train_rows`` cannot train 256: FAISS's
    k-means wants 39 points per centroid.
    """
    m = max(divisor for divisor in range(1, max(1, dim // 4) + 1) if dim % divisor == 0)
    nbits = 8 if train_rows is None else max(1, min(8, int(math.log2(max(train_rows // 39, 2)))))
    return m, nbits


def code_bytes(m: int, nbits: int) -> int:
    """Bytes of one PQ code of ``m`` parts of ``nbits`` bits (FAISS packs the bits)."""
    return (m * nbits + 7) // 8


def rerank(
    matrix: np.ndarray, queries: np.ndarray, candidates: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, rows)``, each ``(Q, k)``: the exact cosine top ``k`` of each query's ``candidates``.

    ``queries`` are L2-normalised; ``candidates`` ``(Q, depth)`` are row numbers of ``matrix``, ``-1``
    for none. Only the candidate rows are read (sorted, so a memory map reads each page once) and
    normalised; the order is by decreasing similarity, equal ones by increasing row, as
    ``cosine_top_k`` orders them. Missing answers are row ``-1`` at score ``-3.4e38``, as FAISS pads.
    Memory: about 32 MiB of candidate rows at a time, whatever ``Q``.
    """
    scores = np.full((len(queries), k), _NO_SCORE, dtype=np.float32)
    rows = np.full((len(queries), k), -1, dtype=np.int64)
    chunk = _queries_per_block(candidates, matrix)
    for start in range(0, len(queries), chunk):
        found = candidates[start : start + chunk]
        best = _best(_exact_scores(matrix, queries[start : start + chunk], found), found, k)
        width = best[0].shape[1]
        scores[start : start + chunk, :width], rows[start : start + chunk, :width] = best
    return scores, rows


def _queries_per_block(candidates: np.ndarray, matrix: np.ndarray) -> int:
    """Queries whose gathered candidate rows fill about ``_BLOCK_BUDGET`` elements (32 MiB of float32)."""
    return max(1, _BLOCK_BUDGET // max(candidates.shape[1] * matrix.shape[1], 1))


def _rerank_depth(rows: int, k_factor: int, k: int) -> int:
    """Candidates an ivfpq search re-ranks for ``k`` answers: ``k_factor`` times ``k``, and never fewer than
    for the 10 its setting was tuned for, so the first ``k`` answers are the same whatever ``k <= 10``."""
    return min(rows, k_factor * max(k, RECALL_K))


def _exact_scores(matrix: np.ndarray, queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Cosine similarity of each query with each of its candidate rows (``_NO_SCORE`` for ``-1``).

    ``queries`` are unit rows; a row's cosine is its dot product with the query over its norm, both
    summed in float64 as ``normalise_rows`` sums the norm (equal to its result within 1e-7), but
    without a float64 copy of the rows: that copy took two thirds of the time, 1.6-4 us a row against
    0.6 (1,000 queries x 640 random rows of a 10M x 128 memory map, the 2-core VM). Each distinct
    row is read once; memory: about 32 MiB of gathered rows at a time.
    """
    similarity = np.empty(candidates.shape, dtype=np.float32)
    chunk = _queries_per_block(candidates, matrix)
    for start in range(0, len(queries), chunk):
        found = candidates[start : start + chunk]
        wanted, where = np.unique(found, return_inverse=True)  # -1 reads the last row: overwritten below
        rows = np.asarray(matrix[wanted], dtype=np.float32)
        norms = np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float64))
        where = where.reshape(found.shape)
        dots = np.einsum("qkd,qd->qk", rows[where], queries[start : start + chunk], dtype=np.float64)
        similarity[start : start + chunk] = dots / np.maximum(norms[where], 1e-12)
    similarity[candidates < 0] = _NO_SCORE
    return similarity


def _best(similarity: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` candidates of highest similarity per query, ties by increasing row, missing ones (``-1``) last."""
    return _first(_ranked(similarity, candidates), similarity, candidates, candidates.shape[1], k)


def _ranked(similarity: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Positions of the candidates of each query by decreasing similarity, ties by row, missing ones last."""
    return np.lexsort((np.where(candidates >= 0, candidates, np.iinfo(np.int64).max), -similarity), axis=1)


def _first(
    ranked: np.ndarray, similarity: np.ndarray, candidates: np.ndarray, depth: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, rows)`` of the best ``k`` among each query's first ``depth`` candidates, from ``_ranked``'s order."""
    k = min(k, depth)
    within = ranked < depth
    order = ranked[within & (np.cumsum(within, axis=1) <= k)].reshape(len(ranked), k)
    return np.take_along_axis(similarity, order, axis=1), np.take_along_axis(candidates, order, axis=1)


@dataclass
class FeatureIndex:
    """A FAISS index of L2-normalised rows, searched by inner product, and what it was built from.

    ``features`` is the ``(N, D)`` matrix an ``ivfpq`` index re-ranks its candidates from (``None``
    for the other kinds, which hold the rows themselves).
    """

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
    features: np.ndarray | None = field(default=None, repr=False)

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
        compress_above: int | None = None,
        nlist: int | None = None,
        sample_queries: int = 1000,
        block_rows: int | None = None,
        seed: int = 0,
    ) -> FeatureIndex:
        """Index ``features`` (a ``.npy`` or ``.parquet`` set, or an ``(N, D)`` array); see the module docstring.

        ``kind="auto"``: ``flat`` below ``exact_below`` rows, ``ivfpq`` above ``compress_above`` rows
        (default ``compress_above_rows(D)``), ``ivf`` between. An ``ivfpq`` index built from an array
        re-ranks from that array; saved, it loads only with the file it came from: build it from the file.
        """
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
            above = compress_above_rows(dim) if compress_above is None else compress_above
            kind = "flat" if num_rows < exact_below else "ivfpq" if num_rows > above else "ivf"
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
            pool = order[2 * per_sample :]
            if kind == "ivf":
                index, params, tuned = _build_ivf(faiss, matrix, tuning, recall, nlist, rng, block_rows, pool)
            elif kind == "ivfpq":
                index, params, tuned = _build_ivfpq(faiss, matrix, tuning, recall, nlist, rng, block_rows, pool)
            else:
                index, params, tuned = _build_hnsw(faiss, matrix, tuning, recall, block_rows)
            if tuned < recall and kind != "ivfpq":  # no setting reaches it: exact search
                kind, params, measured = "flat", {"fallback_from": kind, "best_recall": tuned}, 1.0
                index = faiss.IndexFlatIP(dim)
                _add_in_blocks(index, matrix, block_rows)
            else:
                # ivfpq keeps its best setting: exact search would hold every row, which it exists to avoid.
                if tuned < recall:
                    params["best_recall"] = tuned
                    warnings.warn(
                        f"{source or 'features'}: no setting of the ivfpq index reaches recall@10 {recall} "
                        f"(best {tuned:.4f}, kept); for exact answers search without an index",
                        stacklevel=2,
                    )
                measured = held_out.recall(_searcher(index, kind, params, matrix))
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
            features=matrix if kind == "ivfpq" else None,
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
        queries, k = normalise(queries), min(k, self.rows)
        if self.kind != "ivfpq":
            return self._search_faiss(queries, k)
        if self.features is None:
            raise MecHubError(
                f"{self.origin} re-ranks from its feature set, which it was loaded without: "
                f"FeatureIndex.load({str(self.path or 'PATH')!r}, features=FEATS)"
            )
        depth = _rerank_depth(self.rows, int(self.params.get("k_factor", 1)), k)
        return rerank(self.features, queries, self._search_faiss(queries, depth)[1], k)

    def _search_faiss(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, rows = self.index.search(queries, k)
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

        An ``ivfpq`` index cannot search without its feature set (it re-ranks from it): without
        ``features`` it takes the set recorded as its source, under the same SHA-256 check, and
        failing that (moved, or the index built from an array) says in one line to pass it.

        Nothing in either file is believed before it is checked: every field of the record
        (``path.json``), the FAISS header (kind, dimension and row count against the record and
        against the file's size) before FAISS reads it, for the IVF kinds the whole layout of the
        file (``_check_ivf_layout``), FAISS's own allocations bounded by the file's size, and, once
        read, the row numbers it stores and, with ``features``, its vectors (or, for ``ivfpq``, its
        codes) against the rows of the set. Each failure is one ``MecHubError`` naming the file.
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
        if features is None and record.kind == "ivfpq":
            features = _recorded_source(path, record)
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
            features=matrix if record.kind == "ivfpq" else None,
        )

    def describe(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params.items())
        recall = "" if self.recall is None else f", recall@10 {self.recall:.4f}"
        what = f"{self.kind} index of {self.rows} x {self.dim}{' (' + params + ')' if params else ''}{recall}"
        if self.kind != "ivfpq":
            return what
        row_bytes = code_bytes(self.params["m"], self.params["nbits"]) + 8
        return (
            f"{what}; {row_bytes} bytes a row in memory ({4 * self.dim} as float32), "
            f"{self.params['k_factor']} x k candidates re-ranked exactly from {self.source or 'the features'}"
        )


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
        """The first ``k`` of each query's ``k + 1`` rows other than its own."""
        other = found != self.rows[:, None]
        return found[other & (np.cumsum(other, axis=1) <= self.k)].reshape(len(found), self.k)

    def recall(self, search: Callable[[np.ndarray, int], np.ndarray]) -> float:
        """Recall of ``search(queries, k) -> rows`` (``_searcher``) on this sample."""
        return self.recall_of(search(self.queries, self.k + 1))

    def recall_of(self, found: np.ndarray) -> float:
        """Recall of ``found``, ``(queries, k + 1)`` rows answered for the sample's queries."""
        return recall_at_k(self._drop_self(found), self.truth)


def _searcher(
    index: Any, kind: str, params: dict[str, Any], matrix: np.ndarray
) -> Callable[[np.ndarray, int], np.ndarray]:
    """``search(normalised queries, k) -> rows`` of a FAISS index as ``FeatureIndex.search`` answers, re-ranking
    for ``ivfpq`` (with the ``k_factor`` of ``params`` at the time of each call)."""
    if kind != "ivfpq":
        return lambda queries, k: index.search(queries, k)[1]

    def search(queries: np.ndarray, k: int) -> np.ndarray:
        candidates = index.search(queries, _rerank_depth(len(matrix), params["k_factor"], k))[1]
        return rerank(matrix, queries, candidates, k)[1]

    return search


def _add_in_blocks(index: Any, matrix: np.ndarray, block_rows: int) -> None:
    for start in range(0, len(matrix), block_rows):
        index.add(normalise(matrix[start : start + block_rows]))


def _apply_search_params(faiss: Any, index: Any, kind: str, params: dict[str, Any]) -> None:
    if kind in _IVF_KINDS and "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    elif kind == "hnsw" and "ef_search" in params:
        index.hnsw.efSearch = int(params["ef_search"])


def _check_search_params(faiss: Any, index: Any, record: _IndexRecord, path: Path) -> None:
    """A search setting bounded as ``build`` bounds it: FAISS allocates for it at every search."""
    if record.kind in _IVF_KINDS:
        limits = {"nprobe": faiss.extract_index_ivf(index).nlist, "k_factor": _K_FACTORS[0]}
    elif record.kind == "hnsw":
        limits = {"ef_search": max(16, min(4096, record.rows))}
    else:
        return
    for name, limit in limits.items():
        value = record.params.get(name, 1)
        if value > limit:
            raise MalformedIndexError(
                f"{info_path(path)}: field 'params.{name}' is {value}, over {limit} for this index"
            )


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
    nlist, train_rows = _lists_and_training(num_rows, nlist, rng, train_pool)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = int(rng.integers(1 << 30))
    index.train(_normalised_rows(matrix, train_rows, block_rows))
    _add_in_blocks(index, matrix, block_rows)

    def measure(nprobe: int) -> float:
        index.nprobe = nprobe
        return sample.recall(_searcher(index, "ivf", {}, matrix))

    nprobe, reached = _tune(measure, 1, nlist, recall)
    index.nprobe = nprobe
    return index, {"nlist": nlist, "nprobe": nprobe, "train_rows": len(train_rows)}, reached


def _lists_and_training(
    num_rows: int, nlist: int | None, rng: np.random.Generator, train_pool: np.ndarray
) -> tuple[int, np.ndarray]:
    """``nlist`` (default about ``4 * sqrt(N)``, one list per 39 training rows at most) and the training
    rows, 50 per list drawn from ``train_pool``, sorted (a memory map then reads each page once)."""
    if nlist is None:
        nlist = max(1, min(int(4 * math.sqrt(num_rows)), len(train_pool) // 39))
    if not 1 <= nlist <= len(train_pool):
        raise InvalidArgumentError(f"nlist must be in [1, {len(train_pool)}] for {num_rows} rows, got {nlist}")
    return nlist, np.sort(rng.choice(train_pool, size=min(len(train_pool), 50 * nlist), replace=False))


def _normalised_rows(matrix: np.ndarray, rows: np.ndarray, block_rows: int) -> np.ndarray:
    """``normalise(matrix[rows])`` gathered a block at a time: no float64 copy of the whole sample."""
    out = np.empty((len(rows), matrix.shape[1]), dtype=np.float32)
    for start in range(0, len(rows), block_rows):
        out[start : start + block_rows] = normalise(matrix[rows[start : start + block_rows]])
    return out


def _build_ivfpq(
    faiss: Any,
    matrix: np.ndarray,
    sample: _RecallSample,
    recall: float,
    nlist: int | None,
    rng: np.random.Generator,
    block_rows: int,
    train_pool: np.ndarray,
) -> tuple[Any, dict[str, Any], float]:
    """An ``IndexIVFPQ`` (lists and training as ``_build_ivf``, codes as ``pq_shape``) and its search setting.

    Two settings, tuned together: ``nprobe`` and the re-rank depth ``k_factor`` (``_K_FACTORS``); kept,
    the pair reaching ``recall`` at the least cost per query, ``nprobe * N / nlist`` codes scanned plus
    ``k_factor * 10 * _RERANK_COST`` for the re-ranking (``_tune_ivfpq``). When none reaches it: the
    deepest re-ranking with every list probed, the best recall there is.
    """
    num_rows, dim = matrix.shape
    nlist, train_rows = _lists_and_training(num_rows, nlist, rng, train_pool)
    m, nbits = pq_shape(dim, len(train_rows))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = int(rng.integers(1 << 30))
    index.pq.cp.seed = int(rng.integers(1 << 30))
    # 10 k-means iterations per sub-quantizer, as FAISS trains the lists, not PQ's default 25: the error of
    # the codes came out the same within 0.2% (40k x 64 clustered rows) for less than half the time.
    index.pq.cp.niter = 10
    index.train(_normalised_rows(matrix, train_rows, block_rows))
    _add_in_blocks(index, matrix, block_rows)
    nprobe, k_factor, reached = _tune_ivfpq(index, matrix, sample, recall)
    index.nprobe = nprobe
    params = {"nlist": nlist, "nprobe": nprobe, "m": m, "nbits": nbits, "k_factor": k_factor}
    return index, {**params, "train_rows": len(train_rows)}, reached


def _tune_ivfpq(index: Any, matrix: np.ndarray, sample: _RecallSample, recall: float) -> tuple[int, int, float]:
    """``(nprobe, k_factor, recall)`` of least cost reaching ``recall`` on ``sample`` (see ``_build_ivfpq``).

    One search per ``nprobe`` serves every depth: FAISS answers its candidates best first, so the
    ``f * k`` best are the first ``f * k`` of the deepest search's, and their exact scores are computed
    once. ``nprobe`` doubles until the deepest re-ranking reaches ``recall``, and on (up to 8 times
    that, which bounds the tuning's own time) while more probes could still make a shallower one reach
    it for less; then it is bisected for the pair kept.
    """
    nlist, per_list, k = index.nlist, len(matrix) / index.nlist, sample.k + 1
    depths = {factor: min(len(matrix), factor * k) for factor in _K_FACTORS}
    measured: dict[int, dict[int, float]] = {}  # nprobe -> {k_factor: recall}

    def measure(nprobe: int) -> dict[int, float]:
        if nprobe not in measured:
            index.nprobe = nprobe
            candidates = index.search(sample.queries, depths[_K_FACTORS[0]])[1]
            similarity = _exact_scores(matrix, sample.queries, candidates)
            ranked = _ranked(similarity, candidates)
            measured[nprobe] = {
                factor: sample.recall_of(_first(ranked, similarity, candidates, depth, k)[1])
                for factor, depth in depths.items()
            }
        return measured[nprobe]

    def cost(nprobe: int, factor: int) -> float:
        return nprobe * per_list + factor * RECALL_K * _RERANK_COST

    def cheapest() -> tuple[float, int, int] | None:
        reaching = [(cost(p, f), p, f) for p, got in measured.items() for f, r in got.items() if r >= recall]
        return min(reaching, default=None)

    nprobe = 1
    while measure(nprobe)[_K_FACTORS[0]] < recall and nprobe < nlist:
        nprobe = min(nlist, 2 * nprobe)
    best = cheapest()
    if best is None:
        return nlist, _K_FACTORS[0], measured[nlist][_K_FACTORS[0]]
    farthest = min(nlist, 8 * nprobe)
    while nprobe < farthest and any(
        got < recall and cost(min(farthest, 2 * nprobe), f) < best[0] for f, got in measured[nprobe].items()
    ):
        nprobe = min(farthest, 2 * nprobe)
        measure(nprobe)
        best = cheapest() or best
    _, nprobe, factor = best
    low = max((p for p, got in measured.items() if p < nprobe and got[factor] < recall), default=0) + 1
    high = nprobe - 1
    while low <= high:  # recall grows with nprobe: bisect between the last that missed and the first that reached
        middle = (low + high) // 2
        if measure(middle)[factor] >= recall:
            nprobe, high = middle, middle - 1
        else:
            low = middle + 1
    return nprobe, factor, measured[nprobe][factor]


def _build_hnsw(
    faiss: Any, matrix: np.ndarray, sample: _RecallSample, recall: float, block_rows: int
) -> tuple[Any, dict[str, Any], float]:
    num_rows, dim = matrix.shape
    m = 32
    index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
    _add_in_blocks(index, matrix, block_rows)

    def measure(ef: int) -> float:
        index.hnsw.efSearch = ef
        return sample.recall(_searcher(index, "hnsw", {}, matrix))

    ef, reached = _tune(measure, 16, max(16, min(4096, num_rows)), recall)
    index.hnsw.efSearch = ef
    return index, {"m": m, "ef_search": ef}, reached


# --------------------------------------------------------------------------- reading what strangers wrote


_PARAM_TYPES: dict[str, dict[str, type]] = {
    "flat": {"fallback_from": str, "best_recall": float},
    "ivf": {"nlist": int, "nprobe": int, "train_rows": int, "recall_queries": int},
    "hnsw": {"m": int, "ef_search": int, "recall_queries": int},
    "ivfpq": {"nlist": int, "nprobe": int, "m": int, "nbits": int, "k_factor": int, "train_rows": int,
              "recall_queries": int, "best_recall": float},
}
_REQUIRED_PARAMS = {"ivfpq": ("nlist", "nprobe", "m", "nbits", "k_factor")}  # the file's layout and its search


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
            if wanted is str and value not in APPROXIMATE:
                raise bad(f"params.{key}", value, " or ".join(map(repr, APPROXIMATE)))
        recall = data.get("recall_at_10")
        if recall is not None and not (_is_number(recall) and 0.0 <= recall <= 1.0):
            raise bad("recall_at_10", recall, "a number from 0 to 1, or null")
        sizes = {}
        for name in ("rows", "dim"):
            value = data.get(name)
            if not (_is_int(value) and 1 <= value < 1 << 40):
                raise bad(name, value, "a whole number from 1")
            sizes[name] = value
        for key in _REQUIRED_PARAMS.get(kind, ()):
            if key not in params:
                raise bad(f"params.{key}", None, f"a whole number from 1 (a {kind} index states it)")
        if kind == "ivfpq" and (sizes["dim"] % params["m"] or params["nbits"] > 8):
            raise bad("params", params, f"m dividing dim {sizes['dim']} and nbits from 1 to 8")
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
    """The FAISS index at ``path``, its header (and an IVF file's layout) checked against ``record`` and
    its size before FAISS reads it."""
    try:
        with open_regular_file(path) as fh:
            size = os.fstat(fh.fileno()).st_size
            _check_header(fh.read(_HEADER.size), size, record, path)
            if record.kind in _IVF_KINDS:
                _check_ivf_layout(_Fields(fh, size, path), record)
    except OSError as exc:
        raise MalformedIndexError(f"{path}: cannot read ({exc.strerror or exc})") from None
    # An IVF-PQ searched by inner product uses no precomputed table (FAISS builds one for L2 only), but
    # FAISS bounds the table it would build by the file's size, which refuses every honest file: skip it.
    flags = faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE if record.kind == "ivfpq" else 0
    try:
        with _faiss_limits(faiss, size):
            index = faiss.read_index(str(path), flags)
    except RuntimeError as exc:
        raise MalformedIndexError(f"{path}: unreadable FAISS index ({str(exc).splitlines()[0][:300]})") from None
    if (index.d, index.ntotal, index.metric_type) != (record.dim, record.rows, _METRIC_INNER_PRODUCT):
        raise MalformedIndexError(f"{path}: FAISS read {index.ntotal} x {index.d}, not {record.rows} x {record.dim}")
    _check_structure(faiss, index, record, path)
    return index


def _check_header(head: bytes, size: int, record: _IndexRecord, path: Path) -> None:
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
    if record.kind == "ivfpq":  # a code and a row number per row
        row_bytes = code_bytes(record.params["m"], record.params["nbits"]) + 8
        if ntotal * row_bytes > size:
            raise MalformedIndexError(f"{path}: the header claims {ntotal} rows of {row_bytes} bytes; it has {size}")
    elif ntotal * dim * 4 > size:  # the other kinds store the vectors as float32
        raise MalformedIndexError(f"{path}: the header claims {ntotal} vectors of {dim} floats; it has {size} bytes")
    if trained != 1 or metric != _METRIC_INNER_PRODUCT:  # every kind is trained once built; IVF searches only then
        raise MalformedIndexError(f"{path}: not a trained inner-product index written by mec-hub index")


class _Fields:
    """Little-endian fields of a file read in order, each one's end checked against the file's size first."""

    def __init__(self, fh: Any, size: int, path: Path) -> None:
        self.fh, self.size, self.path, self.at = fh, size, path, _HEADER.size

    def bad(self, what: str) -> MalformedIndexError:
        return MalformedIndexError(f"{self.path}: {what} (at byte {self.at} of {self.size})")

    def read(self, fmt: str) -> tuple[Any, ...]:
        layout = struct.Struct("<" + fmt)
        self.fh.seek(self.at)
        data = self.fh.read(layout.size) if self.at + layout.size <= self.size else b""
        if len(data) != layout.size:
            raise self.bad("truncated")
        self.at += layout.size
        return layout.unpack(data)

    def skip(self, count: int, item_bytes: int, what: str) -> None:
        if count * item_bytes > self.size - self.at:
            raise self.bad(f"{what}: {count} of {item_bytes} bytes claimed, past the end of the file")
        self.at += count * item_bytes

    def array(self, count: int, what: str) -> np.ndarray:
        """``count`` uint64 (FAISS's ``size_t``), read once their bytes are known to be there."""
        self.skip(count, 8, what)
        self.fh.seek(self.at - 8 * count)
        return np.frombuffer(self.fh.read(8 * count), dtype="<u8")


def _check_ivf_layout(fields: _Fields, record: _IndexRecord) -> None:
    """Walk an IVF file as ``save`` writes it (FAISS's ``IwFl`` or ``IwPQ``) and check every size in it.

    After the header: ``nlist``, ``nprobe``; the coarse quantizer, an ``IxFI`` of ``nlist`` vectors of
    ``d`` floats; an empty direct map; for ``IwPQ``, ``by_residual``, the code size and the product
    quantizer (``d``, ``m``, ``nbits``, ``d * 2**nbits`` floats); then the lists (``ilar``), their sizes
    (``full``, or ``sprs`` pairs) summing to ``ntotal``, and a code and a row number per row up to the
    file's last byte. A file that another FAISS class would read differently (a quantizer of another
    kind, lists on disk naming another file) is refused here, before FAISS allocates or opens anything.
    """
    dim, rows, params = record.dim, record.rows, record.params
    nlist, nprobe = fields.read("QQ")
    if nlist != params.get("nlist", nlist) or not 1 <= nlist <= rows or not 1 <= nprobe <= nlist:
        raise fields.bad(f"{nlist} lists and nprobe {nprobe}, its record says {params.get('nlist')} lists")
    fourcc, qdim, centroids, _, _, trained, metric = fields.read("4siqqqBi")
    if (fourcc, qdim, centroids, trained, metric) != (_FOURCC["flat"], dim, nlist, 1, _METRIC_INNER_PRODUCT):
        raise fields.bad(f"its coarse quantizer is not an inner-product flat index of {nlist} x {dim}")
    (floats,) = fields.read("Q")
    if floats != nlist * dim:
        raise fields.bad(f"its coarse quantizer holds {floats} floats, not {nlist} x {dim}")
    fields.skip(floats, 4, "the centroids")
    direct_map, mapped = fields.read("BQ")
    if direct_map or mapped:
        raise fields.bad("it keeps a direct map, which mec-hub index never writes")
    code_size = 4 * dim
    if record.kind == "ivfpq":
        by_residual, code_size, pq_dim, m, nbits = fields.read("BQQQQ")
        expected = (params["m"], params["nbits"], code_bytes(params["m"], params["nbits"]))
        if by_residual not in (0, 1) or pq_dim != dim or (m, nbits, code_size) != expected:
            raise fields.bad(
                f"product quantizer of {m} x {nbits} bits over {pq_dim} dimensions, codes of {code_size} bytes; "
                f"its record says {params['m']} x {params['nbits']} bits over {dim}"
            )
        (floats,) = fields.read("Q")
        if floats != dim << nbits:
            raise fields.bad(f"its product quantizer holds {floats} floats, not {dim} x {1 << nbits}")
        fields.skip(floats, 4, "the product quantizer's centroids")
    kind_of_lists, list_count, list_code_size, list_type, count = fields.read("4sQQ4sQ")
    if (kind_of_lists, list_count, list_code_size) != (b"ilar", nlist, code_size):
        raise fields.bad(f"its lists are {kind_of_lists!r} of {list_count} lists of {list_code_size}-byte codes, "
                         f"not 'ilar' of {nlist} of {code_size}")
    if list_type == b"full" and count == nlist:
        sizes = fields.array(count, "the list sizes")
    elif list_type == b"sprs" and count % 2 == 0 and count <= 2 * nlist:
        pairs = fields.array(count, "the list sizes").reshape(-1, 2)
        if len(pairs) and (pairs[-1, 0] >= nlist or np.any(np.diff(pairs[:, 0].astype(np.int64)) <= 0)):
            raise fields.bad("its sparse list sizes name lists out of order or out of range")
        sizes = pairs[:, 1]
    else:
        raise fields.bad(f"its list sizes are {list_type!r} of {count} numbers for {nlist} lists")
    if sum(sizes.tolist()) != rows:
        raise fields.bad(f"its list sizes do not add up to its {rows} rows")
    if fields.size - fields.at != rows * (code_size + 8):
        raise fields.bad(f"{fields.size - fields.at} bytes left for {rows} codes of {code_size} bytes and row numbers")


def _check_structure(faiss: Any, index: Any, record: _IndexRecord, path: Path) -> None:
    """The row numbers an index can answer are ``0`` to ``rows - 1``, each once in an IVF index; an HNSW
    graph stays inside itself. What FAISS read, checked again (``_check_ivf_layout`` read the bytes)."""
    rows = record.rows
    if record.kind in _IVF_KINDS:
        ivf = faiss.extract_index_ivf(index)
        nlist = ivf.nlist
        if record.params.get("nlist", nlist) != nlist or ivf.quantizer.ntotal != nlist:
            raise MalformedIndexError(f"{path}: {nlist} lists, {ivf.quantizer.ntotal} centroids; its record says "
                                      f"{record.params.get('nlist')}")
        if record.kind == "ivfpq":
            ivf = faiss.downcast_index(index)
            if not isinstance(ivf, faiss.IndexIVFPQ) or isinstance(ivf, faiss.IndexIVFPQR):
                raise MalformedIndexError(f"{path}: FAISS read a {type(ivf).__name__}, not an IndexIVFPQ")
            pq = ivf.pq
            code_size = code_bytes(pq.M, pq.nbits)
            if (pq.d, pq.M, pq.nbits) != (record.dim, record.params["m"], record.params["nbits"]):
                raise MalformedIndexError(f"{path}: a product quantizer of {pq.M} x {pq.nbits} bits over {pq.d} "
                                          f"dimensions, not the record's {record.params['m']} x "
                                          f"{record.params['nbits']} over {record.dim}")
        else:
            code_size = 4 * record.dim
        if ivf.code_size != code_size or ivf.quantizer.d != record.dim:
            raise MalformedIndexError(f"{path}: codes of {ivf.code_size} bytes, not {code_size}")
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
    if kind == "ivfpq":
        _check_codes(faiss, index, matrix, path)
        return
    for rows, vectors in _stored_vectors(faiss, index, kind):
        order = np.argsort(rows)
        wanted = normalise(matrix[rows[order]])
        if not np.allclose(vectors[order], wanted, rtol=0.0, atol=1e-5):
            raise StaleIndexError(
                f"{path}: its vectors are not the rows of the feature set it is used with; rebuild it: "
                f"mec-hub index FEATURES --out {path}"
            )


def _check_codes(faiss: Any, index: Any, matrix: np.ndarray, path: Path, sample: int = 256) -> None:
    """The codes of an ivfpq index encode the set's rows: on a sample of stored codes, row ``i``'s decoded
    code is as near row ``i`` as the row encoded afresh by the same quantizers (the mean squared error
    within 1.5 times, which a code of another row misses by far; NaN centroids fail it too).

    A code only approximates its row, so this cannot be exact like ``_check_vectors``; nor need it be:
    ``search`` re-ranks from the set, so altered codes can only cost recall, never give a wrong score.
    It catches what matters, an index of another set whose record claims this one.
    """
    ivf = faiss.downcast_index(index)
    sizes = np.array([ivf.invlists.list_size(number) for number in range(ivf.nlist)], dtype=np.int64)
    picks = np.sort(np.random.default_rng(0).choice(ivf.ntotal, size=min(sample, ivf.ntotal), replace=False))
    ends = np.cumsum(sizes)
    lists = np.searchsorted(ends, picks, side="right")
    offsets = picks - (ends[lists] - sizes[lists])
    codes = np.empty((len(picks), ivf.code_size), dtype=np.uint8)
    rows = np.empty(len(picks), dtype=np.int64)
    for i, (number, offset) in enumerate(zip(lists.tolist(), offsets.tolist(), strict=True)):
        at = offset * ivf.code_size
        codes[i] = faiss.rev_swig_ptr(ivf.invlists.get_codes(number), (offset + 1) * ivf.code_size)[at:]
        rows[i] = faiss.rev_swig_ptr(ivf.invlists.get_ids(number), offset + 1)[offset]
    wanted = normalise(matrix[rows])
    with np.errstate(over="ignore", invalid="ignore"):  # a hostile file's centroids may be inf or NaN: refused below
        stored = ivf.pq.decode(codes)
        if ivf.by_residual:
            quantizer = faiss.downcast_index(ivf.quantizer)
            stored += faiss.rev_swig_ptr(quantizer.get_xb(), ivf.nlist * ivf.d).reshape(ivf.nlist, ivf.d)[lists]
        fresh = ivf.sa_decode(ivf.sa_encode(wanted))
        error, expected = (float(np.mean(np.sum((got - wanted) ** 2, axis=1))) for got in (stored, fresh))
    if not error <= 1.5 * expected + 1e-6:
        raise StaleIndexError(
            f"{path}: its codes do not encode the rows of the feature set it is used with (error {error:.3g}, "
            f"{expected:.3g} expected); rebuild it: mec-hub index FEATURES --out {path}"
        )


def _recorded_source(path: Path, record: _IndexRecord) -> Path:
    """The feature set an ivfpq index records as its source: as recorded, else the same name beside the
    index (the two moved together); ``load`` checks its SHA-256 as it would a set passed to it."""
    recorded = Path(record.source) if record.source else None
    for candidate in (recorded, path.parent / recorded.name if recorded else None):
        if candidate is not None and (candidate.is_file() or parquet_shards(candidate)):
            return candidate
    raise MecHubError(
        f"{path} re-ranks from the feature set it was built from ({record.source or 'an array, not a file'}), "
        "which is not there; pass it: features=FEATS (mec-hub search FEATS --index "
        f"{path}), or rebuild the index"
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
