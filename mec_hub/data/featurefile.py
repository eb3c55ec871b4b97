"""The feature-file format: ``X.npy`` with ``X.paths.txt`` and ``X.meta.json`` beside it.

``mec-embed`` writes it, ``mec-hub search`` and ``mec-hub eval`` read it, and so may anyone with
NumPy and a text editor:

* ``X.npy``: an ``(N, D)`` array of numbers (float32 or float16), a plain ``.npy`` file;
* ``X.paths.txt``: line ``i`` is the image of row ``i`` (UTF-8, ``\\n`` after every line; names
  that are not valid UTF-8 are written byte for byte, as Python's ``surrogateescape`` does);
* ``X.meta.json``: a JSON object, ``FeatureMeta``: which model made the rows (name, weights and
  their SHA-256, head, preprocessing), with which options, and what happened in the run.

The record is versioned by ``"format_version"`` (``FORMAT_VERSION``); a record without it
(written by ``mec-hub eval --save-features``, or by hand) reads as version 1, the layout
described here. This module is the only place that names, reads or writes these files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mec_hub.errors import MecHubError
from mec_hub.fileio import atomic_write, atomic_write_json

FORMAT = "mec-embed"
FORMAT_VERSION = 1
PATHS_SUFFIX = ".paths.txt"
META_SUFFIX = ".meta.json"
# How names are written to X.paths.txt: a file name that is not valid UTF-8 (possible on POSIX)
# keeps its bytes.
PATHS_ENCODING, PATHS_ERRORS = "utf-8", "surrogateescape"


def sidecar(features_path: str | os.PathLike[str], suffix: str) -> Path:
    """``X.npy`` -> ``X<suffix>`` (``X.paths.txt``, ``X.meta.json``); a name without ``.npy`` keeps its stem."""
    path = Path(features_path)
    stem = path.name[: -len(".npy")] if path.name.endswith(".npy") else path.name
    return path.with_name(stem + suffix)


# --------------------------------------------------------------------------- X.paths.txt


def read_paths(path: str | os.PathLike[str]) -> list[str]:
    """Lines of a paths file (``X.paths.txt``), without the line ends; a trailing empty line is ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MecHubError(f"paths file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MecHubError(f"{path}: unreadable paths file ({exc})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _write_paths(target: Path, names: Iterable[str]) -> int:
    count = 0
    with open(target, "w", encoding=PATHS_ENCODING, errors=PATHS_ERRORS, newline="\n") as fh:
        for name in names:
            if "\n" in name or "\r" in name:
                raise ValueError(f"{name!r}: a name with a line break cannot be a line of {PATHS_SUFFIX}")
            fh.write(name + "\n")
            count += 1
    return count


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
        """The JSON object, keys in the order mec-embed writes them (``state_dict_sha256`` only when set)."""
        out: dict[str, Any] = {}
        for key in _FIELD_TYPES:
            value = getattr(self, key)
            if value is None and key == "state_dict_sha256":
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
        """Open ``X.npy`` and read its side-cars; the rows and paths must match one to one."""
        path = Path(path)
        if not path.is_file():
            raise MecHubError(f"feature file not found: {path}")
        try:
            matrix = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise MecHubError(f"{path}: not a readable .npy array ({exc})") from None
        if matrix.ndim != 2 or matrix.shape[0] == 0 or not np.issubdtype(matrix.dtype, np.number):
            raise MecHubError(
                f"{path}: expected a non-empty (N, D) array of numbers, got shape {matrix.shape} {matrix.dtype}"
            )
        paths_file = sidecar(path, PATHS_SUFFIX)
        if not paths_file.is_file():
            raise MecHubError(f"{path}: no {paths_file.name} beside it (the row-aligned image paths mec-embed writes)")
        paths = read_paths(paths_file)
        if len(paths) != matrix.shape[0]:
            raise MecHubError(
                f"{paths_file} has {len(paths)} paths but {path} has {matrix.shape[0]} rows; "
                "the two files do not belong together"
            )
        return cls(path=path, matrix=matrix, paths=paths, meta=read_meta(path))

    @staticmethod
    def write(
        path: str | os.PathLike[str],
        paths: Iterable[str],
        meta: FeatureMeta | Mapping[str, Any],
        *,
        matrix: np.ndarray | None = None,
    ) -> Path:
        """Write ``X.paths.txt`` and ``X.meta.json`` beside ``path`` (``X.npy``), then ``matrix`` as ``X.npy``.

        Each file is written atomically. Without ``matrix`` the caller puts ``X.npy`` in place
        afterwards (``mec-embed`` streams it and renames it last). A ``Mapping`` meta is written as
        given (without ``format_version`` it reads as version 1).
        """
        path = Path(path)
        if not path.name.endswith(".npy"):
            raise ValueError(f"{path}: the features file name must end in .npy")

        def write_paths(tmp: Path) -> None:
            lines = _write_paths(tmp, paths)
            if matrix is not None and lines != matrix.shape[0]:
                raise ValueError(f"{lines} paths for {matrix.shape[0]} rows")

        atomic_write(sidecar(path, PATHS_SUFFIX), write_paths)
        atomic_write_json(sidecar(path, META_SUFFIX), meta.to_json() if isinstance(meta, FeatureMeta) else dict(meta))
        if matrix is not None:

            def write_array(tmp: Path) -> None:
                with open(tmp, "wb") as fh:  # a file object, or np.save would append ".npy" to the temporary name
                    np.save(fh, matrix)

            atomic_write(path, write_array)
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
