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

A ``.tar`` file named as an INPUT (or a list line) is a WebDataset shard, listed by
``mec_hub.data.tarshard.walk_tar`` (headers only, each checked against the shard's length): each
regular member with an image extension is an item, named ``SHARD.tar/MEMBER`` (the shard's file
name; the shard as named, if two shards share a file name), in the shard's order, and so is a hard
link to an earlier regular member (its row reads the target's bytes). Every other member is counted
as skipped; those that are not regular files are also listed with their reason
(``CollectedInputs.skipped_members``: "not a regular file: symlink", ...). A member that cannot be
read (a hard link to nothing) and a damaged shard's remainder (truncated, a bad header, a size past
the end of the file) are items that fail when decoded, with the reason: the remainder is named
``SHARD.tar@OFFSET`` (the byte where the walk stopped), so that it is counted and listed among the
failures and ``--strict`` sees it, and the members before it are kept. The item's ``path`` is a
reference (``TarMember``) to the member's bytes, read with one seek when the image is decoded. An
INPUT may hold brace ranges as webdataset writes them: ``shards/{000000..000099}.tar``, ``{a,b}``.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mec_hub.data.images import IMAGE_EXTENSIONS, ImageDecodeError
from mec_hub.data.tarshard import TarFailure, TarShardError, TarSkippedMember, walk_tar
from mec_hub.errors import MecHubError
from mec_hub.fileio import open_regular_file

_GLOB_CHARS = frozenset("*?[")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
# Starts an item path that refers to a tar member; no file path holds a NUL character.
_MEMBER_PREFIX = "\0tar\0"


class InputError(MecHubError, FileNotFoundError):
    """An INPUT or list file that does not exist, a pattern that matches nothing, an unreadable folder."""


@dataclass(frozen=True)
class ImageItem:
    name: str  # as written to paths.txt
    path: str  # absolute path to read


@dataclass
class CollectedInputs:
    """The ordered, de-duplicated images to embed, and what was left out of folder walks and tar shards."""

    items: list[ImageItem]
    skipped: int = 0  # files in walked folders without an image extension, tar members not embedded
    base_dir: str = ""  # what the names in ``items`` are relative to (absolute)
    sources: list[str] = field(default_factory=list)  # the INPUTs as given, for the record
    files_from: str | None = None  # the list file, as given
    # (SHARD.tar/MEMBER, reason) of the tar members counted in ``skipped`` that are not regular files
    # (symlink, folder, device, FIFO, sparse) or hard links to nothing, without an image extension
    skipped_members: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def digest(self) -> str:
        """SHA-256 of the ordered (name, absolute path) list: equal lists, equal digests."""
        sha = hashlib.sha256()
        for item in self.items:
            sha.update(os.fsencode(item.name) + b"\0" + os.fsencode(item.path) + b"\n")
        return sha.hexdigest()


@dataclass(frozen=True)
class TarMember:
    """Where a member's bytes lie in a tar shard: ``size`` bytes from ``offset`` in ``shard``; or, with
    ``error`` set, a member (or the rest of a damaged shard, from ``offset``) that fails with that reason."""

    shard: str  # absolute path
    offset: int
    size: int
    error: str = ""

    def encode(self) -> str:
        """The member as an item path (what ``ImageItem.path`` holds)."""
        failure = f"\0{self.error}" if self.error else ""  # after the shard: no file path holds a NUL
        return f"{_MEMBER_PREFIX}{self.offset}:{self.size}:{self.shard}{failure}"

    @classmethod
    def parse(cls, path: str) -> TarMember | None:
        """The member an item path refers to, or None for the path of a plain file."""
        if not path.startswith(_MEMBER_PREFIX):
            return None
        offset, size, rest = path[len(_MEMBER_PREFIX) :].split(":", 2)
        shard, _, error = rest.partition("\0")
        return cls(shard, int(offset), int(size), error)

    def read(self) -> bytes:
        """The member's bytes (one seek and one read; the shard must be a regular file)."""
        if self.error:
            raise ImageDecodeError(self.error)
        try:
            with open_regular_file(self.shard) as fh:
                fh.seek(self.offset)
                data = fh.read(self.size)
        except FileNotFoundError:
            raise ImageDecodeError("tar shard not found") from None
        except OSError as exc:
            raise ImageDecodeError(f"cannot read the tar shard ({exc.strerror or exc})") from None
        if len(data) != self.size:
            raise ImageDecodeError("truncated tar member (the shard ends early)")
        return data


def expand_braces(text: str) -> list[str]:
    """``text`` with its brace ranges expanded, as webdataset and the shell do: ``{000..002}`` ->
    000, 001, 002 (the width of the first bound kept), ``{a,b}`` -> a, b; in order, left to right."""
    found = _BRACE.search(text)
    if found is None:
        return [text]
    head, body, tail = text[: found.start()], found.group(1), text[found.end() :]
    numbers = _RANGE.match(body)
    if numbers:
        lo, hi = int(numbers.group(1)), int(numbers.group(2))
        width = len(numbers.group(1)) if numbers.group(1).startswith("0") else 0
        step = 1 if hi >= lo else -1
        choices = [str(n).zfill(width) for n in range(lo, hi + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:  # not a brace expression: kept as written
        return [head + "{" + body + "}" + rest for rest in expand_braces(tail)]
    return [head + choice + rest for choice in choices for rest in expand_braces(tail)]


def is_tar_shard(path: str) -> bool:
    return path.lower().endswith(".tar") and os.path.isfile(path)


@dataclass
class ShardListing:
    """What ``list_tar_members`` found in one shard; every member is in exactly one of the lists."""

    # (member name, where its bytes are) of the image members, in the shard's order, and of the
    # failures among them: a member that cannot be read (``TarMember.error`` set; the name is the
    # member's) or, last, the damaged rest of the shard (the name is None; ``offset`` is where it starts)
    members: list[tuple[str | None, TarMember]] = field(default_factory=list)
    other_files: int = 0  # regular members without an image extension
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (member name, reason) of the others


def list_tar_members(shard: str) -> ShardListing:
    """The members of tar shard ``shard``, sorted into what is embedded, what fails and what is skipped.
    Reads the headers only (``walk_tar``); raises ``InputError`` for a file that is not a tar at all."""
    path = os.path.abspath(shard)
    try:
        entries = walk_tar(path)
    except TarShardError as exc:
        raise InputError(f"cannot read the tar shard {shard}: {exc.reason}") from None
    listing = ShardListing()
    for entry in entries:
        if isinstance(entry, TarSkippedMember):
            listing.skipped.append((_member_name(entry.name), entry.reason))
        elif isinstance(entry, TarFailure) and entry.name is None:
            listing.members.append((None, TarMember(path, entry.offset, 0, f"damaged tar shard: {entry.reason}")))
        elif not is_image_file_name(entry.name):
            if isinstance(entry, TarFailure):
                listing.skipped.append((_member_name(entry.name), entry.reason))
            else:
                listing.other_files += 1
        elif isinstance(entry, TarFailure):
            listing.members.append((_member_name(entry.name), TarMember(path, entry.offset, 0, entry.reason)))
        else:
            listing.members.append((_member_name(entry.name), TarMember(path, entry.offset, entry.size)))
    return listing


def _member_name(name: str) -> str:
    return name.removeprefix("./").lstrip("/")  # as `tar -cf s.tar .` writes them


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
            raise InputError(f"files_from=: no such file {list_file!r}", arguments=("files_from",)) from None
        except OSError as exc:
            raise InputError(
                f"files_from=: cannot read {list_file!r} ({exc.strerror or exc})", arguments=("files_from",)
            ) from None
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


class _Collector:
    def __init__(self, recursive: bool) -> None:
        self.recursive = recursive
        self.items: list[ImageItem] = []
        self.skipped = 0
        self.skipped_members: list[tuple[str, str]] = []
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

    def add_shard(self, shard: str, label: str) -> None:
        listing = list_tar_members(shard)
        self.skipped += listing.other_files + len(listing.skipped)
        self.skipped_members += [(f"{label}/{name}", reason) for name, reason in listing.skipped]
        for member_name, member in listing.members:
            path = member.encode()
            name = f"{label}@{member.offset}" if member_name is None else f"{label}/{member_name}"
            key = f"{path}\0{name}"  # a hard link reads the bytes of its target: same path, its own row
            if key not in self._seen:
                self._seen.add(key)
                self.items.append(ImageItem(name, path))

    def add(self, name: str, *, relative_names: bool = False, shard_label: str | None = None) -> None:
        if os.path.isdir(name):
            self.add_folder(name, relative_names=relative_names)
        elif is_tar_shard(name):
            self.add_shard(name, shard_label or name)
        else:
            self.add_file(name)


def _expand(inputs: Iterable[str]) -> Iterator[tuple[str, list[str]]]:
    """(input, the existing paths it stands for); raises for inputs that stand for nothing."""
    missing = []
    for text in inputs:
        if not os.path.exists(text) and _BRACE.search(text):
            expanded = expand_braces(text)
            absent = [p for p in expanded if not os.path.exists(p)]
            if absent:
                missing.append(f"{len(absent)} of the {len(expanded)} files of {text!r} not found, e.g. {absent[0]!r}")
            yield text, [p for p in expanded if os.path.exists(p)]
        elif os.path.exists(text):
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


def _shard_labels(paths: Sequence[str]) -> dict[str, str]:
    """How each tar shard is named in the rows' names: its file name, or the path as given when
    another shard has the same file name."""
    shards = [p for p in paths if p.lower().endswith(".tar")]
    counts: dict[str, int] = {}
    for shard in shards:
        counts[os.path.basename(shard)] = counts.get(os.path.basename(shard), 0) + 1
    return {s: os.path.basename(s) if counts[os.path.basename(s)] == 1 else s for s in shards}


def check_inputs_exist(inputs: Sequence[str], files_from: str | None = None) -> None:
    """Fail fast, before anything is loaded, on an INPUT or list file that does not exist."""
    for _ in _expand(inputs):
        pass
    if files_from is not None and files_from != "-" and not os.path.isfile(files_from):
        raise InputError(f"files_from=: no such file {files_from!r}", arguments=("files_from",))


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
        raise InputError(
            "no input given: name folders, files or patterns, or use files_from=", arguments=("files_from",)
        )
    expanded = list(_expand(texts))
    single_folder = len(texts) == 1 and files_from is None and os.path.isdir(texts[0])
    collector = _Collector(recursive)
    labels = _shard_labels([p for _, paths in expanded for p in paths] + list_entries)
    for _, paths in expanded:
        for path in paths:
            collector.add(path, relative_names=single_folder, shard_label=labels.get(path))
    for entry in list_entries:
        collector.add(entry, shard_label=labels.get(entry))
    base_dir = os.path.abspath(texts[0]) if single_folder else os.path.abspath(os.curdir)
    listed = os.fspath(files_from) if files_from is not None else None
    return CollectedInputs(collector.items, collector.skipped, base_dir, texts, listed, collector.skipped_members)
