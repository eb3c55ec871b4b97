"""A ``.npy`` file written row by row, never held in memory, readable by ``np.load`` once finished.

The header has a fixed size (``HEADER_SIZE`` bytes, ``.npy`` format 1.0, space-padded as the
format allows), so the final row count can be written into it at the end without moving the
data. While rows are being appended the header says 0 rows; ``finish`` writes the real shape.
``open_for_resume`` reopens a file at a known row count, cutting off rows written after the
last checkpoint.
"""

from __future__ import annotations

import ast
import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"\x93NUMPY\x01\x00"
HEADER_SIZE = 128  # a multiple of 64, room for any (rows, dim) that fits in 64 bits
_PREFIX = len(MAGIC) + 2  # magic, version, uint16 header length


def npy_header(rows: int, dim: int, dtype: np.dtype) -> bytes:
    """A ``.npy`` 1.0 header for a C-ordered ``(rows, dim)`` array, exactly ``HEADER_SIZE`` bytes."""
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': ({rows}, {dim}), }}"
    body_len = HEADER_SIZE - _PREFIX
    if len(text) + 1 > body_len:
        raise ValueError(f"shape ({rows}, {dim}) does not fit a {HEADER_SIZE}-byte .npy header")
    body = text + " " * (body_len - len(text) - 1) + "\n"
    return MAGIC + struct.pack("<H", body_len) + body.encode("latin1")


def read_npy_header(path: str | os.PathLike[str]) -> tuple[int, int, np.dtype]:
    """(rows, dim, dtype) from the header of a file written by this module."""
    with open(path, "rb") as fh:
        head = fh.read(HEADER_SIZE)
    if len(head) < HEADER_SIZE or head[: len(MAGIC)] != MAGIC:
        raise ValueError(f"{path}: not a .npy file written by mec-embed")
    try:
        info = ast.literal_eval(head[_PREFIX:].decode("latin1").strip())
        rows, dim = info["shape"]
        return int(rows), int(dim), np.dtype(info["descr"])
    except (ValueError, SyntaxError, TypeError, KeyError, MemoryError, RecursionError) as exc:
        raise ValueError(f"{path}: its .npy header is damaged ({type(exc).__name__})") from None


class NpyRowWriter:
    """Appends ``(n, dim)`` blocks of one dtype to a ``.npy`` file; ``finish`` seals the header."""

    def __init__(self, path: str | os.PathLike[str], dim: int, dtype: np.dtype | str, *, rows: int = 0) -> None:
        self.path = Path(path)
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)
        self.rows = rows
        # Opened by ``create`` or ``open_for_resume``, which leave the header in place.
        self._fh = open(self.path, "r+b")  # noqa: SIM115
        self._fh.seek(HEADER_SIZE + rows * self.row_bytes)

    @property
    def row_bytes(self) -> int:
        return self.dim * self.dtype.itemsize

    @classmethod
    def create(cls, path: str | os.PathLike[str], dim: int, dtype: np.dtype | str) -> NpyRowWriter:
        with open(path, "wb") as fh:
            fh.write(npy_header(0, dim, np.dtype(dtype)))
        return cls(path, dim, dtype)

    @classmethod
    def open_for_resume(cls, path: str | os.PathLike[str], dim: int, dtype: np.dtype | str, rows: int) -> NpyRowWriter:
        """Reopen after ``rows`` checkpointed rows; rows beyond them (an unfinished batch) are dropped."""
        _, file_dim, file_dtype = read_npy_header(path)
        if file_dim != dim or file_dtype != np.dtype(dtype):
            raise ValueError(f"{path}: holds {file_dim}-d {file_dtype} rows, expected {dim}-d {np.dtype(dtype)}")
        expected = HEADER_SIZE + rows * dim * np.dtype(dtype).itemsize
        size = os.path.getsize(path)
        if size < expected:
            raise ValueError(f"{path}: has {size} bytes, fewer than the {rows} rows recorded as done")
        writer = cls(path, dim, dtype, rows=rows)
        writer._fh.truncate(expected)
        return writer

    def append(self, block: np.ndarray) -> None:
        if block.ndim != 2 or block.shape[1] != self.dim:
            raise ValueError(f"expected rows of shape (n, {self.dim}), got {block.shape}")
        self._fh.write(np.ascontiguousarray(block, dtype=self.dtype).tobytes())
        self.rows += block.shape[0]

    def append_file_rows(self, other: str | os.PathLike[str], rows: int) -> None:
        """Append the first ``rows`` rows of another file written by this module (merging parts)."""
        with open(other, "rb") as src:
            src.seek(HEADER_SIZE)
            remaining = rows * self.row_bytes
            while remaining:
                chunk = src.read(min(remaining, 1 << 24))
                if not chunk:
                    raise ValueError(f"{other}: ends before its {rows} recorded rows")
                self._fh.write(chunk)
                remaining -= len(chunk)
        self.rows += rows

    def sync(self) -> None:
        """Make everything appended so far durable (before a checkpoint says it is there)."""
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def finish(self) -> None:
        """Write the final shape into the header, sync and close."""
        self._fh.flush()
        self._fh.seek(0)
        self._fh.write(npy_header(self.rows, self.dim, self.dtype))
        self._fh.seek(0, os.SEEK_END)
        self.sync()
        self._fh.close()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            self._fh.close()
