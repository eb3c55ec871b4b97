"""The files of one ``--out FEATS.npy`` run, and the checks made on them before any work.

Final files: ``FEATS.npy``, ``FEATS.paths.txt``, ``FEATS.meta.json``. While the run is going,
each process writes hidden files beside them (``.FEATS.npy.part-R-of-W`` for rows,
``...failed.jsonl`` for failures, ``...state.json`` for the checkpoint); the final names only
appear, by rename, when everything is done, ``FEATS.meta.json`` last (``mec_hub.data.featurefile``).

``RunLock`` keeps two runs from writing the same outputs at once.

For ``--out FEATS.parquet`` (``ParquetTarget``) the run writes the same set under hidden names
(``.FEATS.parquet.npy`` ...), resumable as always; when it is complete, it is converted to the
Parquet file(s), each published by rename, and only then removed: a run stopped during the
conversion is finished by ``--resume``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from mec_hub.data.featurefile import (
    META_SUFFIX,
    PARQUET_SUFFIX,
    PATHS_SUFFIX,
    FeatureFile,
    parquet_shards,
    sidecar,
    write_parquet,
)
from mec_hub.errors import InvalidArgumentError, MecHubError

NPY_SUFFIX = ".npy"
#: The output formats, by the suffix of ``--out`` / ``out=`` that chooses them: the one rule, for the
#: CLI and the Python API. A name without a suffix is ``NAME.npy`` (as ``np.save`` writes it); any other
#: suffix is refused (``n.csv`` would otherwise become ``n.csv.npy``, a file that is not what it says).
OUTPUT_FORMATS = {
    NPY_SUFFIX: "an N x D .npy array with NAME.paths.txt and NAME.meta.json beside it",
    PARQUET_SUFFIX: "a Parquet file, or its shards; pip install 'mec-hub[parquet]'",
}


class OutputError(MecHubError):
    """An output that cannot be written, or that exists and may not be replaced."""


@dataclass(frozen=True)
class PartFiles:
    """What one process of a run writes while it works."""

    data: Path
    failed: Path
    state: Path

    def all(self) -> tuple[Path, Path, Path]:
        return self.data, self.failed, self.state


@dataclass(frozen=True)
class OutputFiles:
    npy: Path

    @classmethod
    def for_out(cls, out: str | os.PathLike[str]) -> OutputFiles:
        """``feats`` and ``feats.npy`` both mean ``feats.npy`` (as ``np.save`` does); another suffix
        (``feats.csv``) is an :class:`~mec_hub.errors.InvalidArgumentError` listing ``OUTPUT_FORMATS``.

        ``out`` names a file: a folder (``.``, ``""``, ``photos/``, an existing folder) is refused,
        rather than guessing a file name for it.
        """
        given = os.fspath(out)
        text = os.path.expanduser(given)
        seps = (os.sep, os.altsep) if os.altsep else (os.sep,)
        if not text or text.endswith(seps) or os.path.basename(text) in (os.curdir, os.pardir) or os.path.isdir(text):
            if not given:
                raise OutputError("out= is empty; it takes a file name, such as feats.npy", arguments=("out",))
            example = os.path.join(given, "feats.npy")
            raise OutputError(
                f"out={given!r} names a folder; it takes a file name, such as {example}", arguments=("out",)
            )
        path = Path(os.path.abspath(text))
        if not path.suffix:
            path = path.with_name(path.name + NPY_SUFFIX)
        elif path.suffix != NPY_SUFFIX:
            raise unsupported_format(given, path.suffix)
        return cls(path)

    @property
    def paths_txt(self) -> Path:
        return sidecar(self.npy, PATHS_SUFFIX)

    @property
    def meta_json(self) -> Path:
        return sidecar(self.npy, META_SUFFIX)

    @property
    def finals(self) -> tuple[Path, Path, Path]:
        return self.npy, self.paths_txt, self.meta_json

    @property
    def lock(self) -> Path:
        return self.npy.with_name(f".{self.npy.name}.lock")

    def part(self, rank: int, world_size: int) -> PartFiles:
        base = self.npy.with_name(f".{self.npy.name}.part-{rank}-of-{world_size}")
        return PartFiles(base, base.with_name(base.name + ".failed.jsonl"), base.with_name(base.name + ".state.json"))

    def part_states(self) -> list[Path]:
        """State files of any unfinished run into these outputs, whatever its number of processes."""
        return sorted(self.npy.parent.glob(f".{self.npy.name}.part-*-of-*.state.json"))

    def all_part_files(self) -> list[Path]:
        return sorted(self.npy.parent.glob(f".{self.npy.name}.part-*-of-*"))

    def existing_finals(self) -> list[Path]:
        return [p for p in self.finals if p.exists()]


def unsupported_format(out: str, suffix: str) -> InvalidArgumentError:
    """The error for an ``out`` whose suffix names no output format, listing the formats."""
    formats = " or ".join(f"NAME{known} ({what})" for known, what in OUTPUT_FORMATS.items())
    return InvalidArgumentError(
        f"out={out!r}: {suffix} is not an output format. Use {formats}; a NAME without a suffix is NAME.npy",
        arguments=("out",),
    )


@dataclass(frozen=True)
class ParquetTarget:
    """``--out FEATS.parquet`` (``shard_rows``: ``FEATS-00000.parquet`` ...), and the hidden
    ``.npy`` set the run writes first (``staging``)."""

    path: Path
    shard_rows: int | None = None

    @classmethod
    def for_out(cls, out: str | os.PathLike[str], shard_rows: int | None = None) -> ParquetTarget | None:
        """The target ``out`` names, or None when it is not a ``.parquet`` name."""
        text = os.path.expanduser(os.fspath(out))
        if not text.endswith(PARQUET_SUFFIX) or os.path.isdir(text):
            return None
        return cls(Path(os.path.abspath(text)), shard_rows)

    @property
    def staging(self) -> OutputFiles:
        return OutputFiles(self.path.with_name(f".{self.path.name}.npy"))

    def existing(self) -> list[Path]:
        return ([self.path] if self.path.exists() else []) + parquet_shards(self.path)

    def refuse_clobbering(self, *, resume: bool, overwrite: bool) -> None:
        """Finished Parquet output is replaced only with ``overwrite`` (``resume`` of a run whose
        conversion was stopped may replace the files it had already written)."""
        existing = self.existing()
        if existing and not overwrite and not (resume and self.staging.existing_finals()):
            names = ", ".join(p.name for p in existing[:3]) + (" ..." if len(existing) > 3 else "")
            raise OutputError(
                f"{names} already exist in {self.path.parent}; pass overwrite=True to replace them",
                arguments=("overwrite",),
            )

    def publish(self) -> list[Path]:
        """Convert the finished hidden set to Parquet, then remove it."""
        staged = self.staging
        try:
            written = write_parquet(FeatureFile.open(staged.npy), self.path, shard_rows=self.shard_rows)
        except OSError as exc:
            raise OutputError(
                f"cannot write {self.path.name} ({exc.strerror or exc}); the embedded rows are kept: "
                "run it again with resume=True to finish",
                arguments=("resume",),
            ) from None
        if self.shard_rows is not None:
            self.path.unlink(missing_ok=True)
        else:
            for shard in self.existing()[1:]:
                shard.unlink(missing_ok=True)
        for path in reversed(staged.finals):  # the meta first: the set no longer counts as finished
            path.unlink(missing_ok=True)
        return written


@dataclass(frozen=True)
class OutputTarget:
    """What ``out`` names: an ``.npy`` set written in place, or Parquet written through a hidden
    ``.npy`` set (``files`` is where the run writes, ``parquet`` where it publishes). The one
    place the output format is chosen, for the Python API and the CLI alike."""

    files: OutputFiles
    parquet: ParquetTarget | None = None

    @classmethod
    def for_out(cls, out: str | os.PathLike[str], shard_rows: int | None = None) -> OutputTarget:
        parquet = ParquetTarget.for_out(out, shard_rows)
        if parquet is None:
            if shard_rows is not None:
                raise OutputError(f"shard_rows applies to Parquet output (a FEATS.parquet name), not {os.fspath(out)}")
            return cls(OutputFiles.for_out(out))
        return cls(parquet.staging, parquet)


def check_output_location(files: OutputFiles) -> None:
    """Create the output folder if needed and prove it is writable, before anything is computed."""
    for path in files.finals:
        if path.is_dir():
            raise OutputError(f"output {path} is a folder; give a file name such as {path}/features.npy")
    folder = files.npy.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"cannot create output folder {folder}: a file has that name") from None
    except OSError as exc:
        raise OutputError(f"cannot create output folder {folder}: {exc.strerror or exc}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{files.npy.name}.", suffix=".probe", dir=folder)
    except OSError as exc:
        raise OutputError(f"cannot write to output folder {folder}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)


class RunLock:
    """An exclusive lock on the outputs, so two runs never write the same files (POSIX only).

    A POSIX record lock (``fcntl.lockf``) on the hidden file ``.FEATS.npy.lock``: it belongs to
    the process that took it, so the decoding workers it forks do not hold it, and the kernel
    releases it when that process dies, however it dies. The file is removed by the holder, while
    it still holds the lock; so a lock taken on a file that is no longer the one at that path
    (removed, or replaced by another run's, between opening and locking) is worthless, and
    ``acquire`` opens the path again. Record locks do not exclude threads of one process, so the
    outputs a process is writing are also kept in ``_held``. Under torchrun only the first process
    takes it.
    """

    _held: ClassVar[set[tuple[int, int, str]]] = set()  # (device, inode of the folder, name) locked here
    _held_guard: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, files: OutputFiles) -> None:
        self.path = files.lock
        self._target = files.npy
        self._fd: int | None = None
        self._key: tuple[int, int, str] | None = None

    def _refuse(self) -> OutputError:
        return OutputError(f"another mec-embed run is writing {self._target.name} (lock {self.path})")

    def acquire(self) -> None:
        try:
            import fcntl  # POSIX only: imported here so that the module loads on Windows
        except ImportError:  # Windows: no advisory locks; the user keeps runs apart
            return
        folder = os.stat(self.path.parent)  # the same folder under any name it is given
        key = (folder.st_dev, folder.st_ino, self.path.name)
        with self._held_guard:
            if key in self._held:
                raise self._refuse()
            self._held.add(key)
        try:
            self._fd = self._lock_the_file(fcntl)
        except BaseException:
            with self._held_guard:
                self._held.discard(key)
            raise
        self._key = key

    def _lock_the_file(self, fcntl) -> int:  # type: ignore[no-untyped-def]
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as exc:
                raise OutputError(f"cannot create the lock file {self.path}: {exc.strerror or exc}") from None
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EAGAIN):
                    os.close(fd)
                    raise self._refuse() from None
                # A file system without locks (ENOLCK ...): as on Windows, runs are the user's to keep apart.
                warnings.warn(
                    f"cannot lock {self.path} ({exc.strerror or exc}); nothing keeps another run from writing "
                    f"{self._target.name} at the same time",
                    stacklevel=4,
                )
                return fd
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)  # locked a file its holder had already removed: take the one there now

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # while still locked: see the class docstring
            os.close(self._fd)
        finally:
            self._fd = None
            with self._held_guard:
                self._held.discard(self._key)  # type: ignore[arg-type]
