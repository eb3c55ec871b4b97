"""Fuzzing the feature-set readers: an ``.npy`` set (``X.npy`` + ``X.paths.txt`` + ``X.meta.json``)
and a Parquet shard set, truncated, with bytes flipped and with hostile row counts in their headers.

Whatever the damage, ``FeatureFile.open`` gives one ``MecHubError`` or exactly the rows and paths
written (typed out here, not read back through the code under test), in a process that could not
allocate what a hostile header claims (``memory_cap``: a ``MemoryError`` is a failure).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mec_hub.data.featurefile import FeatureFile
from mec_hub.errors import MecHubError

ROWS = np.array([[0.5, -1.0, 2.0], [3.25, 0.0, -0.125], [1e-3, 7.0, -8.5], [4.0, 4.5, 5.0]], dtype="<f4")
PATHS = ["cat/1.png", "cat/2.png", "dog/café.png", "dog/4.png"]
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def npy_bytes(shape: tuple[int, ...], data: bytes) -> bytes:
    """A version 1.0 ``.npy`` of float32 typed out by hand (magic, header length, header, data)."""
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape!r}, }}".encode("latin1")
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + data


def _originals(folder: Path) -> dict[str, bytes]:
    (folder / "x.npy").write_bytes(npy_bytes(ROWS.shape, ROWS.tobytes()))
    (folder / "x.paths.txt").write_bytes("".join(p + "\n" for p in PATHS).encode())
    # What the writer ties the set with, computed here independently of the module under test.
    import hashlib

    npy = (folder / "x.npy").read_bytes()
    meta = {
        "model": "m",
        "shape": list(ROWS.shape),
        "run_id": "0" * 32,
        "paths_sha256": hashlib.sha256((folder / "x.paths.txt").read_bytes()).hexdigest(),
        "features_ends_sha256": hashlib.sha256(f"{len(npy)}\n".encode() + npy).hexdigest(),
    }
    (folder / "x.meta.json").write_text(json.dumps(meta))
    return {name: (folder / name).read_bytes() for name in ("x.npy", "x.paths.txt", "x.meta.json")}


def damaged(data: bytes, mutation: tuple) -> bytes:
    kind = mutation[0]
    if kind == "truncate":
        return data[: mutation[1] % (len(data) + 1)]
    if kind == "flip":
        at = mutation[1] % len(data)
        return data[:at] + bytes([data[at] ^ mutation[2]]) + data[at + 1 :]
    raise AssertionError(kind)


def assert_rows_or_refused(path: Path, memory_cap) -> None:  # type: ignore[no-untyped-def]
    with memory_cap(512 << 20):
        try:
            opened = FeatureFile.open(path)
        except MecHubError as exc:
            assert str(exc) and "\n" not in str(exc).strip()
            return
    assert opened.matrix.dtype == np.float32 and opened.matrix.tolist() == ROWS.tolist()
    assert opened.paths == PATHS


byte_damage = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 1 << 20)),
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(1, 255)),
)


@FUZZ
@given(target=st.sampled_from(["x.npy", "x.paths.txt", "x.meta.json"]), mutation=byte_damage)
def test_npy_set_with_damaged_bytes(tmp_path: Path, memory_cap, target: str, mutation: tuple):
    originals = _originals(tmp_path)
    (tmp_path / target).write_bytes(damaged(originals[target], mutation))
    assert_rows_or_refused(tmp_path / "x.npy", memory_cap)


@FUZZ
@given(
    shape=st.lists(st.integers(0, 1 << 64), min_size=0, max_size=3).map(tuple),
    keep_meta=st.booleans(),
)
def test_npy_header_with_hostile_shape(tmp_path: Path, memory_cap, shape: tuple, keep_meta: bool):
    _originals(tmp_path)
    (tmp_path / "x.npy").write_bytes(npy_bytes(shape, ROWS.tobytes()))
    if not keep_meta:  # no digests to refuse it by: only the header against the bytes present
        (tmp_path / "x.meta.json").unlink()
    with memory_cap(512 << 20):
        try:
            opened = FeatureFile.open(tmp_path / "x.npy")
        except MecHubError:
            return
    assert shape == ROWS.shape or (not keep_meta and len(shape) == 2 and shape[0] == 4 and shape[0] * shape[1] == 12)
    assert opened.matrix.tolist() == ROWS.tolist()


pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture(scope="module")
def parquet_set(tmp_path_factory: pytest.TempPathFactory) -> Shards:
    """The rows as two Parquet shards of 2 rows, written by ``write_parquet`` from the hand-made set."""
    from mec_hub.data.featurefile import write_parquet

    folder = tmp_path_factory.mktemp("parquet")
    _originals(folder)
    written = write_parquet(FeatureFile.open(folder / "x.npy"), folder / "x.parquet", shard_rows=2)
    assert [p.name for p in written] == ["x-00000.parquet", "x-00001.parquet"]
    for file, rows in zip(written, (ROWS[:2], ROWS[2:]), strict=True):  # checked with pyarrow alone
        table = pq.read_table(file)
        assert np.array(table.column("embedding").to_pylist(), dtype=np.float32).tolist() == rows.tolist()
    return Shards({p.name: p.read_bytes() for p in written})


class Shards(dict):
    """File name -> bytes, shown by its names alone in Hypothesis' report of a failing case."""

    def __repr__(self) -> str:
        return f"Shards({sorted(self)})"


def _claim_rows(data: bytes, rows: int, claimed: int) -> bytes:
    """``data`` with the footer's i64 fields holding ``rows`` (num_rows of the file and of the row
    group, the path column's num_values) set to ``claimed`` (Thrift compact: 0x16, zigzag varint)."""
    import tempfile

    from tests.support.parquet import claim_rows  # the one crafting helper, with its own test (data/test_parquet.py)

    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "in.parquet", Path(folder) / "out.parquet"
        source.write_bytes(data)
        claim_rows(source, target, rows, claimed)
        return target.read_bytes()


@FUZZ
@given(
    target=st.sampled_from(["x-00000.parquet", "x-00001.parquet"]),
    mutation=st.one_of(
        byte_damage,
        # bytes of the footer (the last few hundred), where a flip changes counts, offsets and types
        st.tuples(st.just("flip_end"), st.integers(1, 1200), st.integers(1, 255)),
        st.tuples(st.just("rows"), st.integers(0, 1 << 62)),
    ),
)
def test_parquet_set_with_damaged_bytes(tmp_path: Path, memory_cap, parquet_set: dict, target: str, mutation: tuple):
    for name, data in parquet_set.items():
        (tmp_path / name).write_bytes(data)
    data = parquet_set[target]
    if mutation[0] == "flip_end":
        mutation = ("flip", len(data) - min(mutation[1], len(data)), mutation[2])
    data = _claim_rows(data, 2, mutation[1]) if mutation[0] == "rows" else damaged(data, mutation)
    (tmp_path / target).write_bytes(data)
    assert_rows_or_refused(tmp_path / "x.parquet", memory_cap)
