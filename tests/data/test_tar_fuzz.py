"""The tar shard walker (``mec_hub.data.tarshard.walk_tar``) against hostile and damaged headers.

References: Python's ``tarfile`` listing of the intact shards (names, data offsets, sizes) and the
shards' lengths. Every walk runs under a memory cap and a time limit (SIGALRM), so a walker that
believes a header fails the test instead of hanging or filling the memory.
"""

from __future__ import annotations

import contextlib
import io
import signal
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mec_hub.data.images import ImageDecodeError
from mec_hub.data.tarshard import MAX_META_BYTES, TarFailure, TarFileMember, TarShardError, TarSkippedMember, walk_tar
from mec_hub.embedding.inputs import TarMember, collect_inputs
from mec_hub.errors import MecHubError

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FORMATS = [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise ``TimeoutError`` in the main thread when the block runs longer than ``seconds``."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def make_shard(members: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def tarfile_listing(data: bytes) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of the regular members, as Python's tarfile reads an intact shard."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, m.offset_data, m.size) for m in tar.getmembers() if m.isfile()]


def set_size_field(data: bytearray, header: int, field: bytes) -> None:
    """Write a 12-byte size field into the header at ``header`` and recompute its checksum."""
    block = data[header : header + 512]
    block[124:136] = field
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    data[header : header + 512] = block


def base256(value: int) -> bytes:
    """``value`` as a 12-byte GNU base-256 field (0x80 first for positive, 0xff for negative values)."""
    if value < 0:
        return b"\xff" + (256**11 + value).to_bytes(11, "big")
    return b"\x80" + value.to_bytes(11, "big")


def walk(shard: Path, memory_cap: object) -> list:
    with memory_cap(256 * 2**20), time_limit(5):  # type: ignore[operator]
        return walk_tar(shard)


def check_entries(entries: list, shard: Path) -> None:
    """What holds for any file: members inside the file, in order, at most one failure that ends it."""
    length = shard.stat().st_size
    last_header = -1
    for index, entry in enumerate(entries):
        if isinstance(entry, TarFileMember):
            assert entry.offset >= 0 and entry.size >= 0 and entry.offset + entry.size <= length
            if entry.link_target is None:
                assert entry.offset >= entry.header_offset + 512
        offset = entry.offset if isinstance(entry, TarFailure) else entry.header_offset
        assert last_header < offset <= length
        last_header = offset
        if isinstance(entry, TarFailure):
            assert entry.shard == str(shard)
            assert entry.name is not None or index == len(entries) - 1  # a failure without a member ends the walk


SIZES = [("png", 700), ("txt", 5), ("jpg", 1500), ("png", 0), ("png", 512)]
PHOTO_LIKE = [(f"{n:04d}.{ext}", bytes([n]) * size) for n, (ext, size) in enumerate(SIZES)]
# a name over 100 bytes: a ustar prefix, a GNU long-name header or a pax path record, by format
LONG = ("p" * 90 + "/" + "q" * 90 + ".png", b"q" * 600)


@pytest.mark.parametrize("size", [-512, -1024, -(256**11)])
def test_negative_base256_size_is_a_failure_not_a_hang(tmp_path: Path, memory_cap: object, size: int):
    """Issue 21, item 7: with -512 tarfile reads the same header again forever (with -1024 it lands in
    the data before and ends quietly, the rest of the shard lost)."""
    data = bytearray(make_shard(PHOTO_LIKE[:3]))
    second = tarfile_listing(bytes(data))[1][1] - 512  # the second member's header
    set_size_field(data, second, base256(size))
    shard = tmp_path / "s.tar"
    shard.write_bytes(data)
    entries = walk(shard, memory_cap)
    assert entries[0] == TarFileMember("0000.png", 0, 512, 700)
    assert entries[1] == TarFailure(str(shard), second, f"bad header at byte {second} (negative size {size})")
    assert len(entries) == 2

    with memory_cap(256 * 2**20), time_limit(5):  # type: ignore[operator]
        collected = collect_inputs([str(shard)])
    assert [item.name for item in collected.items] == ["s.tar/0000.png", f"s.tar@{second}"]
    with pytest.raises(ImageDecodeError, match=rf"damaged tar shard: bad header at byte {second} \(negative size"):
        TarMember.parse(collected.items[1].path).read()


@pytest.mark.parametrize(
    ("field", "what"),
    [
        (base256(2**80), "past the end"),  # huge: tarfile would seek there and stop quietly
        (b"%011o\0" % (8**11 - 1), "past the end"),  # the largest octal size
        (b"-0000001000\0", "negative size"),  # int(..., 8) takes a sign
        (b"12345678901\0", "bad header"),  # not octal: 8 and 9
    ],
)
def test_impossible_sizes_are_failures_naming_the_offset(tmp_path: Path, memory_cap: object, field: bytes, what: str):
    data = bytearray(make_shard(PHOTO_LIKE[:3]))
    third = tarfile_listing(bytes(data))[2][1] - 512
    set_size_field(data, third, field)
    shard = tmp_path / "s.tar"
    shard.write_bytes(data)
    entries = walk(shard, memory_cap)
    assert [(e.name, e.offset, e.size) for e in entries[:2]] == tarfile_listing(make_shard(PHOTO_LIKE[:2]))
    assert isinstance(entries[2], TarFailure) and entries[2].offset == third and what in entries[2].reason
    assert len(entries) == 3


def test_bad_checksum_after_good_members_keeps_them(tmp_path: Path, memory_cap: object):
    data = bytearray(make_shard(PHOTO_LIKE))
    listing = tarfile_listing(bytes(data))
    header = listing[3][1] - 512
    data[header + 10] ^= 0x01  # one bit of the name: the stored checksum no longer matches
    shard = tmp_path / "s.tar"
    shard.write_bytes(data)
    entries = walk(shard, memory_cap)
    assert [(e.name, e.offset, e.size) for e in entries[:3]] == listing[:3]
    assert entries[3] == TarFailure(str(shard), header, f"bad header at byte {header} (bad checksum)")


def test_a_file_that_is_not_a_tar_is_an_error_naming_it(tmp_path: Path, memory_cap: object):
    shard = tmp_path / "s.tar"
    shard.write_bytes(b"\x01" * 2048)
    with pytest.raises(TarShardError, match=r"cannot read the tar shard .*s\.tar: not a tar file \(bad header"):
        walk(shard, memory_cap)


def test_extended_headers_are_bounded(tmp_path: Path, memory_cap: object):
    """A pax header claiming more than MAX_META_BYTES is refused before its data is read; one that
    claims more than the file holds too; the pax path and size records are used."""
    long_name = "dir/" + "x" * 200 + ".png"
    data = bytearray(make_shard([("a.png", b"1" * 10), (long_name, b"2" * 3000)], tarfile.PAX_FORMAT))
    listing = tarfile_listing(bytes(data))
    assert [name for name, _, _ in listing] == ["a.png", long_name]
    shard = tmp_path / "s.tar"
    shard.write_bytes(data)
    entries = walk(shard, memory_cap)
    assert [(e.name, e.offset, e.size) for e in entries] == listing  # the path= record, not the ustar name

    pax_header = 1024  # a.png: one header, one data block
    for claimed, what in [(MAX_META_BYTES + 1, "extended header; at most"), (MAX_META_BYTES, "past the end")]:
        broken = bytearray(data)
        set_size_field(broken, pax_header, b"%011o\0" % claimed)
        shard.write_bytes(broken)
        entries = walk(shard, memory_cap)
        assert entries[0] == TarFileMember("a.png", 0, 512, 10)
        assert isinstance(entries[1], TarFailure) and entries[1].offset == pax_header and what in entries[1].reason


def test_gnu_long_names_and_links(tmp_path: Path, memory_cap: object):
    long_name = "d/" + "y" * 150 + ".jpg"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo(long_name)
        info.size = 20
        tar.addfile(info, io.BytesIO(b"z" * 20))
        link = tarfile.TarInfo("l/" + "w" * 150 + ".jpg")
        link.type, link.linkname = tarfile.LNKTYPE, long_name
        tar.addfile(link)
    shard = tmp_path / "s.tar"
    shard.write_bytes(buf.getvalue())
    ((_, offset, size),) = tarfile_listing(buf.getvalue())
    entries = walk(shard, memory_cap)
    assert entries == [
        TarFileMember(long_name, 0, offset, size),
        TarFileMember(link.name, offset + 512, offset, size, link_target=long_name),
    ]


@FUZZ
@given(
    names=st.lists(
        st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=130), max_size=5
    ),
    sizes=st.lists(st.integers(0, 2000), min_size=5, max_size=5),
    fmt=st.sampled_from(FORMATS),
)
def test_intact_shards_list_as_tarfile_lists_them(
    tmp_path: Path, memory_cap: object, names: list[str], sizes: list[int], fmt: int
):
    members = [(f"{i}/{name}", bytes([i]) * size) for i, (name, size) in enumerate(zip(names, sizes, strict=False))]
    try:
        data = make_shard(members, fmt)
    except ValueError:  # a name the format cannot hold (USTAR, GNU without long names): not our case
        return
    shard = tmp_path / "s.tar"
    shard.write_bytes(data)
    entries = walk(shard, memory_cap)
    assert all(isinstance(e, TarFileMember | TarSkippedMember) for e in entries)
    assert [(e.name, e.offset, e.size) for e in entries if isinstance(e, TarFileMember)] == tarfile_listing(data)


@st.composite
def damage(draw: st.DrawFn) -> tuple[int, list[tuple[int, bytes]], list[tuple[int, int]], float | None]:
    """How to damage a shard: (format, size fields to write (header index, field), bytes to flip
    (position as a fraction of the length, xor mask), where to cut it (a fraction of its length))."""
    fields = st.one_of(
        st.integers(-(256**11), -1).map(base256),
        st.integers(0, 256**11 - 1).map(base256),
        st.integers(0, 8**11 - 1).map(lambda n: b"%011o\0" % n),
        st.binary(min_size=12, max_size=12),
    )
    sizes = draw(st.lists(st.tuples(st.integers(0, 40), fields), max_size=3))
    flips = draw(st.lists(st.tuples(st.integers(0, 10**6 - 1), st.integers(1, 255)), max_size=4))
    cut = draw(st.one_of(st.none(), st.floats(0, 1)))
    return draw(st.sampled_from(FORMATS)), sizes, flips, cut


def damaged_copy(recipe: tuple[int, list[tuple[int, bytes]], list[tuple[int, int]], float | None]) -> bytes:
    fmt, sizes, flips, cut = recipe
    data = bytearray(make_shard([*PHOTO_LIKE, LONG], fmt))
    blocks = len(data) // 512
    member_headers = [offset - 512 for _, offset, _ in tarfile_listing(bytes(data))]
    for index, field in sizes:  # a member's header, or any block (in the data, the padding, the end marker)
        header = member_headers[index] if index < len(member_headers) else 512 * (index % blocks)
        set_size_field(data, header, field)
    for position, mask in flips:
        data[position * len(data) // 10**6] ^= mask
    return bytes(data if cut is None else data[: int(cut * len(data))])


@FUZZ
@given(recipe=damage())
def test_damaged_shards_give_bounded_entries_or_one_error(tmp_path: Path, memory_cap: object, recipe: tuple):
    intact, damaged = make_shard([*PHOTO_LIKE, LONG], recipe[0]), damaged_copy(recipe)
    shard = tmp_path / "s.tar"
    shard.write_bytes(damaged)
    try:
        entries = walk(shard, memory_cap)
    except MecHubError as exc:
        assert isinstance(exc, TarShardError) and str(shard) in str(exc)
        return
    check_entries(entries, shard)
    if intact.startswith(damaged):  # truncated only: the members wholly before the cut are all there
        listing = tarfile_listing(intact)
        whole = [m for m in listing if m[1] + m[2] <= len(damaged)]
        assert [(e.name, e.offset, e.size) for e in entries if isinstance(e, TarFileMember)] == whole
        end_marker = listing[-1][1] + -(-listing[-1][2] // 512) * 512  # where the first zero block starts
        if len(damaged) < end_marker + 512:
            assert isinstance(entries[-1], TarFailure) and "truncated" in entries[-1].reason
        else:
            assert len(whole) == len(listing) and not any(isinstance(e, TarFailure) for e in entries)
