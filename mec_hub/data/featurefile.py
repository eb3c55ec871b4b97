"""The feature-file format: ``X.npy`` with ``X.paths.txt`` and ``X.meta.json`` beside it.

``mec-embed`` writes it, ``mec-hub search`` and ``mec-hub eval`` read it, and so may anyone with
NumPy and a text editor:

* ``X.npy``: an ``(N, D)`` array of numbers (float32 or float16), a plain ``.npy`` file;
* ``X.paths.txt``: line ``i`` is the image of row ``i`` (valid UTF-8, ``\\n`` after every line).
  A name no line can hold is never written: one with a line break, or a POSIX file name whose
  bytes are not valid UTF-8 (``bad\\xff.jpg``). ``mec-embed`` lists such a file among the failures
  in ``X.meta.json``, its ``"path"`` decoded as Python's ``surrogateescape`` does (byte ``0xff``
  as ``"\\udcff"``), so the name still round-trips there; renamed to UTF-8 (``convmv``), it is
  embedded;
* ``X.meta.json``: a JSON object, ``FeatureMeta``: which model made the rows (name, weights and
  their SHA-256, head, preprocessing), with which options, and what happened in the run.

The three files are one set, published one at a time, ``X.meta.json`` last, and the meta names
the other two: ``run_id`` (a random id of the run that wrote the set), ``paths_sha256`` (SHA-256
of ``X.paths.txt``), ``shape`` and ``features_ends_sha256`` (SHA-256 of the ``.npy``'s size in
decimal and a newline, then its first MiB and, when longer, its last MiB: cheap on a file of any
size). ``FeatureFile.open`` checks them where present and refuses a set whose files do not
belong together, as a run killed while replacing an older set leaves it, so no reader pairs the
files of two runs.

The record is versioned by ``"format_version"`` (``FORMAT_VERSION``); a record without it
(written by ``mec-hub eval --save-features``, or by hand) reads as version 1, the layout
described here. This module is the only place that names, reads or writes these files.

The same rows may be published as Parquet (``write_parquet``; needs ``pyarrow``, the ``parquet``
extra): ``X.parquet``, or ``X-00000.parquet``, ``X-00001.parquet`` ... of at most ``shard_rows``
rows each, with the columns ``path`` (string) and ``embedding`` (fixed-size list of float32 or
float16), and the meta record, as JSON, under the key ``mec_hub.meta`` of each file's key-value
metadata (its ``shape`` that file's; ``row_offset`` where its first row is in the whole set,
``shard_index`` and ``shard_count`` which file of how many, ``set_rows`` the rows of the whole set,
``set_id`` a random id of the conversion that wrote it). ``FeatureFile.open`` reads both; for
``X.parquet`` absent, it reads the ``X-NNNNN.parquet`` shards in order, as one set, and refuses a
set that is not exactly the one its first shard names: a shard missing, one left over from an older
conversion, one of another set. Shards written before ``shard_count`` existed (``row_offset``
only) read as before, their offsets checked. Each file's footer is read and checked first (schema,
row counts against each other, against the meta and against the file's size, see
``PARQUET_MAX_EXPANSION``); only then are its columns read, a row group at a time.

Every count a header states (``.npy`` shape, Parquet ``num_rows``) is checked against the bytes
really present before anything is allocated or mapped.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import tokenize
import types
import typing
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from mec_hub.errors import MalformedFileError, MecHubError
from mec_hub.fileio import (
    NotRegularFileError,
    atomic_write,
    atomic_write_json,
    fsync_dir,
    open_regular_file,
    parse_json,
    read_bounded,
    read_json,
)

FORMAT = "mec-embed"
FORMAT_VERSION = 1
PATHS_SUFFIX = ".paths.txt"
META_SUFFIX = ".meta.json"
PATHS_ENCODING = "utf-8"  # strictly: a name that is not valid UTF-8 is not written (see the docstring)
ENDS_BYTES = 1 << 20  # how much of each end of X.npy ``features_ends_sha256`` covers
PARQUET_SUFFIX = ".parquet"
PARQUET_META_KEY = b"mec_hub.meta"
PARQUET_BLOCK_ROWS = 65536  # rows converted at a time (a row group): memory stays bounded
MAX_PATHS_BYTES = 1 << 34  # a paths file read without a row count to bound it (16 GiB)
MAX_PATH_LINE_BYTES = 4096 + 1  # PATH_MAX and its line end: what one row's line may hold
# A Parquet file's rows are believed only up to this many bytes of matrix per byte of file (plus
# the slack below): float rows compress about 1:1, a column of zeros written plain with Snappy
# about 20:1; a footer claiming more is damaged or hostile, refused before any column is read.
PARQUET_MAX_EXPANSION = 64
PARQUET_EXPANSION_SLACK = 64 << 20


class PathNameError(MecHubError, ValueError):
    """A name that cannot be a line of ``X.paths.txt``."""


def sidecar(features_path: str | os.PathLike[str], suffix: str) -> Path:
    """``X.npy`` -> ``X<suffix>`` (``X.paths.txt``, ``X.meta.json``); a name without ``.npy`` keeps its stem."""
    path = Path(features_path)
    stem = path.name[: -len(".npy")] if path.name.endswith(".npy") else path.name
    return path.with_name(stem + suffix)


# --------------------------------------------------------------------------- X.paths.txt


def path_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a line of ``X.paths.txt`` (one plain sentence), or ``None`` when it can."""
    if "\n" in name or "\r" in name:
        return f"its name contains a line break, which a line of {PATHS_SUFFIX} cannot hold"
    try:
        name.encode(PATHS_ENCODING)
    except UnicodeEncodeError:
        raw = os.fsencode(name) if os.name != "nt" else name.encode(PATHS_ENCODING, "surrogatepass")
        return (
            f"its name is not valid UTF-8 ({raw!r}), which {PATHS_SUFFIX} cannot hold; "
            "rename the file to UTF-8 (e.g. with convmv) to embed it"
        )
    return None


def _read_paths(path: str | os.PathLike[str], *, max_bytes: int = MAX_PATHS_BYTES) -> tuple[list[str], str]:
    """(lines, SHA-256 of the file's bytes); a file over ``max_bytes`` is refused before it is read."""
    try:
        data = read_bounded(path, max_bytes, what="paths file")
        text = data.decode(PATHS_ENCODING)
    except FileNotFoundError:
        raise MecHubError(f"paths file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise MalformedFileError(f"{path}: unreadable paths file, not UTF-8 at byte {exc.start}") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines, hashlib.sha256(data).hexdigest()


def read_paths(path: str | os.PathLike[str]) -> list[str]:
    """Lines of a paths file (``X.paths.txt``), without the line ends; a trailing empty line is ignored."""
    return _read_paths(path)[0]


def _write_paths(target: Path, names: Iterable[str], rows: int) -> str:
    """Write ``names``, one per line, checking there are ``rows`` of them; returns the file's SHA-256."""
    sha = hashlib.sha256()
    count = 0
    with open(target, "wb") as fh:
        for name in names:
            problem = path_name_problem(name)
            if problem:
                raise PathNameError(f"{name!r}: {problem}")
            line = (name + "\n").encode(PATHS_ENCODING)
            sha.update(line)
            fh.write(line)
            count += 1
    if count != rows:
        raise ValueError(f"{count} paths for {rows} rows")
    return sha.hexdigest()


def features_ends_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's size and of its first and last ``ENDS_BYTES`` (the whole file when smaller).

    What ``X.meta.json`` records of its ``X.npy``: reading it costs two MiB whatever the file's
    size, and rows of another model or other images give another digest.
    """
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        sha.update(f"{size}\n".encode())
        sha.update(fh.read(ENDS_BYTES))
        if size > ENDS_BYTES:
            fh.seek(max(ENDS_BYTES, size - ENDS_BYTES))
            sha.update(fh.read(ENDS_BYTES))
    return sha.hexdigest()


# What NumPy's header parser raises for a damaged header (it tokenizes and evaluates a dict literal).
_NPY_HEADER_ERRORS = (
    ValueError, OSError, EOFError, SyntaxError, TypeError, KeyError, RecursionError, tokenize.TokenError
)


@dataclass(frozen=True)
class _NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    offset: int  # where the data starts


def _read_npy_header(fh: IO[bytes], path: Path) -> _NpyHeader:
    """The header of an open ``.npy``, checked against the bytes really there (before anything is mapped)."""
    size = os.fstat(fh.fileno()).st_size
    try:
        version = np.lib.format.read_magic(fh)
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise ValueError(f"unknown .npy format version {version}")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(fh)
    except _NPY_HEADER_ERRORS as exc:
        detail = " ".join(str(exc).split())  # NumPy quotes the header over several lines
        raise MalformedFileError(f"{path}: not a readable .npy array ({type(exc).__name__}: {detail})") from None
    if dtype.hasobject:
        raise MalformedFileError(f"{path}: a .npy of Python objects ({dtype}), which is never unpickled")
    offset = fh.tell()
    needed = math.prod(shape) * dtype.itemsize  # Python integers: a hostile shape cannot overflow
    if offset + needed != size:
        what = "is truncated" if offset + needed > size else "has bytes after its data"
        raise MalformedFileError(
            f"{path}: {what}: its header says shape {list(shape)} of {dtype} ({offset + needed} bytes with the "
            f"header), the file has {size} bytes"
        )
    return _NpyHeader(tuple(shape), dtype, fortran_order, offset)


def _npy_shape(path: Path) -> tuple[int, ...]:
    try:
        with open_regular_file(path) as fh:
            return _read_npy_header(fh, path).shape
    except OSError as exc:
        raise MecHubError(f"{path}: not a readable .npy array ({exc.strerror or exc})") from None


# --------------------------------------------------------------------------- X.meta.json


@dataclass
class FeatureMeta:
    """``X.meta.json`` as a typed record (``from_json`` / ``to_json``).

    ``mec-embed`` fills every field; files from other writers may leave any of them ``None``.
    Keys this version does not know are kept, in order, in ``extra``.
    """

    # The files.
    format: str | None = FORMAT
    format_version: int = FORMAT_VERSION
    features: str | None = None  # file names, beside the meta file
    paths: str | None = None
    shape: tuple[int, int] | None = None
    # What ties the three files together (see the module docstring); written by FeatureFile.write.
    run_id: str | None = None
    paths_sha256: str | None = None
    features_ends_sha256: str | None = None
    # The model, as ``Embedder.identity()`` describes it (what ``Embedder.from_meta`` rebuilds).
    model: str | None = None
    weights: str | None = None
    weights_sha256: str | None = None
    state_dict_sha256: str | None = None  # only for weights without a file digest
    architecture: str | None = None
    head: str | None = None
    embed_dim: int | None = None
    normalize: bool | None = None
    precision: str | None = None
    out_dtype: str | None = None
    preprocessing: dict[str, Any] | None = None
    optimizations: list[str] | None = None
    # The run.
    num_inputs: int | None = None
    num_embedded: int | None = None
    num_failed: int | None = None
    num_skipped_non_images: int | None = None
    failed: list[dict[str, str]] | None = None  # [{"path": ..., "reason": ...}]
    inputs: list[str] | None = None
    files_from: str | None = None
    recursive: bool | None = None
    base_dir: str | None = None  # the folder relative paths in X.paths.txt start from
    batch_size: int | None = None
    device: str | None = None
    decoding: dict[str, Any] | None = None
    fingerprint: str | None = None
    mec_hub_version: str | None = None
    torch_version: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any, *, origin: str = "metadata") -> FeatureMeta:
        """The record of a parsed ``X.meta.json`` (``origin`` names it in errors)."""
        if not isinstance(data, Mapping):
            raise MecHubError(f"{origin}: metadata must be a JSON object")
        version = data.get("format_version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise MecHubError(f"{origin}: format_version {version!r} is not a version number")
        if version > FORMAT_VERSION:
            raise MecHubError(
                f"{origin}: written in feature-file format version {version}; this mec-hub reads up to "
                f"version {FORMAT_VERSION}. Upgrade mec-hub to read it."
            )
        known, extra = {}, {}
        for key, value in data.items():
            if key in _FIELD_TYPES:
                known[key] = _checked(key, value, origin)
            else:
                extra[key] = value
        known.setdefault("format", None)  # a record from another writer names no format
        known["format_version"] = version
        return cls(**known, extra=extra)

    def to_json(self) -> dict[str, Any]:
        """The JSON object, keys in the order mec-embed writes them (those of ``_WRITTEN_WHEN_SET`` only when set)."""
        out: dict[str, Any] = {}
        for key in _FIELD_TYPES:
            value = getattr(self, key)
            if value is None and key in _WRITTEN_WHEN_SET:
                continue
            out[key] = list(value) if key == "shape" and value is not None else value
        out.update(self.extra)
        return out

    @classmethod
    def load(cls, meta_path: str | os.PathLike[str]) -> FeatureMeta:
        """Read an ``X.meta.json`` file."""
        return cls.from_json(_read_json(Path(meta_path)), origin=str(meta_path))


def _allowed_types(hint: Any) -> tuple[type, ...]:
    members = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return tuple(typing.get_origin(m) or m for m in members)


# Fields that are left out of the JSON when unset, so that records without them round-trip unchanged.
_WRITTEN_WHEN_SET = frozenset({"state_dict_sha256", "run_id", "paths_sha256", "features_ends_sha256"})

_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    f.name: _allowed_types(typing.get_type_hints(FeatureMeta)[f.name])
    for f in dataclasses.fields(FeatureMeta)
    if f.name != "extra"
}


def _checked(key: str, value: Any, origin: str) -> Any:
    """``value`` as field ``key`` holds it, or an error naming the field."""
    if key == "inputs" and isinstance(value, str):  # one input, written as a string by hand
        value = [value]
    if key == "shape" and isinstance(value, list | tuple):
        if len(value) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) for n in value):
            raise MecHubError(f"{origin}: shape {value!r} is not [rows, dim]")
        return tuple(value)
    allowed = _FIELD_TYPES[key]
    wrong_bool = isinstance(value, bool) and bool not in allowed
    if value is not None and (wrong_bool or not isinstance(value, allowed)):
        names = " or ".join(t.__name__ for t in allowed if t is not type(None))
        raise MecHubError(f"{origin}: {key} is {value!r}, expected {names}")
    return value


def _read_json(path: Path) -> Any:
    return read_json(path)


def read_meta_json(features_path: str | os.PathLike[str]) -> dict[str, Any]:
    """``X.meta.json`` beside ``X.npy`` as the JSON object it holds (empty when there is none)."""
    path = sidecar(features_path, META_SUFFIX)
    if not path.is_file():
        return {}
    data = _read_json(path)
    if not isinstance(data, dict):
        raise MecHubError(f"{path}: metadata must be a JSON object")
    return data


def read_meta(features_path: str | os.PathLike[str]) -> FeatureMeta | None:
    """``X.meta.json`` beside ``X.npy`` as a ``FeatureMeta``; ``None`` when there is none (or it is ``{}``)."""
    data = read_meta_json(features_path)
    return FeatureMeta.from_json(data, origin=str(sidecar(features_path, META_SUFFIX))) if data else None


# --------------------------------------------------------------------------- the three files


def _check_one_set(path: Path, shape: tuple[int, ...], paths_sha256: str | None, meta: FeatureMeta) -> None:
    """Refuse ``X.npy``, ``X.paths.txt`` and ``X.meta.json`` that were not published together
    (``paths_sha256`` ``None``: the paths file was not read)."""
    meta_file, paths_file = sidecar(path, META_SUFFIX), sidecar(path, PATHS_SUFFIX)
    problems = []
    if None not in (meta.paths_sha256, paths_sha256) and meta.paths_sha256 != paths_sha256:
        problems.append(f"{paths_file.name} is not the one {meta_file.name} was written with")
    if meta.shape is not None and tuple(meta.shape) != shape:
        problems.append(f"{path.name} has shape {list(shape)}, {meta_file.name} says {list(meta.shape)}")
    elif meta.features_ends_sha256 is not None and meta.features_ends_sha256 != features_ends_sha256(path):
        problems.append(f"{path.name} is not the one {meta_file.name} was written with")
    if problems:
        raise MecHubError(
            f"{path}: {path.name}, {paths_file.name} and {meta_file.name} do not belong together ("
            + "; ".join(problems)
            + "), as when a run is stopped while replacing them: finish it (the same run with resume=True) "
            "or write them anew (overwrite=True)",
            arguments=("resume", "overwrite"),
        )


def open_matrix(path: str | os.PathLike[str]) -> np.ndarray:
    """A ``.npy`` array memory-mapped (never unpickled), or one clear error naming the file.

    Its header's shape and type are checked against the file's size before anything is mapped.
    """
    path = Path(path)
    try:
        with open_regular_file(path) as fh:
            header = _read_npy_header(fh, path)
            if math.prod(header.shape) == 0:  # nothing to map
                return np.empty(header.shape, header.dtype, order="F" if header.fortran_order else "C")
            return np.memmap(
                fh,
                dtype=header.dtype,
                mode="r",
                offset=header.offset,
                shape=header.shape,
                order="F" if header.fortran_order else "C",
            )
    except FileNotFoundError:
        raise MecHubError(f"feature file not found: {path}") from None
    except NotRegularFileError as exc:
        raise MecHubError(f"feature file not found: {path} ({exc})") from None
    except (ValueError, OSError) as exc:
        raise MalformedFileError(f"{path}: not a readable .npy array ({exc})") from None


@dataclass(frozen=True)
class FeatureFile:
    """An opened ``X.npy`` (memory-mapped), its row ``paths`` and its ``meta`` (``None`` if it has none).

    Example::

        >>> feats = FeatureFile.open("photos.npy")
        >>> feats.matrix.shape, feats.paths[0], feats.meta.weights_sha256
    """

    path: Path
    matrix: np.ndarray
    paths: list[str] | None  # None only when opened ``with_paths=False``
    meta: FeatureMeta | None

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, with_paths: bool = True) -> FeatureFile:
        """Open ``X.npy`` and read its side-cars, or ``X.parquet`` (or its shards); the rows and
        paths must match one to one.

        ``with_paths=False`` (rows labelled from elsewhere) leaves ``X.paths.txt`` unread, and
        ``paths`` ``None`` for an ``.npy``; the meta is still checked against the rows.
        """
        path = Path(path)
        if path.suffix == PARQUET_SUFFIX:
            return _open_parquet(path)
        matrix = open_matrix(path)
        if matrix.ndim != 2 or matrix.shape[0] == 0 or not np.issubdtype(matrix.dtype, np.number):
            raise MecHubError(
                f"{path}: expected a non-empty (N, D) array of numbers, got shape {matrix.shape} {matrix.dtype}"
            )
        paths, paths_sha256 = None, None
        if with_paths:
            paths_file = sidecar(path, PATHS_SUFFIX)
            if not paths_file.is_file():
                raise MecHubError(
                    f"{path}: no {paths_file.name} beside it (the row-aligned image paths mec-embed writes)"
                )
            paths, paths_sha256 = _read_paths(paths_file, max_bytes=matrix.shape[0] * MAX_PATH_LINE_BYTES)
            if len(paths) != matrix.shape[0]:
                raise MecHubError(
                    f"{paths_file} has {len(paths)} paths but {path} has {matrix.shape[0]} rows; "
                    "the two files do not belong together"
                )
        meta = read_meta(path)
        if meta is not None:
            _check_one_set(path, matrix.shape, paths_sha256, meta)
        return cls(path=path, matrix=matrix, paths=paths, meta=meta)

    @staticmethod
    def write(
        path: str | os.PathLike[str],
        paths: Iterable[str],
        meta: FeatureMeta | Mapping[str, Any],
        *,
        matrix: np.ndarray | None = None,
        features_file: str | os.PathLike[str] | None = None,
    ) -> Path:
        """Publish a set: ``X.paths.txt``, then ``X.npy``, then ``X.meta.json`` (last), each atomically.

        ``X.npy`` is ``matrix``; or ``features_file``, a finished ``.npy`` in the same folder,
        renamed into place (``mec-embed`` streams its rows into one); or, with neither, the
        ``X.npy`` already in place. ``paths`` must hold one name per row. The meta gets the fields
        that tie it to the other two files (``run_id``, unless it has one, ``paths_sha256``,
        ``features_ends_sha256``); a ``Mapping`` meta is otherwise written as given (without
        ``format_version`` it reads as version 1).
        """
        path = Path(path)
        if not path.name.endswith(".npy"):
            raise ValueError(f"{path}: the features file name must end in .npy")
        if matrix is not None and features_file is not None:
            raise ValueError("give matrix or features_file, not both")
        source = path if features_file is None else Path(features_file)
        shape = tuple(matrix.shape) if matrix is not None else _npy_shape(source)
        recorded = meta.shape if isinstance(meta, FeatureMeta) else meta.get("shape")
        if recorded is not None and tuple(recorded) != shape:
            raise ValueError(f"the metadata says shape {list(recorded)}, the features have {list(shape)}")
        digest: list[str] = []
        atomic_write(sidecar(path, PATHS_SUFFIX), lambda tmp: digest.append(_write_paths(tmp, paths, shape[0])))
        if matrix is not None:

            def write_array(tmp: Path) -> None:
                with open(tmp, "wb") as fh:  # a file object, or np.save would append ".npy" to the temporary name
                    np.save(fh, matrix)

            atomic_write(path, write_array)
        elif features_file is not None:
            os.replace(source, path)
            fsync_dir(path.parent)
        ties = {"paths_sha256": digest[0], "features_ends_sha256": features_ends_sha256(path)}
        if isinstance(meta, FeatureMeta):
            record = dataclasses.replace(meta, run_id=meta.run_id or uuid.uuid4().hex, **ties).to_json()
        else:
            record = {**meta, "run_id": meta.get("run_id") or uuid.uuid4().hex, **ties}
        atomic_write_json(sidecar(path, META_SUFFIX), record)
        return path

    @functools.cached_property
    def search_roots(self) -> list[Path]:
        """Folders a recorded relative path may be relative to, most likely first.

        The folder the paths were recorded relative to (``base_dir`` in the metadata), the
        recorded inputs, the current folder and the feature file's folder.
        """
        meta = self.meta or FeatureMeta()
        roots: list[Path] = [Path(meta.base_dir)] if meta.base_dir is not None else []
        for item in meta.inputs or []:
            candidate = Path(item)
            if not candidate.is_absolute():
                candidate = self.path.parent / candidate if not candidate.exists() else candidate
            roots.append(candidate if candidate.is_dir() else candidate.parent)
        for root in (Path.cwd(), self.path.parent):
            if root not in roots:
                roots.append(root)
        return roots

    def resolve(self, row: int) -> Path | None:
        """The image of ``row`` on this machine, or ``None`` when it cannot be found."""
        if self.paths is None:
            raise ValueError(f"{self.path}: opened without its paths")
        recorded = Path(self.paths[row])
        if recorded.is_absolute():
            return recorded if recorded.is_file() else None
        for root in self.search_roots:
            if (root / recorded).is_file():
                return root / recorded
        return None


# --------------------------------------------------------------------------- Parquet


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise MecHubError("Parquet files need pyarrow: pip install 'mec-hub[parquet]'") from None
    return pyarrow


def parquet_shards(path: str | os.PathLike[str]) -> list[Path]:
    """The existing ``X-NNNNN.parquet`` shards of ``X.parquet``, in order (leftovers included:
    ``FeatureFile.open`` checks them against the set's meta)."""
    path = Path(path)
    stem = path.name[: -len(PARQUET_SUFFIX)]
    found = [p for p in path.parent.glob(f"{stem}-*{PARQUET_SUFFIX}") if _shard_number(p, stem) is not None]
    return sorted(found, key=lambda p: (_shard_number(p, stem), p.name))


def _shard_number(file: Path, stem: str) -> int | None:
    digits = file.name[len(stem) + 1 : -len(PARQUET_SUFFIX)]
    return int(digits) if digits.isascii() and digits.isdigit() else None


def _shard_name(stem: str, index: int) -> str:
    return f"{stem}-{index:05d}{PARQUET_SUFFIX}"


# Keys of each Parquet file's meta record that place the file in its set (not part of the set's meta).
# ``row_offset``: where its first row is in the set; ``shard_index`` / ``shard_count``: which of how
# many files; ``set_rows``: rows of the whole set; ``set_id``: a random id of the conversion that
# wrote the set, so a file of another conversion (even of the same run) is never taken for one of it.
_SHARD_KEYS = ("row_offset", "shard_index", "shard_count", "set_rows", "set_id")


def write_parquet(source: FeatureFile, target: str | os.PathLike[str], *, shard_rows: int | None = None) -> list[Path]:
    """Publish the rows of ``source`` as ``target`` (``X.parquet``), or with ``shard_rows`` as
    ``X-00000.parquet`` ... of at most that many rows; each file atomically, old shards beyond the
    new ones removed last. Returns the files written.

    Each file's meta record says where it lies in the set (``_SHARD_KEYS``), so that a reader
    refuses a set with a file missing, left over from another conversion or taken from another set.
    """
    pa = _pyarrow()
    import pyarrow.parquet as pq

    target = Path(target)
    if target.suffix != PARQUET_SUFFIX:
        raise ValueError(f"{target}: a Parquet file name must end in {PARQUET_SUFFIX}")
    if source.paths is None:
        raise ValueError(f"{source.path}: opened without its paths, which Parquet output holds")
    rows, dim = source.matrix.shape
    kind = {np.dtype(np.float16): pa.float16(), np.dtype(np.float32): pa.float32()}.get(source.matrix.dtype)
    if kind is None:
        raise MecHubError(f"{source.path}: Parquet output holds float32 or float16 rows, not {source.matrix.dtype}")
    schema = pa.schema([("path", pa.string()), ("embedding", pa.list_(kind, dim))])
    meta = source.meta or FeatureMeta(format=None)
    per_file = shard_rows or rows
    bounds = [(start, min(start + per_file, rows)) for start in range(0, rows, per_file)]
    stem = target.name[: -len(PARQUET_SUFFIX)]
    names = [target] if shard_rows is None else [target.with_name(_shard_name(stem, i)) for i in range(len(bounds))]
    set_id = uuid.uuid4().hex
    for index, (name, (start, end)) in enumerate(zip(names, bounds, strict=True)):
        record = dataclasses.replace(
            meta, features=name.name, paths=None, shape=(end - start, dim), paths_sha256=None, features_ends_sha256=None
        ).to_json()
        for key in _SHARD_KEYS:
            record.pop(key, None)
        record.update(row_offset=start, shard_index=index, shard_count=len(names), set_rows=rows, set_id=set_id)
        file_schema = schema.with_metadata({PARQUET_META_KEY: json.dumps(record).encode()})

        def write(tmp: Path, start: int = start, end: int = end, file_schema: Any = file_schema) -> None:
            # No dictionary for the rows: float rows gain nothing from one, and written plain even a
            # column of zeros stays within PARQUET_MAX_EXPANSION of its file's size. Each page has a
            # CRC, so that a flipped byte in the rows is an error, never a silently different row.
            with pq.ParquetWriter(tmp, file_schema, use_dictionary=["path"], write_page_checksum=True) as writer:
                for first in range(start, end, PARQUET_BLOCK_ROWS):
                    last = min(first + PARQUET_BLOCK_ROWS, end)
                    block = np.ascontiguousarray(source.matrix[first:last]).reshape(-1)
                    embedding = pa.FixedSizeListArray.from_arrays(pa.array(block, type=kind), dim)
                    paths = pa.array(source.paths[first:last], type=pa.string())
                    writer.write_table(pa.Table.from_arrays([paths, embedding], schema=file_schema))

        atomic_write(name, write)
    if shard_rows is not None:
        for stale in parquet_shards(target):
            if stale not in names:
                stale.unlink(missing_ok=True)
    return names


@dataclass
class _ParquetPart:
    """One Parquet file of a set, its footer read and checked, no column read yet."""

    file: Path
    reader: Any  # pyarrow.parquet.ParquetFile
    handle: IO[bytes]
    rows: int
    dim: int
    dtype: np.dtype
    meta: FeatureMeta | None
    place: dict[str, Any]  # the _SHARD_KEYS its record holds


def _parquet_error(file: Path, exc: BaseException) -> MalformedFileError:
    detail = " ".join(str(exc).split())  # pyarrow's messages run over several lines
    return MalformedFileError(f"{file}: not a readable Parquet file ({type(exc).__name__}: {detail})")


def _open_part(file: Path) -> _ParquetPart:
    """Read ``file``'s footer alone and check it (schema, row counts, sizes, meta) against the file's bytes."""
    pa = _pyarrow()
    import pyarrow.parquet as pq

    try:
        handle = open_regular_file(file)
    except OSError as exc:
        raise MecHubError(f"{file}: cannot read it ({exc.strerror or exc})") from None
    try:
        size = os.fstat(handle.fileno()).st_size
        try:
            reader = pq.ParquetFile(handle, page_checksum_verification=True)
            footer = reader.metadata
            schema = reader.schema_arrow
        except MemoryError:
            raise
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for what is not Parquet
            raise _parquet_error(file, exc) from None
        names = schema.names
        if "path" not in names or "embedding" not in names:
            raise MecHubError(f"{file}: expected the columns 'path' and 'embedding', found {names}")
        path_type, embedding_type = schema.field("path").type, schema.field("embedding").type
        if not (pa.types.is_string(path_type) or pa.types.is_large_string(path_type)):
            raise MalformedFileError(f"{file}: 'path' must be a string column, not {path_type}")
        if not pa.types.is_fixed_size_list(embedding_type):
            raise MecHubError(f"{file}: 'embedding' must be a fixed-size list, not {embedding_type}")
        value_type = embedding_type.value_type
        if not (pa.types.is_float16(value_type) or pa.types.is_float32(value_type)):
            raise MalformedFileError(f"{file}: 'embedding' must hold float16 or float32, not {value_type}")
        dim, dtype = embedding_type.list_size, np.dtype(value_type.to_pandas_dtype())
        if dim < 1:
            raise MalformedFileError(f"{file}: 'embedding' lists of {dim} values")
        rows = footer.num_rows
        meta, place = _part_meta(file, schema.metadata)
        _check_footer(file, footer, schema, rows, dim, dtype.itemsize, size)
        if meta is not None and meta.shape is not None and tuple(meta.shape) != (rows, dim):
            raise MalformedFileError(
                f"{file}: its meta ({PARQUET_META_KEY.decode()}) says shape {list(meta.shape)}, "
                f"the file holds {rows} rows of {dim}"
            )
        return _ParquetPart(file, reader, handle, rows, dim, dtype, meta, place)
    except BaseException:
        handle.close()
        raise


def _part_meta(file: Path, metadata: Mapping[bytes, bytes] | None) -> tuple[FeatureMeta | None, dict[str, Any]]:
    raw = (metadata or {}).get(PARQUET_META_KEY)
    if raw is None:
        return None, {}
    origin = f"{file} ({PARQUET_META_KEY.decode()})"
    meta = FeatureMeta.from_json(parse_json(raw, origin), origin=origin)
    place = {key: meta.extra.pop(key) for key in _SHARD_KEYS if key in meta.extra}
    for key, value in place.items():
        if key == "set_id" and not isinstance(value, str):
            raise MalformedFileError(f"{origin}: {key} is {value!r}, expected a string")
        if key != "set_id" and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise MalformedFileError(f"{origin}: {key} is {value!r}, expected a count")
    return meta, place


def _check_footer(file: Path, footer: Any, schema: Any, rows: int, dim: int, itemsize: int, size: int) -> None:
    """The footer's counts against each other and against the file's size, before any column is read."""
    groups = [footer.row_group(g) for g in range(footer.num_row_groups)]
    if rows < 0 or any(g.num_rows < 0 for g in groups) or sum(g.num_rows for g in groups) != rows:
        raise MalformedFileError(
            f"{file}: its footer says {rows} rows, its row groups hold {[g.num_rows for g in groups]}: a damaged file"
        )
    claimed = rows * dim * itemsize
    bound = PARQUET_MAX_EXPANSION * size + PARQUET_EXPANSION_SLACK
    if claimed > bound:
        raise MalformedFileError(
            f"{file}: its footer claims {rows} rows of {dim} values ({claimed} bytes) in a file of {size} bytes, "
            f"more than {PARQUET_MAX_EXPANSION} times its size: a damaged or hostile file"
        )
    columns = {footer.schema.column(c).path.split(".")[0]: c for c in range(footer.num_columns)}
    for number, group in enumerate(groups):
        for name, expected in (("path", group.num_rows), ("embedding", group.num_rows * dim)):
            chunk = group.column(columns[name])
            if chunk.num_values > expected:  # fewer: null rows, named by row when read
                raise MalformedFileError(
                    f"{file}: row group {number} says it has {chunk.num_values} '{name}' values for "
                    f"{group.num_rows} rows" + (f" of {dim}" if name == "embedding" else "") + ": a damaged file"
                )
            if chunk.total_compressed_size < 0 or chunk.total_compressed_size > size:
                raise MalformedFileError(
                    f"{file}: row group {number} says its '{name}' column has {chunk.total_compressed_size} bytes, "
                    f"the file {size}"
                )


def _check_set(path: Path, parts: list[_ParquetPart]) -> None:
    """Shards ``X-NNNNN.parquet`` that are exactly the set their first names: no file missing, none left
    over from another conversion, none of another set."""
    stem = path.name[: -len(PARQUET_SUFFIX)]
    first = parts[0].place
    single = len(parts) == 1 and parts[0].file == path
    advice = (
        "as when a conversion is stopped while replacing an older set: finish it (the same run with "
        "resume=True) or write the set anew (overwrite=True)"
    )
    arguments = ("resume", "overwrite")  # what the advice names
    if single:
        if first.get("shard_count", 1) != 1 or first.get("set_rows", parts[0].rows) != parts[0].rows:
            raise MalformedFileError(
                f"{path}: its meta says it is shard {first.get('shard_index')} of {first.get('shard_count')} "
                f"({first.get('set_rows')} rows in all), not a whole set: open the set by its name "
                f"(X.parquet for X-00000.parquet ...)"
            )
        return
    if "shard_count" in first:  # a set that names its shards
        count = first["shard_count"]
        expected = [_shard_name(stem, i) for i in range(count)]
        found = [p.file.name for p in parts]
        extra = [name for name in found if name not in expected]
        missing = [name for name in expected if name not in found]
        if extra or missing or found[0] != expected[0]:
            problems = ([f"{', '.join(missing)} missing"] if missing else []) + (
                [f"{', '.join(extra)} not part of it"] if extra else []
            )
            raise MalformedFileError(
                f"{path}: the set {expected[0]} names has {count} shards ({'; '.join(problems)}), {advice}",
                arguments=arguments,
            )
    offset = 0
    for index, part in enumerate(parts):
        place = part.place
        expected_name = _shard_name(stem, index)
        if part.file.name != expected_name:
            raise MalformedFileError(
                f"{path}: {expected_name} is missing from the set of shards, {advice}", arguments=arguments
            )
        wrong = [
            key
            for key, value in (
                ("shard_index", index),
                ("shard_count", first.get("shard_count")),
                ("set_rows", first.get("set_rows")),
                ("set_id", first.get("set_id")),
                ("row_offset", offset),
            )
            if place.get(key) != value and (key in place or key in first)
        ]
        if wrong:
            raise MalformedFileError(
                f"{part.file}: not a shard of the set {parts[0].file.name} starts ({', '.join(wrong)} "
                f"{'differ' if len(wrong) > 1 else 'differs'}), {advice}",
                arguments=arguments,
            )
        offset += part.rows
    if "set_rows" in first and first["set_rows"] != offset:
        raise MalformedFileError(f"{path}: the shards hold {offset} rows, the set's meta says {first['set_rows']}")
    if len({(p.dim, p.dtype) for p in parts}) > 1:
        raise MalformedFileError(f"{path}: the shards hold rows of different widths or types")


def _read_part(part: _ParquetPart, matrix: np.ndarray, paths: list[str], start: int) -> None:
    """Copy the rows of ``part`` into ``matrix[start:]`` and its paths onto ``paths``, a row group at a time."""
    file, row = part.file, 0  # row: the file's first row of the group
    for number in range(part.reader.num_row_groups):
        claimed = part.reader.metadata.row_group(number).num_rows
        try:
            table = part.reader.read_row_group(number, columns=["path", "embedding"])
            names, embedding = table.column("path").combine_chunks(), table.column("embedding").combine_chunks()
            values = embedding.flatten()  # the values of the non-null rows
        except MemoryError:
            raise
        except Exception as exc:
            raise _parquet_error(file, exc) from None
        if table.num_rows != claimed:
            raise MalformedFileError(
                f"{file}: row group {number} holds {table.num_rows} rows, its footer says {claimed}"
            )
        for what, array in (("path", names), ("embedding", embedding)):
            if array.null_count:
                first = int(np.argmax(array.is_null().to_numpy(zero_copy_only=False)))
                raise MalformedFileError(f"{file}: row {row + first} has no {what} (null)")
        if values.null_count:
            first = int(np.argmax(values.is_null().to_numpy(zero_copy_only=False))) // part.dim
            raise MalformedFileError(f"{file}: row {row + first} has a null among its embedding values")
        if len(values) != claimed * part.dim:  # cannot be, with no null row; a damaged file all the same
            raise MalformedFileError(f"{file}: row group {number} holds {len(values)} values for {claimed} rows")
        matrix[start + row : start + row + claimed] = values.to_numpy(zero_copy_only=False).reshape(claimed, part.dim)
        paths += names.to_pylist()
        row += claimed


def _open_parquet(path: Path) -> FeatureFile:
    files = [path] if path.is_file() else parquet_shards(path)
    if not files:
        raise MecHubError(f"feature file not found: {path} (nor its shards {path.stem}-NNNNN{PARQUET_SUFFIX})")
    _pyarrow()
    parts: list[_ParquetPart] = []
    try:
        for file in files:
            parts.append(_open_part(file))
        _check_set(path, parts)
        rows = sum(part.rows for part in parts)
        if rows == 0:
            raise MecHubError(f"{path}: no rows")
        matrix = np.empty((rows, parts[0].dim), parts[0].dtype)  # the footers checked: this size is believed
        paths: list[str] = []
        start = 0
        for part in parts:
            _read_part(part, matrix, paths, start)
            start += part.rows
    finally:
        for part in parts:
            part.handle.close()
    meta = parts[0].meta
    if meta is not None:
        meta = dataclasses.replace(meta, features=path.name, shape=matrix.shape)
    return FeatureFile(path=path, matrix=matrix, paths=paths, meta=meta)
