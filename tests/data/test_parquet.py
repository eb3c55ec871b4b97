"""mec-embed --out X.parquet: the rows, paths and meta of the .npy output, read back with pyarrow."""

from __future__ import annotations

import json
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mec_hub.cli.embed import main
from mec_hub.data.featurefile import FeatureFile
from tests.support.embedding import run_cli_subprocess
from tests.support.parquet import claim_rows
from tests.support.paths import ASSETS_DIR

pq = pytest.importorskip("pyarrow.parquet")

PHOTOS = ASSETS_DIR / "photos"
BATCH = 4


def args(out: Path, weights: Path, *extra: object) -> list[str]:
    base = [PHOTOS, "--out", out, "--weights", weights, "--device", "cpu", "-b", BATCH, "-j", 0, "-q", *extra]
    return [str(a) for a in base]


def embed(out: Path, weights: Path, *extra: object) -> None:
    result = CliRunner().invoke(main, args(out, weights, *extra))
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def reference(tiny_weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("npy") / "f.npy"
    embed(out, tiny_weights_dir, "--out-dtype", "float16")
    return out


def read_with_pyarrow(files: list[Path]) -> tuple[np.ndarray, list[str], list[dict]]:
    matrices, paths, metas = [], [], []
    for file in files:
        table = pq.read_table(file)
        assert table.column_names == ["path", "embedding"]
        embedding = table.column("embedding").combine_chunks()
        assert embedding.type.list_size == 512
        matrices.append(np.array(embedding.to_pylist(), dtype=np.float16))
        paths += table.column("path").to_pylist()
        metas.append(json.loads(pq.read_schema(file).metadata[b"mec_hub.meta"]))
    return np.concatenate(matrices), paths, metas


def test_parquet_equals_the_npy_output(reference: Path, tiny_weights_dir: Path, tmp_path: Path):
    out = tmp_path / "f.parquet"
    embed(out, tiny_weights_dir, "--out-dtype", "float16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.parquet"]  # the hidden .npy set is gone

    matrix, paths, (meta,) = read_with_pyarrow([out])
    assert str(pq.read_schema(out).field("embedding").type.value_type) == "halffloat"
    np.testing.assert_array_equal(matrix, np.load(reference))
    assert paths == reference.with_name("f.paths.txt").read_text().splitlines()
    npy_meta = json.loads(reference.with_name("f.meta.json").read_text())
    assert meta["shape"] == npy_meta["shape"] and meta["row_offset"] == 0 and meta["features"] == "f.parquet"
    for key in ("weights_sha256", "model", "num_failed", "failed", "fingerprint", "out_dtype"):
        assert meta[key] == npy_meta[key], key

    opened = FeatureFile.open(out)
    np.testing.assert_array_equal(opened.matrix, np.load(reference))
    assert opened.paths == paths and opened.meta.weights_sha256 == npy_meta["weights_sha256"]

    refused = CliRunner().invoke(main, args(out, tiny_weights_dir, "--out-dtype", "float16"))
    assert refused.exit_code == 1 and "--overwrite" in refused.output


def test_shard_rows(reference: Path, tiny_weights_dir: Path, tmp_path: Path):
    out = tmp_path / "f.parquet"
    embed(out, tiny_weights_dir, "--out-dtype", "float16", "--shard-rows", 7)
    rows = len(np.load(reference))
    files = sorted(tmp_path.iterdir())
    expected_files = -(-rows // 7)
    assert [p.name for p in files] == [f"f-{i:05d}.parquet" for i in range(expected_files)]
    matrix, paths, metas = read_with_pyarrow(files)
    assert [m["shape"][0] for m in metas] == [min(7, rows - 7 * i) for i in range(expected_files)]
    assert [m["row_offset"] for m in metas] == [7 * i for i in range(expected_files)]
    np.testing.assert_array_equal(matrix, np.load(reference))
    assert paths == reference.with_name("f.paths.txt").read_text().splitlines()
    opened = FeatureFile.open(out)  # the shards, as one set
    np.testing.assert_array_equal(opened.matrix, np.load(reference))


def test_shard_rows_needs_parquet(tiny_weights_dir: Path, tmp_path: Path):
    result = CliRunner().invoke(main, args(tmp_path / "f.npy", tiny_weights_dir, "--shard-rows", 5))
    assert result.exit_code == 2 and "--shard-rows" in result.output


@pytest.mark.slow
def test_kill_and_resume(reference: Path, tiny_weights_dir: Path, tmp_path: Path):
    out = tmp_path / "f.parquet"
    run = [PHOTOS, "--out", out, "--weights", tiny_weights_dir, "--device", "cpu", "-b", BATCH, "-j", 1, "-q"]
    run += ["--out-dtype", "float16"]
    killed = run_cli_subprocess(*run, faults={"kill_after_batches": 2})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()
    resumed = run_cli_subprocess(*run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    matrix, paths, _ = read_with_pyarrow([out])
    assert matrix.tobytes() == np.load(reference).tobytes()
    assert paths == reference.with_name("f.paths.txt").read_text().splitlines()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.parquet"]


def test_a_stopped_conversion_is_finished_by_resume(
    reference: Path, tiny_weights_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import mec_hub.data.featurefile as featurefile

    out = tmp_path / "f.parquet"
    real_atomic_write = featurefile.atomic_write
    published = []

    def full_after_first_file(path: Path, write) -> Path:  # type: ignore[no-untyped-def]
        if Path(path).suffix == ".parquet":
            if published:
                raise OSError(28, "No space left on device", str(path))
            published.append(Path(path))
        return real_atomic_write(path, write)

    monkeypatch.setattr(featurefile, "atomic_write", full_after_first_file)
    stopped = CliRunner().invoke(main, args(out, tiny_weights_dir, "--out-dtype", "float16", "--shard-rows", 7))
    assert stopped.exit_code == 1 and "No space left on device" in stopped.output
    assert "--resume" in stopped.output and "Traceback" not in stopped.output
    assert [p.name for p in published] == ["f-00000.parquet"]
    assert (tmp_path / ".f.parquet.npy").exists()  # the finished set is kept until the conversion is done

    monkeypatch.setattr(featurefile, "atomic_write", real_atomic_write)
    refused = CliRunner().invoke(main, args(out, tiny_weights_dir, "--out-dtype", "float16", "--shard-rows", 7))
    assert refused.exit_code == 1 and "--overwrite" in refused.output
    resumed = CliRunner().invoke(
        main, args(out, tiny_weights_dir, "--out-dtype", "float16", "--shard-rows", 7, "--resume")
    )
    assert resumed.exit_code == 0, resumed.output
    files = sorted(tmp_path.iterdir())
    assert all(p.name.startswith("f-") for p in files)
    matrix, paths, _ = read_with_pyarrow(files)
    np.testing.assert_array_equal(matrix, np.load(reference))
    assert paths == reference.with_name("f.paths.txt").read_text().splitlines()


def test_search_reads_parquet(reference: Path, tiny_weights_dir: Path, tmp_path: Path):
    from mec_hub.cli.hub import main as hub

    out = tmp_path / "f.parquet"
    embed(out, tiny_weights_dir, "--out-dtype", "float16")
    query = str(PHOTOS / "skimage-camera.png")
    answers = []
    for features in (reference, out):
        result = CliRunner().invoke(hub, ["search", str(features), query, "-k", "3", "--device", "cpu", "--json"])
        assert result.exit_code == 0, result.output
        answers.append(json.loads(result.stdout))  # notes (e.g. "no index: exact search") go to stderr
    assert answers[0] == answers[1]
    assert "skimage-camera.png" in json.dumps(answers[1])


def test_summary_names_the_parquet_files(tiny_weights_dir: Path, tmp_path: Path):
    out = tmp_path / "f.parquet"
    quiet = args(out, tiny_weights_dir, "--shard-rows", 10)
    result = CliRunner().invoke(main, [a for a in quiet if a != "-q"])
    assert result.exit_code == 0, result.output
    assert "-> " + str(tmp_path / "f-00000.parquet ... f-00001.parquet") in result.output
    assert ".npy" not in result.output


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_write_parquet_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: type):
    import mec_hub.data.featurefile as featurefile

    monkeypatch.setattr(featurefile, "PARQUET_BLOCK_ROWS", 4)  # several row groups per file
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((11, 6)).astype(dtype)
    names = [f"dir/ü{i}.jpg" for i in range(11)]
    featurefile.FeatureFile.write(tmp_path / "x.npy", names, {"model": "m"}, matrix=matrix)
    written = featurefile.write_parquet(featurefile.FeatureFile.open(tmp_path / "x.npy"), tmp_path / "x.parquet")
    assert written == [tmp_path / "x.parquet"]
    table = pq.read_table(tmp_path / "x.parquet")
    assert pq.ParquetFile(tmp_path / "x.parquet").num_row_groups == 3
    assert table.column("path").to_pylist() == names
    np.testing.assert_array_equal(np.array(table.column("embedding").to_pylist(), dtype=dtype), matrix)
    meta = json.loads(table.schema.metadata[b"mec_hub.meta"])
    assert meta["model"] == "m" and meta["shape"] == [11, 6]
    opened = featurefile.FeatureFile.open(tmp_path / "x.parquet")
    assert opened.matrix.dtype == dtype and opened.paths == names
    np.testing.assert_array_equal(opened.matrix, matrix)


def test_parquet_errors_name_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import pyarrow as pa

    from mec_hub.errors import MecHubError

    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"path": ["a.jpg"], "vector": [[1.0, 2.0]]}), other)
    with pytest.raises(MecHubError, match=r"other\.parquet: expected the columns 'path' and 'embedding'"):
        FeatureFile.open(other)
    lists = tmp_path / "lists.parquet"
    pq.write_table(pa.table({"path": ["a.jpg"], "embedding": [[1.0, 2.0]]}), lists)
    with pytest.raises(MecHubError, match=r"lists\.parquet: 'embedding' must be a fixed-size list"):
        FeatureFile.open(lists)
    with pytest.raises(MecHubError, match=r"feature file not found: .*none\.parquet"):
        FeatureFile.open(tmp_path / "none.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(MecHubError, match=r"pip install 'mec-hub\[parquet\]'"):
        FeatureFile.open(other)


# --------------------------------------------------------------------------- a set is what its meta names


def _npy_set(folder: Path, rows: int, seed: int, dim: int = 3) -> FeatureFile:
    matrix = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    names = [f"c{seed}/{i}.png" for i in range(rows)]
    FeatureFile.write(folder / "src.npy", names, {"model": "m"}, matrix=matrix)
    return FeatureFile.open(folder / "src.npy")


def test_a_shard_set_is_exactly_what_its_meta_names(tmp_path: Path):
    """Issue 21.8: 33 rows read for 24 written. A shard left over from an older conversion, one
    missing, or one of another set is refused by name; the set itself reads back exactly."""
    from mec_hub.data.featurefile import write_parquet
    from mec_hub.errors import MecHubError

    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    (tmp_path / "other").mkdir()
    old = _npy_set(tmp_path / "old", 33, seed=1)
    new = _npy_set(tmp_path / "new", 24, seed=2)
    other = _npy_set(tmp_path / "other", 24, seed=3)
    old_files = write_parquet(old, tmp_path / "old" / "f.parquet", shard_rows=3)  # 11 shards
    new_files = write_parquet(new, tmp_path / "new" / "f.parquet", shard_rows=8)  # 3 shards
    other_files = write_parquet(other, tmp_path / "other" / "f.parquet", shard_rows=8)
    assert [p.name for p in new_files] == ["f-00000.parquet", "f-00001.parquet", "f-00002.parquet"]
    expected = np.load(tmp_path / "new" / "src.npy")
    expected_paths = (tmp_path / "new" / "src.paths.txt").read_text().splitlines()

    opened = FeatureFile.open(tmp_path / "new" / "f.parquet")
    assert opened.matrix.shape == (24, 3) and np.array_equal(opened.matrix, expected)
    assert opened.paths == expected_paths and opened.meta.shape == (24, 3)

    def case(name: str, files: dict[str, Path]) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for target, source in files.items():
            shutil.copy(source, folder / target)
        return folder / "f.parquet"

    mine = {p.name: p for p in new_files}
    leftovers = case("leftover", {**mine, "f-00003.parquet": old_files[3], "f-00010.parquet": old_files[10]})
    with pytest.raises(MecHubError, match=r"f-00003\.parquet, f-00010\.parquet not part of it") as info:
        FeatureFile.open(leftovers)
    assert "resume=True" in str(info.value) and "\n" not in str(info.value)
    missing = case("missing", {k: v for k, v in mine.items() if k != "f-00001.parquet"})
    with pytest.raises(MecHubError, match=r"f-00001\.parquet missing"):
        FeatureFile.open(missing)
    foreign = case("foreign", {**mine, "f-00001.parquet": other_files[1]})  # same count and sizes, another set
    with pytest.raises(MecHubError, match=r"f-00001\.parquet: not a shard of the set f-00000\.parquet starts"):
        FeatureFile.open(foreign)
    older_first = case("older_first", {**mine, "f-00000.parquet": old_files[0]})  # the old set's first shard
    with pytest.raises(MecHubError, match=r"has 11 shards"):
        FeatureFile.open(older_first)
    with pytest.raises(MecHubError, match=r"shard 1 of 3 .* not a whole set"):  # one shard opened as a set
        FeatureFile.open(tmp_path / "new" / "f-00001.parquet")

    # Converting anew with fewer shards removes the old ones: what is left reads as one set.
    write_parquet(old, tmp_path / "new" / "f.parquet", shard_rows=8)
    assert sorted(p.name for p in (tmp_path / "new").glob("f-*")) == [f"f-{i:05d}.parquet" for i in range(5)]
    rewritten = FeatureFile.open(tmp_path / "new" / "f.parquet").matrix
    assert np.array_equal(rewritten, np.load(tmp_path / "old" / "src.npy"))


def test_shard_sets_written_before_the_set_keys_still_read(tmp_path: Path):
    """Shards written before ``shard_count``/``set_id`` existed (``row_offset`` only) read as before;
    one out of order is refused."""
    import pyarrow as pa

    from mec_hub.errors import MecHubError

    rows = np.arange(10, dtype=np.float32).reshape(5, 2)
    for index, (start, end) in enumerate(((0, 3), (3, 5))):
        meta = {"model": "m", "features": f"f-{index:05d}.parquet", "shape": [end - start, 2], "row_offset": start}
        table = pa.table(
            {
                "path": [f"a/{i}.png" for i in range(start, end)],
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(rows[start:end].reshape(-1)), 2),
            }
        ).replace_schema_metadata({b"mec_hub.meta": json.dumps(meta).encode()})
        pq.write_table(table, tmp_path / f"f-{index:05d}.parquet")
    opened = FeatureFile.open(tmp_path / "f.parquet")
    assert np.array_equal(opened.matrix, rows) and opened.paths == [f"a/{i}.png" for i in range(5)]
    assert opened.meta.model == "m" and opened.meta.shape == (5, 2) and "row_offset" not in opened.meta.extra
    shutil.copy(tmp_path / "f-00000.parquet", tmp_path / "f-00002.parquet")  # a leftover of the old kind
    with pytest.raises(MecHubError, match=r"f-00002\.parquet: not a shard of the set .*row_offset differs"):
        FeatureFile.open(tmp_path / "f.parquet")


# --------------------------------------------------------------------------- the footer before the columns


def test_a_footer_claiming_2_to_the_40_rows_is_refused_before_reading(tmp_path: Path, memory_cap):
    """Issue 21.9: a footer claiming 2^40 rows was believed (19.5 GB allocated): now the claim is
    checked against the file's size first, in a process that could not allocate it anyway."""
    from mec_hub.data.featurefile import write_parquet
    from mec_hub.errors import MalformedFileError

    source = _npy_set(tmp_path, 1234, seed=4, dim=4)
    write_parquet(source, tmp_path / "x.parquet")
    claim_rows(tmp_path / "x.parquet", tmp_path / "huge.parquet", 1234, 1 << 40)
    assert pq.read_metadata(tmp_path / "huge.parquet").num_rows == 1 << 40  # pyarrow reads the claim
    size = (tmp_path / "huge.parquet").stat().st_size
    with memory_cap(512 << 20), pytest.raises(MalformedFileError) as info:
        FeatureFile.open(tmp_path / "huge.parquet")
    assert str(info.value) == (
        f"{tmp_path / 'huge.parquet'}: its footer claims {1 << 40} rows of 4 values ({(1 << 40) * 16} bytes) "
        f"in a file of {size} bytes, more than 64 times its size: a damaged or hostile file"
    )
    # A claim the size allows, but not the meta: refused by the meta before any column is read.
    claim_rows(tmp_path / "x.parquet", tmp_path / "more.parquet", 1234, 1300)
    with memory_cap(512 << 20), pytest.raises(MalformedFileError, match=r"says shape \[1234, 4\], .* 1300 rows of 4"):
        FeatureFile.open(tmp_path / "more.parquet")


def test_rows_a_writer_could_not_mean_are_refused_by_row(tmp_path: Path):
    """Null rows, null values, a null path, another type of number, a meta that does not describe
    the file: one MecHubError naming the file and the row or field, never a traceback or a row
    silently read as 'None' or NaN."""
    import pyarrow as pa

    from mec_hub.errors import MecHubError

    def write(name: str, paths: list, values: list, value_type: object = None, meta: object = None) -> Path:
        value_type = value_type or pa.float32()
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(values, type=value_type), 2)
        if name == "null_row.parquet":  # row 1 null, as a writer with a mask would make it
            embedding = pa.FixedSizeListArray.from_arrays(
                pa.array(values, type=value_type), 2, mask=pa.array([False, True, False])
            )
        table = pa.table({"path": pa.array(paths, type=pa.string()), "embedding": embedding})
        if meta is not None:
            table = table.replace_schema_metadata({b"mec_hub.meta": json.dumps(meta).encode()})
        pq.write_table(table, tmp_path / name)
        return tmp_path / name

    ok = write("ok.parquet", ["a", "b", "c"], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert FeatureFile.open(ok).matrix.tolist() == [[1, 2], [3, 4], [5, 6]]
    cases = {
        write("null_row.parquet", ["a", "b", "c"], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]): r"row 1 has no embedding",
        write("null_value.parquet", ["a", "b", "c"], [1.0, 2.0, 3.0, None, 5.0, 6.0]): r"row 1 has a null among",
        write("null_path.parquet", ["a", None, "c"], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]): r"row 1 has no path",
        write("f64.parquet", ["a", "b", "c"], [1.0] * 6, pa.float64()): r"float16 or float32, not double",
        write("meta_rows.parquet", ["a", "b", "c"], [1.0] * 6, meta={"shape": [2, 2]}): r"says shape \[2, 2\]",
        write("meta_type.parquet", ["a", "b", "c"], [1.0] * 6, meta={"embed_dim": "2"}): r"embed_dim is '2'",
        write("meta_json.parquet", ["a", "b", "c"], [1.0] * 6, meta="{"): r"must be a JSON object",
    }
    for file, message in cases.items():
        with pytest.raises(MecHubError, match=message) as info:
            FeatureFile.open(file)
        assert str(file) in str(info.value), str(info.value)
