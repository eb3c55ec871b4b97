"""WebDataset tar shards as mec-embed input: the same rows as the images embedded from a folder."""

from __future__ import annotations

import io
import json
import shutil
import signal
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mec_hub.cli.embed import main
from mec_hub.embedding.inputs import InputError, TarMember, collect_inputs, expand_braces
from tests.support.embedding import (
    make_images,
    meta_without_times,
    reference_features,
    run_cli_subprocess,
    run_in_own_group,
    subprocess_env,
)
from tests.support.paths import ASSETS_DIR

PHOTOS = ASSETS_DIR / "photos"
BATCH = 4
BROKEN_JPEG = b"\xff\xd8\xff\xe0" + b"\0" * 60  # a JPEG header, then nothing a decoder can use


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two shards of the photos (keys as webdataset writes them, with a caption and a class member
    beside each of some images, a folder entry and a broken image), and a folder of the same images."""
    root = tmp_path_factory.mktemp("tars")
    shards, folder = root / "shards", root / "folder"
    shards.mkdir()
    folder.mkdir()
    photos = sorted(PHOTOS.iterdir())
    assert len(photos) >= 10
    half = len(photos) // 2
    for number, chunk in enumerate([photos[:half], photos[half:]]):
        with tarfile.open(shards / f"{number:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            dir_info = tarfile.TarInfo("sub")
            dir_info.type = tarfile.DIRTYPE
            tar.addfile(dir_info)
            for index, photo in enumerate(chunk):
                key = f"{number:02d}{index:04d}"
                add_member(tar, f"{key}{photo.suffix}", photo.read_bytes())
                add_member(tar, f"{key}.txt", photo.stem.encode())
                shutil.copy(photo, folder / f"{number:06d}.tar-{key}{photo.suffix}")
            if number == 0:
                add_member(tar, "broken.jpg", BROKEN_JPEG)
                (folder / "000000.tar-broken.jpg").write_bytes(BROKEN_JPEG)
                add_member(tar, "0000zz.cls", b"3")
    return shards, folder


def embed(inputs: list[object], out: Path, weights: Path, *extra: object) -> dict:
    args = [*inputs, "--out", out, "--weights", weights, "--device", "cpu", "-b", BATCH, "-j", 0, "-q", *extra]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return json.loads(out.with_name(out.stem + ".meta.json").read_text())


def paths_of(out: Path) -> list[str]:
    return out.with_name(out.stem + ".paths.txt").read_text().splitlines()


def test_expand_braces():
    assert expand_braces("s/{000008..000011}.tar") == [f"s/0000{n:02d}.tar" for n in (8, 9, 10, 11)]
    assert expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    assert expand_braces("{3..1}") == ["3", "2", "1"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert expand_braces("odd{x}.tar") == ["odd{x}.tar"]


def test_tar_rows_equal_folder_rows(dataset: tuple[Path, Path], tiny_weights_dir: Path, tmp_path: Path):
    shards, folder = dataset
    meta = embed([shards / "{000000..000001}.tar"], tmp_path / "t.npy", tiny_weights_dir)
    folder_meta = embed([folder], tmp_path / "f.npy", tiny_weights_dir)

    # rows in shard order, named SHARD.tar/KEY.EXT; captions, the class member and the folder entries left out
    names = paths_of(tmp_path / "t.npy")
    expected = []
    photos = sorted(PHOTOS.iterdir())
    half = len(photos) // 2
    for number, chunk in enumerate([photos[:half], photos[half:]]):
        expected += [f"{number:06d}.tar/{number:02d}{i:04d}{p.suffix}" for i, p in enumerate(chunk)]
    assert names == expected
    # a caption per image, one class member, a folder entry per shard
    assert meta["num_skipped_non_images"] == len(photos) + 1 + 2

    # each row equals the row of the same image embedded from the folder
    tar_rows = dict(zip(names, np.load(tmp_path / "t.npy"), strict=True))
    folder_rows = dict(zip(paths_of(tmp_path / "f.npy"), np.load(tmp_path / "f.npy"), strict=True))
    assert len(folder_rows) == len(tar_rows)
    for name, row in tar_rows.items():
        np.testing.assert_allclose(row, folder_rows[name.replace("/", "-")], rtol=0, atol=1e-5)

    # the broken member is a failed row, for the reason the same bytes fail as a file
    assert meta["failed"] == [{"path": "000000.tar/broken.jpg", "reason": folder_meta["failed"][0]["reason"]}]
    assert folder_meta["failed"][0]["path"] == "000000.tar-broken.jpg"


def test_members_read_in_worker_processes(dataset: tuple[Path, Path], tiny_weights_dir: Path, tmp_path: Path):
    shards, _ = dataset
    embed([shards / "000001.tar"], tmp_path / "a.npy", tiny_weights_dir)
    embed([shards / "000001.tar"], tmp_path / "b.npy", tiny_weights_dir, "-j", 2)
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()


def test_inputs_digest_covers_the_members(dataset: tuple[Path, Path], tmp_path: Path):
    shards, _ = dataset
    copy = tmp_path / "000000.tar"
    shutil.copy(shards / "000000.tar", copy)
    before = collect_inputs([str(copy)]).digest()
    with tarfile.open(copy, "a") as tar:
        add_member(tar, "extra.png", (PHOTOS / "skimage-camera.png").read_bytes())
    after = collect_inputs([str(copy)])
    assert after.items[-1].name == "000000.tar/extra.png"
    assert after.digest() != before


def test_missing_and_unreadable_shards_are_named(dataset: tuple[Path, Path], tmp_path: Path):
    shards, _ = dataset
    with pytest.raises(InputError, match=r"1 of the 3 files .* not found, e.g. .*000002\.tar"):
        collect_inputs([str(shards / "{000000..000002}.tar")])
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"\x01" * 1024)
    with pytest.raises(InputError, match=r"cannot read the tar shard .*bad\.tar"):
        collect_inputs([str(bad)])


@pytest.mark.slow
def test_kill_and_resume_in_the_middle_of_a_shard(dataset: tuple[Path, Path], tiny_weights_dir: Path, tmp_path: Path):
    shards, _ = dataset
    pattern = shards / "{000000..000001}.tar"
    reference = tmp_path / "ref" / "f.npy"
    reference.parent.mkdir()
    embed([pattern], reference, tiny_weights_dir)

    out = tmp_path / "f.npy"
    args = [pattern, "--out", out, "--weights", tiny_weights_dir, "--device", "cpu", "-b", BATCH, "-j", 1, "-q"]
    killed = run_cli_subprocess(*args, faults={"kill_after_batches": 2})  # dies inside the first shard
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()
    state = json.loads((tmp_path / ".f.npy.part-0-of-1.state.json").read_text())
    assert state["items_done"] == BATCH

    resumed = run_cli_subprocess(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert out.read_bytes() == reference.read_bytes()
    assert paths_of(out) == paths_of(reference)
    meta = json.loads((tmp_path / "f.meta.json").read_text())
    reference_meta = json.loads(reference.with_name("f.meta.json").read_text())
    for m in (meta, reference_meta):
        m.pop("features"), m.pop("paths")
    assert meta_without_times(meta) == meta_without_times(reference_meta)
    assert meta["num_failed"] == 1


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on Windows is not tested")
def test_two_processes_split_the_shards(dataset: tuple[Path, Path], tiny_weights_dir: Path, tmp_path: Path):
    shards, _ = dataset
    pattern = str(shards / "{000000..000001}.tar")
    single = tmp_path / "one" / "f.npy"
    single.parent.mkdir()
    embed([pattern], single, tiny_weights_dir)

    double = tmp_path / "two" / "f.npy"
    common = ["--weights", str(tiny_weights_dir), "--device", "cpu", "-b", str(BATCH), "-j", "0", "-q"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mec_hub.cli.embed", pattern, "--out", str(double), *common]  # fmt: skip
    done = run_in_own_group(command, timeout=240, env=subprocess_env(OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_allclose(np.load(double), np.load(single), rtol=1e-6, atol=1e-6)
    assert paths_of(double) == paths_of(single)
    meta_two = json.loads((double.parent / "f.meta.json").read_text())
    meta_one = json.loads((single.parent / "f.meta.json").read_text())
    assert meta_without_times(meta_two) == meta_without_times(meta_one)


def test_member_names_as_tar_writes_them(tmp_path: Path):
    shard = tmp_path / "s.tar"
    photo = (PHOTOS / "skimage-camera.png").read_bytes()
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tar:
        add_member(tar, "./a.png", photo)
        add_member(tar, "/abs/b.PNG", photo)
        add_member(tar, "dir/" + "long" * 40 + ".png", photo)  # a pax header before it
    collected = collect_inputs([str(shard)])
    assert [item.name for item in collected.items] == [
        "s.tar/a.png",
        "s.tar/abs/b.PNG",
        "s.tar/dir/" + "long" * 40 + ".png",
    ]
    assert all(TarMember.parse(item.path).read() == photo for item in collected.items)


# --- damaged shards and members that are not regular files (issue 21, items 5 and 6) ---------------


def write_shard(shard: Path, members: list[tuple[str, bytes]]) -> list[tarfile.TarInfo]:
    """A USTAR shard of regular members (as webdataset writes one) and tarfile's own listing of it."""
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            add_member(tar, name, data)
    with tarfile.open(shard) as tar:
        return tar.getmembers()


def embed_status(inputs: list[object], out: Path, weights: Path, *extra: object) -> tuple[int, dict, str]:
    args = [*inputs, "--out", out, "--weights", weights, "--device", "cpu", "-b", BATCH, "-j", 0, *extra]
    result = CliRunner().invoke(main, [str(a) for a in args])
    meta_path = out.with_name(out.stem + ".meta.json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return result.exit_code, meta, result.output


@pytest.fixture(scope="module")
def six_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_images(tmp_path_factory.mktemp("six"), 6)


@pytest.mark.parametrize("cut", ["at a header", "inside a header", "inside the data", "before the end blocks"])
def test_a_truncated_shard_is_a_failure_naming_the_offset(
    six_images: list[Path], tiny_weights_dir: Path, tmp_path: Path, cut: str
):
    shard = tmp_path / "s.tar"
    listing = write_shard(shard, [(p.name, p.read_bytes()) for p in six_images])
    whole = shard.read_bytes()
    lost = {"at a header": 2, "inside a header": 2, "inside the data": 3, "before the end blocks": 6}[cut]
    if lost < 6:
        header = listing[lost].offset  # tarfile's offsets of the intact shard: the reference
        length = {"at a header": header, "inside a header": header + 200, "inside the data": header + 600}[cut]
    else:
        last = listing[-1]
        length = header = last.offset_data + -(-last.size // 512) * 512
    shard.write_bytes(whole[:length])

    collected = collect_inputs([str(shard)])
    kept = [f"s.tar/{p.name}" for p in six_images[:lost]]
    assert [item.name for item in collected.items] == [*kept, f"s.tar@{header}"]

    code, meta, output = embed_status([shard], tmp_path / "f.npy", tiny_weights_dir, "--strict")
    assert code == 3, output
    assert paths_of(tmp_path / "f.npy") == kept
    np.testing.assert_allclose(
        np.load(tmp_path / "f.npy"), reference_features(tiny_weights_dir, six_images[:lost]), rtol=0, atol=1e-4
    )
    assert meta["num_failed"] == 1 and meta["num_inputs"] == lost + 1
    (failure,) = meta["failed"]
    assert failure["path"] == f"s.tar@{header}"
    assert "truncated" in failure["reason"]
    if cut == "inside the data":
        assert six_images[lost].name in failure["reason"]


def special_member(name: str, kind: bytes, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    if kind == tarfile.CHRTYPE:
        info.devmajor, info.devminor = 1, 3
    return info


def test_links_and_special_members_are_each_embedded_skipped_or_failed(
    six_images: list[Path], tiny_weights_dir: Path, tmp_path: Path
):
    shard = tmp_path / "s.tar"
    first, second = six_images[0], six_images[1]
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
        add_member(tar, "a/" + first.name, first.read_bytes())
        tar.addfile(special_member("folder", tarfile.DIRTYPE))
        tar.addfile(special_member("hard.png", tarfile.LNKTYPE, "./a/" + first.name))
        tar.addfile(special_member("dangling.png", tarfile.LNKTYPE, "later.png"))
        tar.addfile(special_member("soft.png", tarfile.SYMTYPE, "a/" + first.name))
        tar.addfile(special_member("pipe.png", tarfile.FIFOTYPE))
        tar.addfile(special_member("null.png", tarfile.CHRTYPE))
        tar.addfile(special_member("disk.png", tarfile.BLKTYPE))
        tar.addfile(special_member("caption.txt", tarfile.LNKTYPE, "nowhere.txt"))
        add_member(tar, "later.png", second.read_bytes())
        add_member(tar, "later.txt", b"a caption")
    with tarfile.open(shard) as tar:
        num_members = len(tar.getmembers())

    collected = collect_inputs([str(shard)])
    names = [item.name for item in collected.items]
    assert names == [f"s.tar/a/{first.name}", "s.tar/hard.png", "s.tar/dangling.png", "s.tar/later.png"]
    assert TarMember.parse(collected.items[1].path).read() == first.read_bytes()
    assert collected.skipped_members == [
        ("s.tar/folder", "not a regular file: folder"),
        ("s.tar/soft.png", "not a regular file: symlink"),
        ("s.tar/pipe.png", "not a regular file: FIFO"),
        ("s.tar/null.png", "not a regular file: character device"),
        ("s.tar/disk.png", "not a regular file: block device"),
        (
            "s.tar/caption.txt",
            "hard link 'caption.txt' to 'nowhere.txt', which is not an earlier regular member of the shard",
        ),
    ]
    assert collected.skipped == len(collected.skipped_members) + 1  # later.txt
    assert len(collected.items) + collected.skipped == num_members  # every member accounted for

    code, meta, output = embed_status([shard], tmp_path / "f.npy", tiny_weights_dir, "--strict")
    assert code == 3, output
    assert paths_of(tmp_path / "f.npy") == [f"s.tar/a/{first.name}", "s.tar/hard.png", "s.tar/later.png"]
    expected = reference_features(tiny_weights_dir, [first, first, second])
    np.testing.assert_allclose(np.load(tmp_path / "f.npy"), expected, rtol=0, atol=1e-4)
    assert meta["failed"] == [
        {
            "path": "s.tar/dangling.png",
            "reason": "hard link 'dangling.png' to 'later.png', which is not an earlier regular member of the shard",
        }
    ]
    assert meta["num_skipped_non_images"] == 7


def test_members_come_out_in_the_shard_order(six_images: list[Path], tiny_weights_dir: Path, tmp_path: Path):
    """A pin (not a regression test): z, a, m stay z, a, m; nothing sorts the members."""
    shard = tmp_path / "s.tar"
    order = [("z.png", six_images[0]), ("a.png", six_images[1]), ("m.png", six_images[2])]
    write_shard(shard, [(name, path.read_bytes()) for name, path in order])
    meta = embed([shard], tmp_path / "f.npy", tiny_weights_dir)
    assert paths_of(tmp_path / "f.npy") == ["s.tar/z.png", "s.tar/a.png", "s.tar/m.png"]
    expected = reference_features(tiny_weights_dir, [path for _, path in order])
    np.testing.assert_allclose(np.load(tmp_path / "f.npy"), expected, rtol=0, atol=1e-4)
    assert meta["num_embedded"] == 3
