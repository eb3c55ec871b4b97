"""Files: atomic writes (a reader sees the old file or the complete new one, never a partial one)
and bounded reads of files that may come from strangers.

Every JSON file the project reads (configs, feature-set and index records, state files, metrics
lines, headers embedded in other formats) goes through ``read_json``/``parse_json``: the size is
bounded before anything is read and the nesting depth before it is parsed, and every failure is one
``MalformedFileError`` naming the file. Only regular files are opened (``open_regular_file``), so
a FIFO or a device given in place of a file is refused instead of blocking or reading forever.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from mec_hub.errors import MalformedFileError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_permissions(path: Path) -> None:
    """Temporary files are private (0600); what we publish gets the usual umask-based mode."""
    mask = _umask()
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
        for child in path.rglob("*"):
            os.chmod(child, (0o777 if child.is_dir() else 0o666) & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or a new file in folder ``path`` durable (where the platform allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` for a temporary file beside ``path``, then rename it onto ``path``."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        _publish_permissions(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)
    return final


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` in one rename.

    On error the temporary folder is removed and an existing ``path`` is left as it was. Without
    ``overwrite``, a ``path`` that another process publishes meanwhile is never replaced either: the
    rename fails (``FileExistsError``) and this folder is removed.
    """
    final = Path(path)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists (pass overwrite to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        _publish_permissions(tmp)
        if final.exists() and not overwrite:
            raise FileExistsError(f"{final} was written by another process meanwhile")
        if final.exists():
            # Two renames, so that a crash in between leaves the old folder under a findable name.
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, final)  # fails on a non-empty folder published since the check above
            except OSError as exc:
                if overwrite or not final.exists():
                    raise
                raise FileExistsError(f"{final} was written by another process meanwhile") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(final.parent)


# --------------------------------------------------------------------------- bounded reads

#: A JSON file larger than this is refused before it is read (configs and records are kilobytes).
MAX_JSON_BYTES = 64 * 1024 * 1024
#: Deeper nesting is refused before parsing (``json`` recurses; ours are at most ~5 deep).
MAX_JSON_DEPTH = 64

# Files that are not regular, and how to name them in an error.
_FILE_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


class NotRegularFileError(OSError):
    """A path that names a FIFO, socket, device or folder where a file was expected."""


def not_regular_reason(mode: int) -> str | None:
    """Why a file of this ``st_mode`` is not read, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "an unknown kind of file")
    return f"not a regular file: {kind}"


def open_regular_file(path: str | os.PathLike[str]) -> IO[bytes]:
    """Open ``path`` (symbolic links followed) for reading, if it is a regular file; never blocks.

    Raises ``NotRegularFileError`` for a FIFO, socket, device or folder, and ``OSError`` for a
    file that cannot be opened. The type is checked on the opened descriptor itself, so the file
    read is the file checked.
    """
    reason = not_regular_reason(os.stat(path).st_mode)  # refused before it is even opened
    if reason:
        raise NotRegularFileError(reason)
    nonblocking = getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, os.O_RDONLY | nonblocking | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        reason = not_regular_reason(os.fstat(fd).st_mode)
        if reason:
            raise NotRegularFileError(reason)
        if nonblocking:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bounded(path: str | os.PathLike[str], max_bytes: int, *, what: str = "file") -> bytes:
    """The bytes of regular file ``path``, refused (``MalformedFileError``) when over ``max_bytes``.

    ``FileNotFoundError`` passes through unchanged, so callers can say what to do about a
    missing file; every other failure is one ``MalformedFileError`` naming the file.
    """
    try:
        with open_regular_file(path) as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > max_bytes:
                raise MalformedFileError(f"{path}: {what} of {size} bytes, over the limit of {max_bytes}")
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise MalformedFileError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    if len(data) > max_bytes:  # grew while read
        raise MalformedFileError(f"{path}: {what} over the limit of {max_bytes} bytes")
    return data


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON text ``data`` (strings skipped)."""
    import numpy as np  # only here; fileio is imported by light modules

    bare = np.frombuffer(_JSON_STRING.sub(b'""', data), dtype=np.uint8)
    steps = np.isin(bare, (ord("["), ord("{"))).astype(np.int64) - np.isin(bare, (ord("]"), ord("}")))
    return int(np.cumsum(steps).max(initial=0))


def parse_json(
    data: bytes | str, origin: str, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH
) -> Any:
    """Parse JSON text ``data`` read from ``origin`` (a file name, or a file and a field).

    The one JSON parser of the project: bounded in size and depth, and every failure (bad UTF-8,
    bad syntax, too large, too deep) is one ``MalformedFileError`` that names ``origin``.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise MalformedFileError(f"{origin}: {len(raw)} bytes of JSON, over the limit of {max_bytes}")
    if json_depth(raw) > max_depth:
        raise MalformedFileError(f"{origin}: JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise MalformedFileError(f"{origin}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:
        raise MalformedFileError(f"{origin}: not valid JSON ({exc})") from None


def read_json(
    path: str | os.PathLike[str], *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH
) -> Any:
    """Read and parse JSON file ``path`` (see ``parse_json``); ``FileNotFoundError`` passes through."""
    return parse_json(read_bounded(path, max_bytes, what="JSON file"), str(path), max_bytes=max_bytes,
                      max_depth=max_depth)



def json_plain(value: Any) -> Any:
    """``value`` in JSON's own types: mappings as dicts, tuples and lists as lists, a deep copy.

    What ``json.loads(json.dumps(value))`` gives for the values the project writes, without
    printing and parsing: a record built here compares equal to the same record read back.
    """
    if isinstance(value, Mapping):
        return {str(key): json_plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_plain(item) for item in value]
    return value

#: A JSON-lines file (training metrics) larger than this is refused before it is read.
MAX_JSON_LINES_BYTES = 1024 * 1024 * 1024


def read_json_lines(
    path: str | os.PathLike[str], *, max_bytes: int = MAX_JSON_LINES_BYTES
) -> list[tuple[int, Any | MalformedFileError | None]]:
    """``(line number, value)`` for each line of JSON-lines file ``path``; the value is the
    ``MalformedFileError`` of a line that does not parse, and None for a blank line.

    Callers choose what a bad line means (a torn last line after a kill, a warning, a failure);
    ``FileNotFoundError`` passes through.
    """
    text = read_bounded(path, max_bytes, what="JSON-lines file").decode("utf-8", "replace")
    out: list[tuple[int, Any | MalformedFileError | None]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            out.append((number, None))
            continue
        try:
            out.append((number, parse_json(line, f"{path}:{number}")))
        except MalformedFileError as exc:
            out.append((number, exc))
    return out
