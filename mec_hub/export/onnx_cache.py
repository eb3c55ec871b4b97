"""The ONNX exports mec_hub makes for itself, so that ``mec-embed`` runs ONNX Runtime without being asked.

On a CPU, ONNX Runtime runs the same ResNet-50 1.5-2.5x faster than PyTorch's eager path
(``benchmarks/RESULTS.md``); ``mec_hub.Embedder`` therefore runs a model through an ONNX export of
it (``runtime="auto"``, see ``mec_hub.embedding.runtimes``). The export is made once per model and
kept in ``MEC_HUB_CACHE/onnx`` (``~/.cache/mec_hub/onnx``), one folder per entry:

* the folder's name is a digest of the entry's **key**: the tensors exported (their digest, and the
  weights file's SHA-256 where there is one), architecture, head, dimension, input size, and the
  versions of torch, onnx, onnxscript, onnxruntime and mec_hub, so a changed weight file, head or
  input size, or an upgrade, makes a new entry and never reuses an old one;
* ``model.onnx`` and ``model.onnx.json`` are what ``mec-hub export --format onnx --dynamic-batch``
  writes (``export_encoder``): the file is checked against the eager model on fixed random batches
  (1e-4 relative at most, ``deploy.MAX_REL_DIFF``) before it is written, and its SHA-256 is checked
  whenever it is opened (``OnnxRuntimeModel``); ``key.json`` holds the key, compared in full when the
  entry is opened;
* an entry is made in a temporary folder and renamed into place in one step
  (``fileio.atomic_directory``): a killed run leaves no half entry, and of two runs making the same
  entry at once, one publishes it and the other uses it. A damaged entry (its file's digest or its key
  disagree) is removed and made again.

``int8`` entries (``mec_hub.export.quantize``) live beside them, keyed by the fp32 entry and the
calibration images.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from mec_hub import __version__
from mec_hub.errors import MecHubError
from mec_hub.export.deploy import MIN_OPSET, deployable, export_encoder
from mec_hub.fileio import atomic_directory, atomic_write_json, json_plain, read_json
from mec_hub.models.onnx_runtime import OnnxRuntimeModel, require
from mec_hub.models.protocol import state_dict_sha256
from mec_hub.weights.sources import default_cache_dir

#: Bumped when what an entry holds changes: older entries are then never read.
CACHE_FORMAT = 1
MODEL_FILE = "model.onnx"
KEY_FILE = "key.json"
#: The packages whose versions decide what an export is and how it runs.
VERSIONED = ("torch", "onnx", "onnxscript", "onnxruntime")
#: A temporary folder older than this is a killed run's, and is removed when the next entry is made.
STALE_SECONDS = 3600


class ExportCacheError(MecHubError):
    """An entry of the export cache that cannot be made or used."""


def export_cache_dir() -> Path:
    """Where exports are kept: ``MEC_HUB_CACHE/onnx`` (``$XDG_CACHE_HOME/mec_hub/onnx``)."""
    return default_cache_dir() / "onnx"


def package_versions(names: tuple[str, ...] = VERSIONED) -> dict[str, str | None]:
    """Installed versions of ``names`` (None: not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def installed_versions() -> dict[str, str | None]:
    """The versions an entry's key records and is compared with: ``VERSIONED``'s and mec_hub's."""
    return {**package_versions(), "mec_hub": __version__}


def entry_name(key: Mapping[str, Any]) -> str:
    """The folder name of the entry for ``key``: a digest of its canonical JSON."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def export_key(encoder: nn.Module) -> dict[str, Any]:
    """What decides the ONNX file made from ``encoder`` (see the module docstring)."""
    identity = encoder.identity
    return {
        "cache_format": CACHE_FORMAT,
        "kind": "onnx-fp32",
        "architecture": identity.architecture,
        "head": identity.head,
        "embed_dim": int(identity.embed_dim),
        "input_size": [int(n) for n in encoder.config.input_size],
        # The tensors actually exported (a module changed in memory after loading is another model)
        # and the weights file they were read from.
        "state_dict_sha256": state_dict_sha256(deployable(encoder)),
        "weights_sha256": identity.weights_sha256,
        "opset": MIN_OPSET,
        "versions": installed_versions(),
    }


@dataclass(frozen=True)
class CachedModel:
    """An entry opened: the ONNX Runtime module, where it lies, and what was recorded when it was made."""

    model: OnnxRuntimeModel
    folder: Path
    made: bool  # True: made by this call; False: found in the cache
    record: dict[str, Any]  # what FEATS.meta.json records about it

    @property
    def path(self) -> Path:
        return self.folder / MODEL_FILE


def cached_entry(
    key: Mapping[str, Any],
    make: Callable[[Path], dict[str, Any]],
    *,
    what: str,
    cache_dir: str | os.PathLike[str] | None = None,
    threads: int | None = None,
) -> CachedModel:
    """The cache entry for ``key``: opened if it is there and sound, else made by ``make(folder)``.

    ``make`` writes ``MODEL_FILE`` and its ``FILE.json`` into a temporary folder and returns what is to
    be recorded about it (kept in ``key.json`` beside the key). ``what`` names the entry in messages.
    """
    root = Path(cache_dir) if cache_dir is not None else export_cache_dir()
    folder = root / entry_name(key)
    key = json_plain(key)  # the key as it reads back from key.json
    if folder.is_dir():
        try:
            return _open(folder, key, threads=threads, made=False)
        except MecHubError as exc:
            warnings.warn(f"{folder}: a damaged cached {what} ({exc}); it is made again", stacklevel=3)
            shutil.rmtree(folder, ignore_errors=True)
    _remove_stale(root)
    try:
        with atomic_directory(folder) as tmp:
            record = make(tmp)
            atomic_write_json(tmp / KEY_FILE, {"key": key, "record": record})
    except OSError as exc:  # FileExistsError included: another run published the same entry first
        if not folder.is_dir():
            raise ExportCacheError(
                f"cannot write the {what} into {root} ({exc.strerror or exc}); set MEC_HUB_CACHE to a writable "
                "folder, or run the torch runtime (runtime='torch')",
                arguments=("runtime",),
            ) from exc
    return _open(folder, key, threads=threads, made=True)


def _open(folder: Path, key: Mapping[str, Any], *, threads: int | None, made: bool) -> CachedModel:
    stored = _read_key_file(folder)
    if stored is None or stored["key"] != key:
        raise ExportCacheError(f"{folder / KEY_FILE} does not hold this entry's key")
    model = OnnxRuntimeModel(folder / MODEL_FILE, threads=threads)  # checks the file against its SHA-256
    with contextlib.suppress(OSError):  # its time of last use, for `mec-hub cache list` (a read-only cache: none)
        os.utime(folder / KEY_FILE)
    return CachedModel(model, folder, made, dict(stored["record"]))


def _read_key_file(folder: Path) -> dict[str, Any] | None:
    """``key.json`` of an entry as written (``{"key": {...}, "record": {...}}``), or None when it is not."""
    try:
        stored = read_json(folder / KEY_FILE, max_bytes=1 << 20)
    except (OSError, MecHubError):
        return None
    ok = isinstance(stored, dict) and isinstance(stored.get("key"), dict) and isinstance(stored.get("record"), dict)
    return stored if ok else None


@dataclass(frozen=True)
class EntryInfo:
    """One folder of the cache, as ``mec-hub cache`` lists it."""

    folder: Path
    key: dict[str, Any] | None  # None: no readable key.json (a damaged entry)
    size_bytes: int
    last_used: float  # seconds since the epoch: when it was made or last opened

    @property
    def kind(self) -> str:
        return "damaged" if self.key is None else str(self.key.get("kind", "unknown"))

    @property
    def current(self) -> bool:
        """Whether it was made with the installed versions (an entry made with others is never read again)."""
        if self.key is None or self.key.get("cache_format") != CACHE_FORMAT:
            return False
        recorded = self.key.get("versions")
        if not isinstance(recorded, dict):
            return False
        installed = installed_versions()
        return all(installed.get(name) == version for name, version in recorded.items())


def list_entries(cache_dir: str | os.PathLike[str] | None = None) -> list[EntryInfo]:
    """Every entry of the cache, oldest use first (temporary folders of runs in progress left out)."""
    root = Path(cache_dir) if cache_dir is not None else export_cache_dir()
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        if folder.name.startswith(".") or not folder.is_dir() or folder.is_symlink():
            continue
        stored = _read_key_file(folder)
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
        stamp = folder / KEY_FILE if stored is not None else folder
        found.append(EntryInfo(folder, None if stored is None else stored["key"], size, stamp.stat().st_mtime))
    return sorted(found, key=lambda entry: entry.last_used)


def remove_entry(entry: EntryInfo) -> None:
    """Remove one entry: renamed out of place first, so a run never opens half of it."""
    doomed = Path(tempfile.mkdtemp(prefix=f".{entry.folder.name}.", suffix=".tmp", dir=entry.folder.parent))
    os.replace(entry.folder, doomed)  # onto the empty folder just made
    shutil.rmtree(doomed, ignore_errors=True)


def _remove_stale(root: Path) -> None:
    """Temporary folders of killed runs (``atomic_directory``'s ``.NAME.*.tmp``), once clearly abandoned."""
    with contextlib.suppress(OSError):
        for path in root.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if time.time() - path.stat().st_mtime > STALE_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)


def onnx_export(
    encoder: nn.Module, *, cache_dir: str | os.PathLike[str] | None = None, threads: int | None = None
) -> CachedModel:
    """``encoder`` (an ``MECEncoder`` as ``mec_hub.load`` returns it) run by ONNX Runtime through its
    cached export, made (and checked against ``encoder``) on first use."""
    for package in ("onnxruntime", "onnxscript", "onnx"):
        require(package, "runtime='onnxruntime'", arguments=("runtime",))
    key = export_key(encoder)

    def make(folder: Path) -> dict[str, Any]:
        started = time.perf_counter()
        result = export_encoder(encoder, folder / MODEL_FILE, fmt="onnx", dynamic_batch=True)
        return {
            "onnx_sha256": result.sha256,
            "max_rel_diff_vs_pytorch": result.max_rel_diff,
            "export_seconds": round(time.perf_counter() - started, 2),
        }

    return cached_entry(key, make, what="ONNX export", cache_dir=cache_dir, threads=threads)


def describe(entry: CachedModel) -> dict[str, Any]:
    """What ``FEATS.meta.json`` records of the export that ran: its entry, what was measured when it
    was made, and the versions running it."""
    return {
        "cache_entry": entry.folder.name,
        **entry.record,
        "onnxruntime_version": package_versions(("onnxruntime",))["onnxruntime"],
    }
