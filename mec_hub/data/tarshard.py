"""The one reader of tar shards (WebDataset ``.tar`` files): their member headers, walked with bounds.

``walk_tar(path)`` lists a shard's members in the shard's order without reading any member's bytes:
one entry per member, each either

- ``TarFileMember``: a regular file (or a hard link resolved to an earlier regular member of the
  same shard): ``size`` bytes from ``offset``, always inside the file;
- ``TarSkippedMember``: a member with no bytes of its own to read (folder, symbolic link, device,
  FIFO, sparse file, unknown type), with the reason;
- ``TarFailure``: a member that cannot be read (a hard link to nothing earlier in the shard), or, as
  the last entry, where the walk had to stop: a header with a bad checksum or an impossible size, a
  member that runs past the end of the file, a shard that ends without its end-of-archive blocks
  (truncated). The members before it are kept.

So the entries account for every member, and a damaged shard is never a short list that looks whole.
Only a file that is not a tar at all (the first header is not one) raises ``TarShardError``.

Why not ``tarfile``'s iteration (``for info in tarfile.open(path)``): it trusts the headers. A
negative base-256 size makes it seek backwards and read the same headers again forever; a size past
the end of the file is not noticed until a member is read; a truncated shard ends the iteration
as if the archive were complete (the error is dropped unless ``errorlevel`` and ``ignore_zeros`` are
set just so); and a pax or GNU long-name header's data is read into memory whatever size it claims.
Here each 512-byte header is decoded by ``tarfile.TarInfo.frombuf`` (its checksum, octal and base-256
numbers, ustar prefix), and everything that follows from it is checked first: the size is not
negative and ``data offset + size`` is within the file before the walk moves on, the data of pax and
GNU long-name headers is read only when it is at most ``MAX_META_BYTES`` and present in full, and
every step moves forward by at least one block, so the walk ends after at most (file size / 512)
headers.
"""

from __future__ import annotations

import os
import posixpath
import tarfile
from dataclasses import dataclass
from typing import IO

from mec_hub.errors import MalformedFileError
from mec_hub.fileio import open_regular_file

BLOCK = tarfile.BLOCKSIZE  # 512
MAX_META_BYTES = 1 << 20  # the most data a pax or GNU long-name/long-link header may have

_REGULAR = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE})
_PAX_LOCAL = frozenset({tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE})
_META = frozenset({tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XGLTYPE, *_PAX_LOCAL})
_PAX_SPARSE = b"pax-sparse"  # our own mark (no header holds it)
# Members without data blocks after their header (their size field is ignored), as tarfile reads them.
_NO_DATA = {
    tarfile.DIRTYPE: "folder",
    tarfile.SYMTYPE: "symlink",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "FIFO",
}


class TarShardError(MalformedFileError):
    """A file given as a tar shard that is not one (or cannot be opened)."""

    def __init__(self, shard: str, reason: str) -> None:
        self.shard, self.reason = shard, reason
        super().__init__(f"cannot read the tar shard {shard}: {reason}")


@dataclass(frozen=True)
class TarFileMember:
    """A regular member: its ``size`` bytes start at byte ``offset`` of the shard."""

    name: str
    header_offset: int  # where the member's first header (pax or long-name one included) starts
    offset: int
    size: int
    link_target: str | None = None  # a hard link: the name of the earlier member whose bytes these are


@dataclass(frozen=True)
class TarSkippedMember:
    """A member that has no bytes to read as a file (folder, symbolic link, device, ...)."""

    name: str
    header_offset: int
    reason: str


@dataclass(frozen=True)
class TarFailure:
    """A member that cannot be read (``name``: the member; the walk goes on), or where the walk stopped
    (``name`` None; always the last entry; the reason names the member if a header was read)."""

    shard: str
    offset: int
    reason: str
    name: str | None = None

    def __str__(self) -> str:
        return f"{self.shard} at byte {self.offset}: {self.reason}"


TarEntry = TarFileMember | TarSkippedMember | TarFailure


class _Stop(Exception):
    """The walk cannot go on past ``offset``; ``not_tar``: the very first block is no tar header."""

    def __init__(self, offset: int, reason: str, *, not_tar: bool = False) -> None:
        self.offset, self.reason, self.not_tar = offset, reason, not_tar
        super().__init__(reason)


def walk_tar(path: str | os.PathLike[str]) -> list[TarEntry]:
    """The members of tar shard ``path``, in its order (see the module docstring)."""
    shard = os.fspath(path)
    try:
        with open_regular_file(shard) as fh:
            return _Walker(shard, fh, os.fstat(fh.fileno()).st_size).walk()
    except OSError as exc:
        raise TarShardError(shard, exc.strerror or str(exc) or type(exc).__name__) from None


class _Walker:
    def __init__(self, shard: str, fh: IO[bytes], length: int) -> None:
        self.shard, self.fh, self.length = shard, fh, length
        self.entries: list[TarEntry] = []
        self.global_pax: dict[str, str] = {}
        self.regular: dict[str, TarFileMember] = {}  # earlier regular members by normalised name

    def walk(self) -> list[TarEntry]:
        offset = 0
        try:
            while True:
                next_offset = self._member(offset)
                if next_offset is None:
                    break
                assert next_offset > offset  # every step moves forward: the walk ends
                offset = next_offset
        except _Stop as stop:
            if stop.not_tar:
                raise TarShardError(self.shard, f"not a tar file ({stop.reason})") from None
            self.entries.append(TarFailure(self.shard, stop.offset, stop.reason))
        return self.entries

    def _read(self, offset: int, size: int) -> bytes:
        self.fh.seek(offset)
        data = self.fh.read(size)
        if len(data) != size:  # the file shrank since it was measured
            raise _Stop(offset, f"the shard ends at byte {offset + len(data)} (truncated)")
        return data

    def _header(self, offset: int, start: int) -> tuple[tarfile.TarInfo, bytes] | None:
        """The header at ``offset`` (part of the member whose first header is at ``start``), decoded and
        as read; None at the end-of-archive marker."""
        left = self.length - offset
        if left <= 0:  # (``start`` may lie past the end: the last member's padding is cut off)
            end = self.length
            raise _Stop(min(start, end), f"the shard ends at byte {end} without the end-of-archive blocks (truncated)")
        if left < BLOCK:
            raise _Stop(start, f"the shard ends inside a member header at byte {offset} (truncated)")
        buf = self._read(offset, BLOCK)
        if buf.count(0) == BLOCK:
            if offset != start:
                raise _Stop(start, f"an empty block at byte {offset} where a member header should follow")
            return None  # the end-of-archive marker (a lone zero block before the end of file is accepted)
        try:
            info = tarfile.TarInfo.frombuf(buf, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise _Stop(start, f"bad header at byte {offset} ({exc})", not_tar=offset == 0) from None
        if info.size < 0:
            raise _Stop(start, f"bad header at byte {offset} (negative size {info.size})")
        return info, buf

    def _data(self, info: tarfile.TarInfo, data_offset: int, start: int, name: str) -> tuple[int, int]:
        """(data offset, offset of the next header) of a member whose data starts at ``data_offset``,
        checked against the file."""
        if data_offset + info.size > self.length:
            raise _Stop(
                start,
                f"member {name!r} claims {info.size} bytes at byte {data_offset}, past the end of the shard "
                f"({self.length} bytes; truncated or corrupt)",
            )
        return data_offset, data_offset + -(-info.size // BLOCK) * BLOCK

    def _meta_data(self, info: tarfile.TarInfo, offset: int, start: int) -> tuple[bytes, int]:
        if info.size > MAX_META_BYTES:
            raise _Stop(
                start, f"bad header at byte {offset} (a {info.size}-byte extended header; at most {MAX_META_BYTES})"
            )
        data_offset, next_offset = self._data(info, offset + BLOCK, start, "extended header")
        return self._read(data_offset, info.size), next_offset

    def _member(self, start: int) -> int | None:
        """Read the member whose first header is at ``start``; the offset of the next one, None at the end."""
        offset = start
        long_name: str | None = None
        long_link: str | None = None
        pax: dict[str, str] = {}
        while True:
            header = self._header(offset, start)
            if header is None:
                return None
            info, buf = header
            if info.type not in _META:
                break
            data, next_offset = self._meta_data(info, offset, start)
            if info.type == tarfile.GNUTYPE_LONGNAME:
                long_name = _c_string(data)
            elif info.type == tarfile.GNUTYPE_LONGLINK:
                long_link = _c_string(data)
            else:
                records = _pax_records(data, start, offset)
                if info.type in _PAX_LOCAL:
                    pax.update(records)
                else:
                    self.global_pax.update(records)
            offset = next_offset
        fields = {key: value for key, value in {**self.global_pax, **pax}.items() if value}
        name = fields.get("path", "").rstrip("/") or long_name or info.name  # tarfile strips a pax path too
        link = fields.get("linkpath") or long_link or info.linkname
        if "size" in fields:
            size = fields["size"]
            if not size.isdigit() or not size.isascii():
                raise _Stop(start, f"bad pax header (size={size!r}) for member {name!r}")
            info.size = int(size)
        if info.type in _REGULAR and any(key.startswith("GNU.sparse.") for key in fields):
            info.type = _PAX_SPARSE  # a pax-format sparse file: its data is a map, then the pieces
        if info.type == tarfile.DIRTYPE:
            name = name.rstrip("/") or name
        return self._record(info, buf, name, link, offset, start)

    def _record(self, info: tarfile.TarInfo, buf: bytes, name: str, link: str, offset: int, start: int) -> int:
        """Add the entry of the member whose (last) header is at ``offset``; the offset of the next member."""
        if info.type in _NO_DATA:
            self.entries.append(TarSkippedMember(name, start, f"not a regular file: {_NO_DATA[info.type]}"))
            return offset + BLOCK
        if info.type == tarfile.LNKTYPE:
            target = self.regular.get(_key(link))
            if target is None:
                reason = f"hard link {name!r} to {link!r}, which is not an earlier regular member of the shard"
                self.entries.append(TarFailure(self.shard, start, reason, name))
            else:
                member = TarFileMember(name, start, target.offset, target.size, link_target=target.name)
                self.entries.append(member)
                self.regular[_key(name)] = member
            return offset + BLOCK
        data_offset = offset + BLOCK
        if info.type == tarfile.GNUTYPE_SPARSE:  # old GNU format: extension blocks before the data
            extended = buf[482]
            while extended:
                if data_offset + BLOCK > self.length:
                    raise _Stop(start, f"the shard ends inside the sparse map of member {name!r} (truncated)")
                extended = self._read(data_offset, BLOCK)[504]
                data_offset += BLOCK
        data_offset, next_offset = self._data(info, data_offset, start, name)
        if info.type in _REGULAR:
            member = TarFileMember(name, start, data_offset, info.size)
            self.entries.append(member)
            self.regular[_key(name)] = member
        elif info.type in (tarfile.GNUTYPE_SPARSE, _PAX_SPARSE):
            self.entries.append(TarSkippedMember(name, start, "not a regular file: sparse file"))
        else:
            kind = info.type.decode("ascii", "backslashreplace")
            self.entries.append(TarSkippedMember(name, start, f"not a regular file: unknown type {kind!r}"))
        return next_offset


def _key(name: str) -> str:
    """A member name as hard links refer to it (``./a.png``, ``a.png`` and ``a//b/../a.png`` alike)."""
    return posixpath.normpath(name.lstrip("/")) if name else ""


def _c_string(data: bytes) -> str:
    return data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(data: bytes, start: int, offset: int) -> dict[str, str]:
    """The ``LENGTH KEY=VALUE\\n`` records of a pax header's data (an empty value removes the key)."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos, pos + 20)
        digits = data[pos:space]
        if space < 0 or not digits.isdigit():
            raise _Stop(start, f"bad pax header at byte {offset} (a record without its length)")
        end = pos + int(digits)
        if end > len(data) or end <= space + 1 or data[end - 1] != 0x0A or b"=" not in data[space + 1 : end]:
            raise _Stop(start, f"bad pax header at byte {offset} (a malformed record)")
        key, value = data[space + 1 : end - 1].split(b"=", 1)
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos = end
    return records
