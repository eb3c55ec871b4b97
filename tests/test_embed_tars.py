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
from embed_support import meta_without_times, run_cli_subprocess, run_in_own_group, subprocess_env

from mec_hub.cli.embed import main
from mec_hub.embedding.inputs import InputError, TarMember, collect_inputs, expand_braces

PHOTOS = Path(__file__).parent / "data" / "photos"
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

    # rows in shard order, named SHARD.tar/KEY.EXT; captions, the class member and the folder entry left out
    names = paths_of(tmp_path / "t.npy")
    expected = []
    photos = sorted(PHOTOS.iterdir())
    half = len(photos) // 2
    for number, chunk in enumerate([photos[:half], photos[half:]]):
        expected += [f"{number:06d}.tar/{number:02d}{i:04d}{p.suffix}" for i, p in enumerate(chunk)]
    assert names == expected
    assert meta["num_skipped_non_images"] == len(photos) + 1  # a caption per image, one class member

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
