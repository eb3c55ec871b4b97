"""Parquet files crafted byte by byte, for the tests of readers of files from strangers."""

from __future__ import annotations

import struct
from pathlib import Path


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def claim_rows(source: Path, target: Path, rows: int, claimed: int) -> None:
    """``source`` with every i64 field that holds ``rows`` (the file's and the row group's ``num_rows``,
    the columns' ``num_values``) set to ``claimed`` in its Thrift footer (compact protocol: field
    header 0x16, then the zigzag varint)."""
    data = source.read_bytes()
    length = struct.unpack("<I", data[-8:-4])[0]
    footer = data[-8 - length : -8]
    old, new = b"\x16" + _varint(rows << 1), b"\x16" + _varint(claimed << 1)
    assert footer.count(old) >= 2  # the file's and the row group's num_rows
    footer = footer.replace(old, new)
    target.write_bytes(data[: -8 - length] + footer + struct.pack("<I", len(footer)) + b"PAR1")
