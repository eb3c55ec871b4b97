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
metadata (its ``shape`` that file's, ``row_offset`` where its first row is in the whole set).
``FeatureFile.open`` reads both; for ``X.parquet`` absent, it reads the ``X-NNNNN.parquet`` shards
in order, as one set.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import types
import typing
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mec_hub.errors import MecHubError
from mec_hub.fileio import atomic_write, atomic_write_json, fsync_dir

FORMAT = "mec-embed"
FORMAT_VERSION = 1
PATHS_SUFFIX = ".paths.txt"
META_SUFFIX = ".meta.json"
PATHS_ENCODING = "utf-8"  # strictly: a name that is not valid UTF-8 is not written (see the docstring)
ENDS_BYTES = 1 << 20  # how much of each end of X.npy ``features_ends_sha256`` covers
PARQUET_SUFFIX = ".parquet"
PARQUET_META_KEY = b"mec_hub.meta"
PARQUET_BLOCK_ROWS = 65536  # rows converted at a time (a row group): memory stays bounded


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


def _read_paths(path: str | os.PathLike[str]) -> tuple[list[str], str]:
    """(lines, SHA-256 of the file's bytes)."""
    try:
        data = Path(path).read_bytes()
        text = data.decode(PATHS_ENCODING)
    except FileNotFoundError:
        raise MecHubError(f"paths file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MecHubError(f"{path}: unreadable paths file ({exc})") from None
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


def _npy_shape(path: Path) -> tuple[int, ...]:
    try:
        return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)
    except (ValueError, OSError, EOFError) as exc:
        raise MecHubError(f"{path}: not a readable .npy array ({exc})") from None


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
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MecHubError(f"{path}: unreadable metadata ({exc})") from None


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


def _check_one_set(path: Path, shape: tuple[int, ...], paths_sha256: str, meta: FeatureMeta) -> None:
    """Refuse ``X.npy``, ``X.paths.txt`` and ``X.meta.json`` that were not published together."""
    meta_file, paths_file = sidecar(path, META_SUFFIX), sidecar(path, PATHS_SUFFIX)
    problems = []
    if meta.paths_sha256 is not None and meta.paths_sha256 != paths_sha256:
        problems.append(f"{paths_file.name} is not the one {meta_file.name} was written with")
    if meta.shape is not None and tuple(meta.shape) != shape:
        problems.append(f"{path.name} has shape {list(shape)}, {meta_file.name} says {list(meta.shape)}")
    elif meta.features_ends_sha256 is not None and meta.features_ends_sha256 != features_ends_sha256(path):
        problems.append(f"{path.name} is not the one {meta_file.name} was written with")
    if problems:
        raise MecHubError(
            f"{path}: {path.name}, {paths_file.name} and {meta_file.name} do not belong together ("
            + "; ".join(problems)
            + "), as when a run is stopped while replacing them: finish it (the same mec-embed command "
            "with --resume) or write them anew (--overwrite)"
        )


def open_matrix(path: str | os.PathLike[str]) -> np.ndarray:
    """A ``.npy`` array memory-mapped (never unpickled), or one clear error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise MecHubError(f"feature file not found: {path}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise MecHubError(f"{path}: not a readable .npy array ({exc})") from None


@dataclass(frozen=True)
class FeatureFile:
    """An opened ``X.npy`` (memory-mapped), its row ``paths`` and its ``meta`` (``None`` if it has none).

    Example::

        >>> feats = FeatureFile.open("photos.npy")
        >>> feats.matrix.shape, feats.paths[0], feats.meta.weights_sha256
    """

    path: Path
    matrix: np.ndarray
    paths: list[str]
    meta: FeatureMeta | None

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> FeatureFile:
        """Open ``X.npy`` and read its side-cars, or ``X.parquet`` (or its shards); the rows and
        paths must match one to one."""
        path = Path(path)
        if path.suffix == PARQUET_SUFFIX:
            return _open_parquet(path)
        matrix = open_matrix(path)
        if matrix.ndim != 2 or matrix.shape[0] == 0 or not np.issubdtype(matrix.dtype, np.number):
            raise MecHubError(
                f"{path}: expected a non-empty (N, D) array of numbers, got shape {matrix.shape} {matrix.dtype}"
            )
        paths_file = sidecar(path, PATHS_SUFFIX)
        if not paths_file.is_file():
            raise MecHubError(f"{path}: no {paths_file.name} beside it (the row-aligned image paths mec-embed writes)")
        paths, paths_sha256 = _read_paths(paths_file)
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
    """The existing ``X-NNNNN.parquet`` shards of ``X.parquet``, in order."""
    path = Path(path)
    stem = path.name[: -len(PARQUET_SUFFIX)]
    found = [p for p in path.parent.glob(f"{stem}-*{PARQUET_SUFFIX}") if p.name[len(stem) + 1 : -8].isdigit()]
    return sorted(found)


def write_parquet(source: FeatureFile, target: str | os.PathLike[str], *, shard_rows: int | None = None) -> list[Path]:
    """Publish the rows of ``source`` as ``target`` (``X.parquet``), or with ``shard_rows`` as
    ``X-00000.parquet`` ... of at most that many rows; each file atomically, old shards beyond the
    new ones removed last. Returns the files written."""
    pa = _pyarrow()
    import pyarrow.parquet as pq

    target = Path(target)
    if target.suffix != PARQUET_SUFFIX:
        raise ValueError(f"{target}: a Parquet file name must end in {PARQUET_SUFFIX}")
    rows, dim = source.matrix.shape
    kind = {np.dtype(np.float16): pa.float16(), np.dtype(np.float32): pa.float32()}.get(source.matrix.dtype)
    if kind is None:
        raise MecHubError(f"{source.path}: Parquet output holds float32 or float16 rows, not {source.matrix.dtype}")
    schema = pa.schema([("path", pa.string()), ("embedding", pa.list_(kind, dim))])
    meta = source.meta or FeatureMeta(format=None)
    per_file = shard_rows or rows
    bounds = [(start, min(start + per_file, rows)) for start in range(0, rows, per_file)]
    stem = target.name[: -len(PARQUET_SUFFIX)]
    names = (
        [target]
        if shard_rows is None
        else [target.with_name(f"{stem}-{i:05d}{PARQUET_SUFFIX}") for i in range(len(bounds))]
    )
    for name, (start, end) in zip(names, bounds, strict=True):
        record = dataclasses.replace(
            meta, features=name.name, paths=None, shape=(end - start, dim), paths_sha256=None, features_ends_sha256=None
        ).to_json()
        record["row_offset"] = start
        file_schema = schema.with_metadata({PARQUET_META_KEY: json.dumps(record).encode()})

        def write(tmp: Path, start: int = start, end: int = end, file_schema: Any = file_schema) -> None:
            with pq.ParquetWriter(tmp, file_schema) as writer:
                for first in range(start, end, PARQUET_BLOCK_ROWS):
                    last = min(first + PARQUET_BLOCK_ROWS, end)
                    block = np.ascontiguousarray(source.matrix[first:last]).reshape(-1)
                    embedding = pa.FixedSizeListArray.from_arrays(pa.array(block, type=kind), dim)
                    paths = pa.array(source.paths[first:last], type=pa.string())
                    writer.write_table(pa.Table.from_arrays([paths, embedding], schema=file_schema))

        atomic_write(name, write)
    if shard_rows is not None:
        for stale in parquet_shards(target)[len(names) :]:
            stale.unlink(missing_ok=True)
    return names


def _open_parquet(path: Path) -> FeatureFile:
    files = [path] if path.is_file() else parquet_shards(path)
    if not files:
        raise MecHubError(f"feature file not found: {path} (nor its shards {path.stem}-NNNNN{PARQUET_SUFFIX})")
    _pyarrow()
    import pyarrow.parquet as pq

    blocks, paths, meta = [], [], None
    for file in files:
        try:
            table = pq.read_table(file)
        except Exception as exc:  # pyarrow raises its own ArrowInvalid, OSError ...
            raise MecHubError(f"{file}: not a readable Parquet file ({exc})") from None
        if "path" not in table.column_names or "embedding" not in table.column_names:
            raise MecHubError(f"{file}: expected the columns 'path' and 'embedding', found {table.column_names}")
        column = table.column("embedding").combine_chunks()
        dim = getattr(column.type, "list_size", None)
        if dim is None:
            raise MecHubError(f"{file}: 'embedding' must be a fixed-size list, not {column.type}")
        matrix = column.flatten().to_numpy(zero_copy_only=False).reshape(len(table), dim)
        blocks.append(matrix)
        paths += [str(p) for p in table.column("path").to_pylist()]
        raw = (table.schema.metadata or {}).get(PARQUET_META_KEY)
        if raw is not None and meta is None:
            meta = FeatureMeta.from_json(json.loads(raw), origin=f"{file} ({PARQUET_META_KEY.decode()})")
    matrix = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
    if matrix.shape[0] == 0:
        raise MecHubError(f"{path}: no rows")
    if meta is not None and len(files) > 1:
        meta = dataclasses.replace(meta, features=path.name, shape=matrix.shape)
        meta.extra.pop("row_offset", None)
    return FeatureFile(path=path, matrix=matrix, paths=paths, meta=meta)
