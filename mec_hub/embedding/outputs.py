"""The files of one ``--out FEATS.npy`` run, and the checks made on them before any work.

Final files: ``FEATS.npy``, ``FEATS.paths.txt``, ``FEATS.meta.json``. While the run is going,
each process writes hidden files beside them (``.FEATS.npy.part-R-of-W`` for rows,
``...failed.jsonl`` for failures, ``...state.json`` for the checkpoint); the final names only
appear, by rename, when everything is done, ``FEATS.npy`` last.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from mec_hub.data.featurefile import META_SUFFIX, PATHS_SUFFIX, sidecar
from mec_hub.errors import MecHubError


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
        """``feats`` and ``feats.npy`` both mean ``feats.npy`` (as ``np.save`` does)."""
        path = Path(os.path.abspath(os.path.expanduser(os.fspath(out))))
        if path.suffix != ".npy":
            path = path.with_name(path.name + ".npy")
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
    """An exclusive lock on the outputs, so two runs never write the same files (POSIX only)."""

    def __init__(self, files: OutputFiles) -> None:
        self.path = files.lock
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; the user keeps runs apart
            return
        fh = open(self.path, "a+")  # noqa: SIM115
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise OutputError(
                f"another mec-embed run is writing {self.path.name[1 : -len('.lock')]} (lock {self.path})"
            ) from None
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self._fh.close()
            self._fh = None
