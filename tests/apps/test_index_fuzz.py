"""Fuzz ``FeatureIndex.load``: damaged and hostile index files and records, under a memory cap.

Each example writes an index file changed at random (truncated, bits flipped, a header field set to
any 64-bit value) with a record that agrees with it (its SHA-256, as a stranger can make it), then
loads it with the feature set it claims. The outcome must be one ``MecHubError``, or an index whose
answers are rows of the set at their true cosine scores (checked here with NumPy), and for an exact
index the true nearest rows; never a ``MemoryError``, another exception or a crash.

About crashes: ``load`` checks the FAISS header (fourcc, dimension, row count against the record and
against the file's size) and, for the IVF kinds, every size in the file's layout before FAISS reads the
file, bounds FAISS's own allocations by the file's size, and after reading checks what a search would
follow (IVF row numbers, the HNSW graph's links and levels; an IVF-PQ's codes are decoded on a sample).
Thousands of such mutations of each kind ran without a crash while this was written; FAISS 1.15 itself
also validates the HNSW graph on reading. An IVF-PQ index answers re-ranked rows, so its scores are
exact whatever its codes say.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mec_hub.apps.index import FeatureIndex
from mec_hub.errors import MecHubError
from tests.support.faiss_files import ivf_fields

ROWS, DIM = 300, 8
CAP = 512 * 2**20
KINDS = ["flat", "ivf", "hnsw", "ivfpq"]


class Built(dict):
    def __repr__(self) -> str:  # Hypothesis prints the arguments of a failing example: not the arrays
        return f"Built({sorted(self)})"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """Per kind: the feature set, the index file's bytes, its record, the rows and the ``(offset, width)``
    of the header fields (and of an IVF file's, ``ivf_fields``) a mutation aims at."""
    folder = tmp_path_factory.mktemp("fuzz")
    matrix = np.random.default_rng(0).normal(size=(ROWS, DIM)).astype(np.float32)
    feats = folder / "f.npy"
    np.save(feats, matrix)
    out = Built()
    for kind in KINDS:
        index = FeatureIndex.build(feats, kind=kind, recall=0.5, sample_queries=30)
        assert index.kind == kind
        path = index.save(folder / f"{kind}.index")
        data = path.read_bytes()
        # d, ntotal and the first 8 bytes after the header (a flat index's vector length, an IVF's nlist).
        fields = [(4, 4), (8, 8), (37, 8)]
        if kind in ("ivf", "ivfpq"):
            fields = sorted(set(fields) | set(ivf_fields(data).values()))
        out[kind] = (feats, data, json.loads((folder / f"{kind}.index.json").read_text()), matrix, fields)
    return out


def mutate(data: bytes, draw: st.DrawFn, fields: list[tuple[int, int]]) -> bytes:
    how = draw(st.sampled_from(["truncate", "flip", "field"]))
    if how == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    changed = bytearray(data)
    if how == "flip":
        for _ in range(draw(st.integers(1, 4))):
            position = draw(st.integers(0, len(changed) - 1))
            changed[position] ^= 1 << draw(st.integers(0, 7))
        return bytes(changed)
    # A field of the layout (``built``'s ``fields``) or any 8 bytes, set to any value.
    position, width = draw(st.one_of(st.sampled_from(fields), st.tuples(st.integers(0, len(changed) - 8), st.just(8))))
    value = draw(st.integers(-(2 ** (8 * width - 1)), 2 ** (8 * width - 1) - 1))
    changed[position : position + width] = value.to_bytes(width, "little", signed=True)
    return bytes(changed)


def check_answers(index: FeatureIndex, kind: str, matrix: np.ndarray) -> None:
    queries = np.random.default_rng(1).normal(size=(4, DIM)).astype(np.float32)
    scores, rows = index.search(queries, 5)
    assert rows.shape == (4, 5) and np.all((rows >= -1) & (rows < ROWS))
    unit = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    for i in range(4):
        found = rows[i][rows[i] >= 0]
        np.testing.assert_allclose(scores[i][: len(found)], unit[found] @ q[i], atol=1e-4)
        if kind == "flat":
            best = np.sort(unit @ q[i])[::-1][:5]
            np.testing.assert_allclose(np.sort(scores[i])[::-1], best, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_index_files_give_a_clear_error_or_a_correct_index(
    built: dict, kind: str, data: st.DataObject, tmp_path: Path, memory_cap
):
    feats, original, record, matrix, fields = built[kind]
    damaged = mutate(original, data.draw, fields)
    path = tmp_path / "x.index"
    path.write_bytes(damaged)
    (tmp_path / "x.index.json").write_text(json.dumps({**record, "index_sha256": hashlib.sha256(damaged).hexdigest()}))
    try:
        with memory_cap(CAP):
            index = FeatureIndex.load(path, features=feats)
    except MecHubError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
        return
    check_answers(index, kind, matrix)


_ANY_JSON = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(
        st.sampled_from(["nprobe", "nlist", "ef_search", "m", "nbits", "k_factor", "x"]),
        st.integers(-5, 2**40),
        max_size=3,
    ),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(KINDS), changes=st.dictionaries(
    st.sampled_from(["format", "kind", "params", "recall_at_10", "rows", "dim", "source", "source_sha256",
                     "index_sha256", "build_seconds"]), _ANY_JSON, min_size=1, max_size=3))
def test_any_record_gives_a_clear_error_naming_it_or_a_correct_index(
    built: dict, kind: str, changes: dict, tmp_path: Path, memory_cap
):
    feats, original, record, matrix, _ = built[kind]
    path = tmp_path / "x.index"
    path.write_bytes(original)
    record_file = tmp_path / "x.index.json"
    record_file.write_text(json.dumps({**record, **changes}))
    try:
        with memory_cap(CAP):
            index = FeatureIndex.load(path, features=feats)
    except MecHubError as exc:
        assert "\n" not in str(exc) and (str(record_file) in str(exc) or str(path) in str(exc))
        return
    check_answers(index, kind, matrix)
