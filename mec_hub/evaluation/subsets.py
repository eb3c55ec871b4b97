"""Labelled subsets of a training folder for semi-supervised evaluation: by fraction and seed, or from a list file.

The community's 1% and 10% ImageNet subsets (SimCLR's ``imagenet_subsets/1percent.txt`` and
``10percent.txt``, used by BYOL, Barlow Twins and their successors) are text files of one image
file name a line (``n01440764_10026.JPEG``). :func:`read_subset_file` reads that format, and also
``CLASS/NAME`` lines for folders whose file names repeat across classes; :func:`write_subset_file`
writes it back, so a subset chosen here by fraction can be reused by any of those codebases.

:func:`balanced_subset` picks ``round(fraction * n_c)`` images of each class ``c`` (at least one),
from a permutation of the class's sorted files drawn from ``(seed, class index)``: the same
folder, fraction and seed give the same subset on any machine, whatever the other classes hold.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

from mec_hub.data.datasets import derive_seed
from mec_hub.errors import MecHubError
from mec_hub.fileio import atomic_write_text

# A subset list is a few MB at most (ImageNet's 10% list: 128,116 lines, 2.6 MB).
MAX_SUBSET_FILE_BYTES = 64 * 1024 * 1024


class SubsetError(MecHubError):
    """A subset list or fraction that cannot select images; the message names the file and line."""


def balanced_subset(samples: Sequence[tuple[str, int]], fraction: float, *, seed: int = 0) -> list[int]:
    """Sorted indices into ``samples`` (``(path, class index)``): ``round(fraction * n_c)`` of each class, >= 1."""
    if not 0 < fraction <= 1:
        raise SubsetError(f"the fraction of labels must be in (0, 1], got {fraction}")
    members: dict[int, list[int]] = defaultdict(list)
    for index, (_, label) in enumerate(samples):
        members[label].append(index)
    chosen: list[int] = []
    for label in sorted(members):
        ordered = sorted(members[label], key=lambda i: samples[i][0])
        generator = torch.Generator().manual_seed(derive_seed(seed, label))
        keep = max(1, round(fraction * len(ordered)))
        chosen += [ordered[i] for i in torch.randperm(len(ordered), generator=generator)[:keep].tolist()]
    return sorted(chosen)


def read_subset_file(
    path: str | os.PathLike[str], samples: Sequence[tuple[str, int]], root: str | os.PathLike[str]
) -> list[int]:
    """Sorted indices into ``samples`` of the images a subset list names; each line must name exactly one.

    A line is a file name (matched against the base names of the folder's images) or a path
    relative to ``root`` (``CLASS/NAME``); blank lines and ``#`` comments are ignored. Names that
    match no image, or several, and names listed twice are errors naming the line.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_SUBSET_FILE_BYTES + 1)
    except OSError as exc:
        raise SubsetError(f"subset list {path}: cannot read it ({exc.strerror or exc})") from None
    if len(data) > MAX_SUBSET_FILE_BYTES:
        raise SubsetError(f"subset list {path}: larger than {MAX_SUBSET_FILE_BYTES // 2**20} MB; not a subset list")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SubsetError(f"subset list {path}: not UTF-8 text (byte {exc.start})") from None
    root = Path(root)
    by_relative: dict[str, int] = {}
    by_name: dict[str, list[int]] = defaultdict(list)
    for index, (sample_path, _) in enumerate(samples):
        relative = Path(sample_path).relative_to(root).as_posix()
        by_relative[relative] = index
        by_name[Path(sample_path).name].append(index)
    chosen: dict[int, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "/" in line:
            index = by_relative.get(line)
            if index is None:
                raise SubsetError(f"subset list {path}, line {number}: no image {line!r} in {root}")
        else:
            matches = by_name.get(line, [])
            if not matches:
                raise SubsetError(f"subset list {path}, line {number}: no image named {line!r} in {root}")
            if len(matches) > 1:
                where = ", ".join(Path(samples[i][0]).relative_to(root).as_posix() for i in matches[:3])
                raise SubsetError(
                    f"subset list {path}, line {number}: {line!r} names {len(matches)} images ({where}); "
                    "write CLASS/NAME"
                )
            index = matches[0]
        if index in chosen:
            first = chosen[index]
            raise SubsetError(f"subset list {path}, line {number}: {line!r} is listed twice (first on line {first})")
        chosen[index] = number
    if not chosen:
        raise SubsetError(f"subset list {path}: names no image")
    return sorted(chosen)


def write_subset_file(
    path: str | os.PathLike[str],
    samples: Sequence[tuple[str, int]],
    indices: Sequence[int],
    root: str | os.PathLike[str],
) -> Path:
    """The chosen images, one a line: base names where they are unique in the folder (the community's
    format), ``CLASS/NAME`` otherwise; written atomically."""
    root = Path(root)
    counts: dict[str, int] = defaultdict(int)
    for sample_path, _ in samples:
        counts[Path(sample_path).name] += 1
    lines = []
    for index in indices:
        name = Path(samples[index][0]).name
        line = name if counts[name] == 1 else Path(samples[index][0]).relative_to(root).as_posix()
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:
            raise SubsetError(
                f"{samples[index][0]!r}: a file name that is not UTF-8 cannot be a line of {path}; "
                "rename it (e.g. with convmv)"
            ) from None
        lines.append(line)
    return atomic_write_text(path, "".join(f"{line}\n" for line in lines))
