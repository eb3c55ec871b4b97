"""Where an export writes: the path checked before any work, and a failed write as one error.

Every writer of ``mec_hub.export`` (the hub folder, the ONNX/TorchScript file and its ``FILE.json``,
the torchvision and Detectron2 files) writes through ``output_path``. Before anything is written it
refuses an existing output without ``overwrite``, a folder where a file is written (or a file
where a folder is), and a path under a file; while writing, an ``OSError`` (a read-only or
pseudo file system such as ``/proc``, a full disk, no permission) becomes one ``OutputPathError``
naming the path and the reason. The writes themselves are atomic (``mec_hub.fileio``): on failure
the temporary file or folder is gone, an existing output is as it was, and the folders created
for the output are removed again.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from mec_hub.errors import MecHubError


class OutputPathError(MecHubError):
    """An output that may not or cannot be written where asked (exists, wrong kind, unwritable place)."""


def _kind(folder: bool) -> str:
    return "folder" if folder else "file"


def check_output(path: str | os.PathLike[str], *, folder: bool, overwrite: bool) -> Path:
    """``path``, once known to be a place where a ``folder`` (else a file) may be written.

    Raises ``OutputPathError`` for an existing output without ``overwrite``, an existing output
    of the other kind (``overwrite`` replaces a file by a file and a folder by a folder only) and
    a path whose nearest existing parent is not a folder.
    """
    path = Path(path)
    if os.path.lexists(path):
        if path.is_dir() != folder:
            raise OutputPathError(f"cannot write {path}: it is a {_kind(not folder)}, and a {_kind(folder)} goes here")
        if not overwrite:
            raise OutputPathError(f"{path} already exists; pass overwrite=True to replace it", arguments=("overwrite",))
        return path
    parent = path.parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"cannot write {path}: {parent} is not a folder")
    return path


def write_error_message(path: str | os.PathLike[str], exc: OSError) -> str:
    """``cannot write PATH: REASON``, naming the file that failed when it is another one (a temporary file)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    failed = exc.filename if exc.filename is not None else None
    where = f" ({os.fsdecode(failed)})" if failed is not None and os.fsdecode(failed) != os.fspath(path) else ""
    return f"cannot write {os.fspath(path)}: {reason}{where}"


@contextlib.contextmanager
def output_path(path: str | os.PathLike[str], *, folder: bool, overwrite: bool) -> Iterator[Path]:
    """Check ``path`` (``check_output``), then run the block that writes it: an ``OSError`` in the
    block becomes one ``OutputPathError`` (``mec_hub``'s own errors pass unchanged), and the
    folders the block created above ``path`` are removed again when it fails."""
    path = check_output(path, folder=folder, overwrite=overwrite)
    missing = [p for p in path.parents if not os.path.lexists(p)]  # deepest first
    try:
        yield path
    except BaseException as exc:
        for created in missing:
            with contextlib.suppress(OSError):
                created.rmdir()  # only if empty: never anything the block did not create
        if isinstance(exc, OSError) and not isinstance(exc, MecHubError):
            raise OutputPathError(write_error_message(path, exc)) from None
        raise
