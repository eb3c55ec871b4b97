"""Turn what the user named (folders, files, glob patterns, a list file) into the ordered image list.

Order is deterministic: inputs in the order given; inside a folder, files sorted by their path
components (so ``a/x.jpg`` comes before ``b.jpg``, as in an ImageFolder layout). A file reached
twice under the same absolute path is kept once, where it first appears.

Each item carries two paths: ``name``, written to ``FEATS.paths.txt``, and ``path``, the absolute
path that is read. With a single folder as the only input, names are relative to that folder;
otherwise a file is named as the user named it and a file found in a folder as
``FOLDER/relative/path`` (so that names from different inputs cannot collide).

Inside folders only files with an image extension are taken, and hidden files and folders (names
starting with ``.``) are left out, as are the temporary files ``mec-embed`` writes; a file named
explicitly (an INPUT or a line of ``--files-from``) is always taken, whatever its extension. A
listed file that does not exist becomes a failed row ("file not found"); an INPUT that does not
exist is an error before any work. Relative paths in a list file are relative to the current
folder (as with ``tar -T``), not to the list file.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mec_hub.data.images import IMAGE_EXTENSIONS
from mec_hub.errors import MecHubError

_GLOB_CHARS = frozenset("*?[")


class InputError(MecHubError, FileNotFoundError):
    """An INPUT or list file that does not exist, a pattern that matches nothing, an unreadable folder."""


@dataclass(frozen=True)
class ImageItem:
    name: str  # as written to paths.txt
    path: str  # absolute path to read


@dataclass
class CollectedInputs:
    """The ordered, de-duplicated images to embed, and what was left out of folder walks."""

    items: list[ImageItem]
    skipped: int = 0  # files in walked folders without an image extension
    base_dir: str = ""  # what the names in ``items`` are relative to (absolute)
    sources: list[str] = field(default_factory=list)  # the INPUTs as given, for the record
    files_from: str | None = None  # the list file, as given

    def __len__(self) -> int:
        return len(self.items)

    def digest(self) -> str:
        """SHA-256 of the ordered (name, absolute path) list: equal lists, equal digests."""
        sha = hashlib.sha256()
        for item in self.items:
            sha.update(os.fsencode(item.name) + b"\0" + os.fsencode(item.path) + b"\n")
        return sha.hexdigest()


def is_image_file_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _has_glob(text: str) -> bool:
    return any(ch in _GLOB_CHARS for ch in text)


def _raise_walk_error(exc: OSError) -> None:
    reason = exc.strerror or str(exc)
    raise InputError(f"cannot read folder {exc.filename}: {reason}")


def walk_images(folder: str, *, recursive: bool = True) -> tuple[list[str], int]:
    """Relative paths of the image files under ``folder`` (sorted), and how many other files there were.

    Symbolic links to folders are followed, each real folder once (no loops).
    """
    found: list[tuple[str, ...]] = []
    skipped = 0
    seen_dirs: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(folder, onerror=_raise_walk_error, followlinks=True):
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in seen_dirs:
            dirs[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        rel_root = os.path.relpath(root, folder)
        prefix = () if rel_root == os.curdir else tuple(Path(rel_root).parts)
        for fname in files:
            if fname.startswith("."):
                continue
            if is_image_file_name(fname):
                found.append((*prefix, fname))
            else:
                skipped += 1
    found.sort()
    return [os.path.join(*parts) for parts in found], skipped


def read_list_file(list_file: str) -> list[str]:
    """Paths listed one per line (blank lines ignored); ``-`` reads standard input."""
    if list_file == "-":
        text = sys.stdin.read()
    else:
        try:
            with open(list_file, encoding="utf-8", errors="surrogateescape") as fh:
                text = fh.read()
        except FileNotFoundError:
            raise InputError(f"--files-from: no such file {list_file!r}") from None
        except OSError as exc:
            raise InputError(f"--files-from: cannot read {list_file!r} ({exc.strerror or exc})") from None
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


class _Collector:
    def __init__(self, recursive: bool) -> None:
        self.recursive = recursive
        self.items: list[ImageItem] = []
        self.skipped = 0
        self._seen: set[str] = set()

    def add_file(self, name: str) -> None:
        path = os.path.abspath(name)
        if path not in self._seen:
            self._seen.add(path)
            self.items.append(ImageItem(name, path))

    def add_folder(self, folder: str, *, relative_names: bool) -> None:
        rel_paths, skipped = walk_images(folder, recursive=self.recursive)
        self.skipped += skipped
        for rel in rel_paths:
            path = os.path.abspath(os.path.join(folder, rel))
            if path not in self._seen:
                self._seen.add(path)
                self.items.append(ImageItem(rel if relative_names else os.path.join(folder, rel), path))

    def add(self, name: str, *, relative_names: bool = False) -> None:
        if os.path.isdir(name):
            self.add_folder(name, relative_names=relative_names)
        else:
            self.add_file(name)


def _expand(inputs: Iterable[str]) -> Iterator[tuple[str, list[str]]]:
    """(input, the existing paths it stands for); raises for inputs that stand for nothing."""
    missing = []
    for text in inputs:
        if os.path.exists(text):
            yield text, [text]
        elif _has_glob(text):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                missing.append(f"no file matches the pattern {text!r}")
            yield text, matches
        else:
            missing.append(f"input not found: {text!r}" + (" (a broken symbolic link)" if os.path.islink(text) else ""))
    if missing:
        raise InputError("; ".join(missing))


def check_inputs_exist(inputs: Sequence[str], files_from: str | None = None) -> None:
    """Fail fast, before anything is loaded, on an INPUT or list file that does not exist."""
    for _ in _expand(inputs):
        pass
    if files_from is not None and files_from != "-" and not os.path.isfile(files_from):
        raise InputError(f"--files-from: no such file {files_from!r}")


def collect_inputs(
    inputs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    *,
    files_from: str | os.PathLike[str] | None = None,
    recursive: bool = True,
) -> CollectedInputs:
    """The ordered list of images named by ``inputs`` (folders, files, globs) and ``files_from``."""
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    texts = [os.fspath(x) for x in inputs]
    list_entries = read_list_file(os.fspath(files_from)) if files_from is not None else []
    if not texts and files_from is None:
        raise InputError("no input given: name folders, files or patterns, or use --files-from")
    expanded = list(_expand(texts))
    single_folder = len(texts) == 1 and files_from is None and os.path.isdir(texts[0])
    collector = _Collector(recursive)
    for _, paths in expanded:
        for path in paths:
            collector.add(path, relative_names=single_folder)
    for entry in list_entries:
        collector.add(entry)
    base_dir = os.path.abspath(texts[0]) if single_folder else os.path.abspath(os.curdir)
    listed = os.fspath(files_from) if files_from is not None else None
    return CollectedInputs(collector.items, collector.skipped, base_dir, texts, listed)
