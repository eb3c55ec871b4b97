"""The feature-file format (``X.npy`` + ``X.paths.txt`` + ``X.meta.json``): names, the versioned
meta record, reading files written before ``format_version`` existed, and writing."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from mec_hub.data.featurefile import FORMAT_VERSION, FeatureFile, FeatureMeta, features_ends_sha256, read_meta, sidecar
from mec_hub.errors import MecHubError

# A meta record exactly as mec-embed writes it (key order included), typed out by hand.
MEC_EMBED_META = {
    "format": "mec-embed",
    "format_version": 1,
    "features": "feats.npy",
    "paths": "feats.paths.txt",
    "shape": [2, 4],
    "model": None,
    "weights": "/models/tiny",
    "weights_sha256": "ab" * 32,
    "architecture": "resnet18",
    "head": "backbone",
    "embed_dim": 4,
    "normalize": False,
    "precision": "fp32",
    "out_dtype": "float32",
    "preprocessing": {"input_size": [3, 32, 32], "crop_pct": 1.0, "interpolation": "bicubic"},
    "optimizations": ["fold_batchnorm"],
    "num_inputs": 3,
    "num_embedded": 2,
    "num_failed": 1,
    "num_skipped_non_images": 0,
    "failed": [{"path": "c.png", "reason": "empty file"}],
    "inputs": ["/data/imgs"],
    "files_from": None,
    "recursive": True,
    "base_dir": "/data/imgs",
    "batch_size": 64,
    "device": "cpu",
    "decoding": {"pillow": "11.0.0", "max_image_pixels": 89478485},
    "fingerprint": "cd" * 32,
    "mec_hub_version": "0.1.0",
    "torch_version": "2.5.1",
    "started_at": "2025-01-01T00:00:00Z",
    "finished_at": "2025-01-01T00:00:05Z",
}


def test_side_car_names():
    assert sidecar("out/feats.npy", ".paths.txt") == Path("out/feats.paths.txt")
    assert sidecar("out/feats.npy", ".meta.json") == Path("out/feats.meta.json")
    assert sidecar("a.b.npy", ".meta.json") == Path("a.b.meta.json")
    assert sidecar("feats", ".paths.txt") == Path("feats.paths.txt")


def test_mec_embed_meta_round_trips_unchanged():
    meta = FeatureMeta.from_json(MEC_EMBED_META)
    assert meta.format_version == FORMAT_VERSION == 1
    assert meta.shape == (2, 4) and meta.weights_sha256 == "ab" * 32 and meta.failed[0]["reason"] == "empty file"
    assert meta.extra == {}
    out = meta.to_json()
    assert out == MEC_EMBED_META and list(out) == list(MEC_EMBED_META)
    assert json.loads(json.dumps(out)) == MEC_EMBED_META
    assert FeatureMeta.from_json(out) == meta

    # state_dict_sha256 is written only for weights without a file digest, where mec-embed puts it
    no_digest = {**MEC_EMBED_META, "weights_sha256": None}
    keys = list(no_digest)
    keys.insert(keys.index("weights_sha256") + 1, "state_dict_sha256")
    no_digest["state_dict_sha256"] = "ef" * 32
    assert list(FeatureMeta.from_json(no_digest).to_json()) == keys


def test_files_without_format_version_still_read(tmp_path: Path):
    """Written as `mec-hub eval --save-features` did, or by hand: no format, no version, other keys."""
    matrix = np.arange(6, dtype=np.float16).reshape(3, 2)
    np.save(tmp_path / "x.npy", matrix)
    (tmp_path / "x.paths.txt").write_bytes(b"cat/1.png\ndog/2.png\ncat/3.png\n")
    old = {"model": "m", "weights_sha256": "abc", "pretrained": True, "inputs": "/data/val", "base_dir": "/data/val"}
    (tmp_path / "x.meta.json").write_text(json.dumps(old))

    opened = FeatureFile.open(tmp_path / "x.npy")
    assert isinstance(opened.matrix, np.memmap) and np.array_equal(opened.matrix, matrix)
    assert opened.paths == ["cat/1.png", "dog/2.png", "cat/3.png"]
    meta = opened.meta
    assert meta is not None and meta.format is None and meta.format_version == 1
    assert (meta.model, meta.weights_sha256, meta.head, meta.embed_dim) == ("m", "abc", None, None)
    assert meta.inputs == ["/data/val"] and meta.extra == {"pretrained": True}
    assert opened.search_roots[0] == Path("/data/val")

    (tmp_path / "x.meta.json").unlink()
    assert FeatureFile.open(tmp_path / "x.npy").meta is None and read_meta(tmp_path / "x.npy") is None


def test_meta_records_that_cannot_be_read(tmp_path: Path):
    with pytest.raises(MecHubError, match=r"format version 2; .* up to version 1"):
        FeatureMeta.from_json({**MEC_EMBED_META, "format_version": 2})
    with pytest.raises(MecHubError, match=r"embed_dim is '4', expected int"):
        FeatureMeta.from_json({**MEC_EMBED_META, "embed_dim": "4"})
    with pytest.raises(MecHubError, match=r"shape \[2\] is not \[rows, dim\]"):
        FeatureMeta.from_json({**MEC_EMBED_META, "shape": [2]})
    with pytest.raises(MecHubError, match="must be a JSON object"):
        FeatureMeta.from_json([1, 2])
    (tmp_path / "x.meta.json").write_text("{not json")
    with pytest.raises(MecHubError, match=r"x\.meta\.json: not valid JSON"):
        read_meta(tmp_path / "x.npy")


def test_write_publishes_the_three_files(tmp_path: Path):
    matrix = np.arange(8, dtype=np.float32).reshape(2, 4)
    names = ["a/1.png", "b/café.png"]
    meta = FeatureMeta.from_json(MEC_EMBED_META)
    FeatureFile.write(tmp_path / "feats.npy", iter(names), meta, matrix=matrix)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["feats.meta.json", "feats.npy", "feats.paths.txt"]
    paths_bytes = (tmp_path / "feats.paths.txt").read_bytes()
    assert paths_bytes == "a/1.png\nb/café.png\n".encode()
    npy_bytes = (tmp_path / "feats.npy").read_bytes()
    assert np.array_equal(np.load(tmp_path / "feats.npy"), matrix)
    written = json.loads((tmp_path / "feats.meta.json").read_text())
    # What mec-embed recorded, plus what ties the meta to the other two files, right after "shape".
    ties = {
        "run_id": written["run_id"],
        "paths_sha256": hashlib.sha256(paths_bytes).hexdigest(),
        "features_ends_sha256": hashlib.sha256(f"{len(npy_bytes)}\n".encode() + npy_bytes).hexdigest(),
    }
    assert re.fullmatch("[0-9a-f]{32}", written["run_id"])
    keys = list(MEC_EMBED_META)
    expected_keys = keys[: keys.index("shape") + 1] + list(ties) + keys[keys.index("shape") + 1 :]
    assert written == {**MEC_EMBED_META, **ties} and list(written) == expected_keys
    assert FeatureFile.open(tmp_path / "feats.npy").paths == names

    plain = {"model": "m"}  # a plain dict is written as given, with the ties added
    FeatureFile.write(tmp_path / "other.npy", ["x.png"], plain, matrix=np.ones((1, 3), np.float16))
    other = json.loads((tmp_path / "other.meta.json").read_text())
    assert other == {"model": "m", **{k: other[k] for k in ties}} and other["run_id"] != written["run_id"]

    # mec-embed streams its rows into a .npy of its own, which write renames into place
    np.save(tmp_path / ".rows.npy", matrix)
    FeatureFile.write(
        tmp_path / "moved.npy", names, {"model": "m", "run_id": "r1"}, features_file=tmp_path / ".rows.npy"
    )
    assert not (tmp_path / ".rows.npy").exists() and np.array_equal(np.load(tmp_path / "moved.npy"), matrix)
    assert json.loads((tmp_path / "moved.meta.json").read_text())["run_id"] == "r1"


def test_write_refuses_names_a_line_cannot_hold(tmp_path: Path):
    matrix = np.zeros((2, 4), np.float32)
    plain = {"model": "m"}
    with pytest.raises(ValueError, match="line break"):
        FeatureFile.write(tmp_path / "bad.npy", ["a\nb.png", "c.png"], plain, matrix=matrix)
    latin1 = os.fsdecode(b"caf\xe9.png")  # a Latin-1 file name as os.listdir returns it on Linux
    with pytest.raises(MecHubError, match=r"not valid UTF-8 \(b'caf\\xe9.png'\)"):
        FeatureFile.write(tmp_path / "bad.npy", ["a.png", latin1], plain, matrix=matrix)
    with pytest.raises(ValueError, match="1 paths for 2 rows"):
        FeatureFile.write(tmp_path / "short.npy", ["a.png"], plain, matrix=matrix)
    with pytest.raises(ValueError, match=r"says shape \[2, 4\], the features have \[3, 4\]"):
        FeatureFile.write(tmp_path / "x.npy", ["a", "b", "c"], MEC_EMBED_META, matrix=np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match=r"must end in \.npy"):
        FeatureFile.write(tmp_path / "feats.bin", ["a.png", "b.png"], plain, matrix=matrix)
    assert list(tmp_path.iterdir()) == []  # nothing published, no temporary file left


def test_open_refuses_files_of_two_runs(tmp_path: Path):
    """What a run stopped while replacing an older set leaves: the new files before the new meta."""
    rng = np.random.default_rng(0)
    old_rows, new_rows = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(3, 4)).astype(np.float32)
    meta = {"model": "m", "shape": [3, 4]}
    FeatureFile.write(tmp_path / "old" / "f.npy", ["a.png", "b.png", "c.png"], meta, matrix=old_rows)
    FeatureFile.write(tmp_path / "new" / "f.npy", ["a.png", "b.png", "d.png"], meta, matrix=new_rows)
    FeatureFile.write(tmp_path / "same" / "f.npy", ["a.png", "b.png", "c.png"], meta, matrix=new_rows)

    def mix(paths_from: str, npy_from: str, meta_from: str) -> Path:
        mixed = tmp_path / f"{paths_from}-{npy_from}-{meta_from}"
        mixed.mkdir()
        for name, source in (("f.paths.txt", paths_from), ("f.npy", npy_from), ("f.meta.json", meta_from)):
            shutil.copy(tmp_path / source / name, mixed / name)
        return mixed / "f.npy"

    for paths_from, npy_from, meta_from in (("new", "old", "old"), ("new", "new", "old"), ("old", "same", "old")):
        with pytest.raises(MecHubError, match="do not belong together") as info:
            FeatureFile.open(mix(paths_from, npy_from, meta_from))
        assert "resume=True" in str(info.value) and "\n" not in str(info.value)
    opened = FeatureFile.open(mix("new", "new", "new"))
    assert opened.paths == ["a.png", "b.png", "d.png"] and np.array_equal(opened.matrix, new_rows)


def test_the_features_digest_reads_both_ends_of_a_large_file(tmp_path: Path):
    data = np.random.default_rng(1).integers(0, 256, size=3 * (1 << 20) + 5, dtype=np.uint8).tobytes()
    (tmp_path / "big").write_bytes(data)
    mib = 1 << 20
    expected = hashlib.sha256(f"{len(data)}\n".encode() + data[:mib] + data[-mib:]).hexdigest()
    assert features_ends_sha256(tmp_path / "big") == expected


# --------------------------------------------------------------------------- headers against the bytes present


def npy_with_header(path: Path, shape: tuple[int, ...], data: bytes, dtype: str = "<f4") -> Path:
    """A version 1.0 ``.npy`` typed out by hand: magic, header length, header dict, then ``data``."""
    header = f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': {shape!r}, }}".encode("latin1")
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + data)
    return path


def test_an_npy_header_is_checked_against_the_file_size(tmp_path: Path, memory_cap):
    """Issue 21.9: a header claiming 2^40 rows on a small file, a truncated file, bytes after the data:
    one error naming the file, its header's claim and the bytes present, before anything is mapped."""
    from mec_hub.errors import MalformedFileError

    rows = np.arange(8, dtype="<f4").reshape(2, 4)
    ok = npy_with_header(tmp_path / "ok.npy", (2, 4), rows.tobytes())
    assert np.array_equal(np.load(ok), rows)  # the hand-made file is a valid .npy
    (tmp_path / "ok.paths.txt").write_text("a.png\nb.png\n")
    assert np.array_equal(FeatureFile.open(ok).matrix, rows)

    cases = {
        npy_with_header(tmp_path / "huge.npy", (1 << 40, 4), rows.tobytes()): rf"truncated: .*shape \[{1 << 40}, 4\]",
        npy_with_header(tmp_path / "short.npy", (2, 4), rows.tobytes()[:-1]): r"truncated: .*shape \[2, 4\]",
        npy_with_header(tmp_path / "long.npy", (2, 4), rows.tobytes() + b"\0" * 4): r"has bytes after its data",
    }
    for file, message in cases.items():
        size = file.stat().st_size
        (tmp_path / (file.stem + ".paths.txt")).write_text("a.png\nb.png\n")
        with memory_cap(256 << 20), pytest.raises(MalformedFileError, match=message) as info:
            FeatureFile.open(file)
        assert str(info.value).startswith(f"{file}: ") and f"the file has {size} bytes" in str(info.value)


def test_a_paths_file_larger_than_its_rows_can_need_is_refused_unread(tmp_path: Path):
    """X.paths.txt is bounded by its row count (a line per row, at most PATH_MAX bytes each) before it is read."""
    np.save(tmp_path / "x.npy", np.zeros((2, 3), np.float32))
    (tmp_path / "x.paths.txt").write_bytes(b"a.png\n" + b"b" * 10_000 + b".png\n")  # 2 lines, one past PATH_MAX
    size = (tmp_path / "x.paths.txt").stat().st_size
    with pytest.raises(MecHubError, match=rf"x\.paths\.txt: paths file of {size} bytes, over the limit of 8194"):
        FeatureFile.open(tmp_path / "x.npy")


def test_a_meta_without_digests_that_counts_other_rows_is_refused(tmp_path: Path):
    """Issue 19.8: a meta written by hand (no run_id, no digests) whose shape is not the matrix's: the
    shape alone refuses the set, so rows of one run are never described by another's meta."""
    np.save(tmp_path / "x.npy", np.zeros((3, 4), np.float32))
    (tmp_path / "x.paths.txt").write_text("a/1.png\na/2.png\na/3.png\n")
    (tmp_path / "x.meta.json").write_text(json.dumps({"model": "m", "shape": [4, 4]}))
    with pytest.raises(MecHubError, match=r"x\.npy has shape \[3, 4\], x\.meta\.json says \[4, 4\]"):
        FeatureFile.open(tmp_path / "x.npy")
    (tmp_path / "x.meta.json").write_text(json.dumps({"model": "m", "shape": [3, 4]}))
    assert FeatureFile.open(tmp_path / "x.npy").meta.shape == (3, 4)
