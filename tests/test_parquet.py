"""mec-embed --out X.parquet: the rows, paths and meta of the .npy output, read back with pyarrow."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from embed_support import run_cli_subprocess

from mec_hub.cli.embed import main
from mec_hub.data.featurefile import FeatureFile

pq = pytest.importorskip("pyarrow.parquet")

PHOTOS = Path(__file__).parent / "data" / "photos"
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
        answers.append(json.loads(result.output))
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
