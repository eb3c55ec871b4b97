"""Where the fields of the FAISS files ``mec-hub index`` writes lie, read here from FAISS's format
(``faiss/impl/index_write.cpp``), for tests that change them one at a time."""

from __future__ import annotations

import struct


def ivf_fields(data: bytes) -> dict[str, tuple[int, int]]:
    """``name -> (offset, width)`` of the fields of an ``IwFl`` (IVF-flat) or ``IwPQ`` (IVF-PQ) file.

    The header (fourcc, d, ntotal, two unused, is_trained, metric) is 37 bytes; then nlist, nprobe, the
    coarse quantizer (an ``IxFI``: fourcc, its own header, the float count and the floats), the direct
    map (a type byte and a count); for ``IwPQ``, by_residual (a byte), the code size, the product
    quantizer's d, M, nbits and float count and floats; then the lists: ``ilar``, nlist, code size,
    ``full``, the count of sizes and the sizes.
    """
    dim = struct.unpack_from("<i", data, 4)[0]
    nlist = struct.unpack_from("<Q", data, 37)[0]
    at = {"d": (4, 4), "ntotal": (8, 8), "nlist": (37, 8), "nprobe": (45, 8), "quantizer": (53, 4),
          "quantizer_d": (57, 4), "quantizer_ntotal": (61, 8), "centroid_floats": (90, 8)}
    offset = 98 + 4 * nlist * dim
    at["direct_map"] = (offset, 1)
    offset += 9
    if data[:4] == b"IwPQ":
        at.update(by_residual=(offset, 1), code_size=(offset + 1, 8), pq_d=(offset + 9, 8), pq_m=(offset + 17, 8),
                  pq_nbits=(offset + 25, 8), pq_floats=(offset + 33, 8))
        nbits = struct.unpack_from("<Q", data, offset + 25)[0]
        offset += 41 + 4 * (dim << nbits)
    at.update(lists=(offset, 4), list_count=(offset + 4, 8), list_code_size=(offset + 12, 8),
              list_type=(offset + 20, 4), size_count=(offset + 24, 8), first_size=(offset + 32, 8))
    return at
