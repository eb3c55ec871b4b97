"""The streaming .npy writer: np.load reads what it writes, and a resume cuts unfinished rows."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from mec_hub.embedding.npy_writer import HEADER_SIZE, NpyRowWriter, npy_header, read_npy_header


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_rows_appended_in_blocks_load_with_numpy(tmp_path: Path, dtype: str):
    data = np.random.default_rng(0).normal(size=(37, 6)).astype(dtype)
    path = tmp_path / "x.npy"
    writer = NpyRowWriter.create(path, 6, dtype)
    for start in range(0, 37, 8):
        writer.append(data[start : start + 8])
    writer.finish()
    loaded = np.load(path, mmap_mode="r")
    assert loaded.dtype == np.dtype(dtype) and loaded.shape == (37, 6)
    assert np.array_equal(loaded, data)
    assert path.stat().st_size == HEADER_SIZE + data.nbytes


def test_resume_drops_rows_written_after_the_checkpoint(tmp_path: Path):
    data = np.arange(40, dtype=np.float32).reshape(10, 4)
    path = tmp_path / "x.npy"
    writer = NpyRowWriter.create(path, 4, "float32")
    writer.append(data[:6])
    writer.sync()  # checkpoint: 6 rows
    writer.append(np.full((3, 4), -1, np.float32))  # an unfinished batch, never checkpointed
    writer.close()
    writer = NpyRowWriter.open_for_resume(path, 4, "float32", rows=6)
    writer.append(data[6:])
    writer.finish()
    assert np.array_equal(np.load(path), data)


def test_resume_refuses_a_file_shorter_than_its_checkpoint(tmp_path: Path):
    path = tmp_path / "x.npy"
    writer = NpyRowWriter.create(path, 4, "float32")
    writer.append(np.zeros((2, 4), np.float32))
    writer.close()
    with pytest.raises(ValueError, match="fewer than the 5 rows"):
        NpyRowWriter.open_for_resume(path, 4, "float32", rows=5)


@pytest.mark.parametrize("dtype", ["float16", "float32", ">f4"])
@pytest.mark.parametrize("rows", [0, 1, 7])
def test_header_is_fixed_size_and_parses_back(tmp_path: Path, rows: int, dtype: str):
    header = npy_header(rows, 5, np.dtype(dtype))
    assert len(header) == HEADER_SIZE and HEADER_SIZE % 64 == 0  # the data starts aligned
    data = (np.arange(rows * 5) * 1.5 - 4).reshape(rows, 5).astype(dtype)
    path = tmp_path / "x.npy"
    path.write_bytes(header + data.tobytes())
    loaded = np.load(path)
    assert loaded.dtype == np.dtype(dtype) and loaded.shape == (rows, 5) and loaded.flags.c_contiguous
    assert np.array_equal(loaded, data)


def test_header_parses_back_for_a_huge_row_count():
    header = npy_header(10**12, 2048, np.dtype("float16"))
    assert len(header) == HEADER_SIZE
    stream = io.BytesIO(header)
    assert np.lib.format.read_magic(stream) == (1, 0)
    assert np.lib.format.read_array_header_1_0(stream) == ((10**12, 2048), False, np.dtype("float16"))
    assert stream.tell() == HEADER_SIZE


def test_header_round_trip(tmp_path: Path):
    path = tmp_path / "x.npy"
    path.write_bytes(npy_header(3, 5, np.dtype("float32")) + bytes(3 * 5 * 4))
    assert read_npy_header(path) == (3, 5, np.dtype("float32"))
    assert np.load(path).shape == (3, 5)
