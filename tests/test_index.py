"""mec_hub.apps.index (FeatureIndex) and ``mec-hub index``, checked against brute-force NumPy search."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_search import indexed  # noqa: F401  (the model-made feature file: fixture shared with test_search)

from mec_hub.apps.index import FaissMissingError, FeatureIndex, StaleIndexError
from mec_hub.cli.hub import main


def clustered(n: int, dim: int = 32, clusters: int = 64, seed: int = 0) -> np.ndarray:
    """``n`` points around the same ``clusters`` centres whatever ``seed`` (which draws the points)."""
    centres = np.random.default_rng(12345).normal(size=(clusters, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    return (centres[rng.integers(clusters, size=n)] + 0.6 * rng.normal(size=(n, dim))).astype(np.float32)


def brute_force(matrix: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities of every row, sorted: written here, independent of the package."""
    m = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ m.T.astype(np.float64)
    rows = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, rows, axis=1), rows


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(
        np.mean([len(set(f.tolist()) & set(t.tolist())) / truth.shape[1] for f, t in zip(found, truth, strict=True)])
    )


@pytest.fixture(scope="module")
def feats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("index") / "feats.npy"
    np.save(path, clustered(20_000))
    return path


@pytest.fixture(scope="module")
def built(feats: Path) -> FeatureIndex:
    return FeatureIndex.build(feats, kind="auto", recall=0.9, exact_below=5_000)


def test_auto_index_reaches_the_requested_recall_on_unseen_queries(feats: Path, built: FeatureIndex):
    matrix = np.load(feats)
    assert built.kind == "ivf"  # large enough for the approximate index
    queries = clustered(300, seed=1)  # same clusters, not rows of the file
    _, truth = brute_force(matrix, queries, 10)
    scores, rows = built.search(queries, 10)
    assert rows.shape == (300, 10) and rows.dtype == np.int64
    assert recall(rows, truth) >= 0.9
    # The scores are the cosine similarities of the rows returned, best first.
    m = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    expected = np.einsum("qd,qkd->qk", q, m[rows])
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)


def test_flat_index_is_exact(feats: Path):
    matrix = np.load(feats)[:3000]
    index = FeatureIndex.build(matrix * 7.0, kind="auto")  # small: exact; scale does not matter for cosine
    assert index.kind == "flat"
    queries = clustered(50, seed=2)
    want_scores, want_rows = brute_force(matrix, queries, 5)
    scores, rows = index.search(queries, 5)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_save_load_round_trip_gives_identical_results(feats: Path, built: FeatureIndex, tmp_path: Path):
    written = built.save(tmp_path / "feats.index")
    record = json.loads((tmp_path / "feats.index.json").read_text())
    assert record["kind"] == "ivf" and record["rows"] == 20_000 and record["params"]["nprobe"] >= 1
    assert 0.9 <= record["recall_at_10"] <= 1.0
    import hashlib

    assert record["source_sha256"] == hashlib.sha256(feats.read_bytes()).hexdigest()
    loaded = FeatureIndex.load(written, features=feats)
    queries = clustered(100, seed=3)
    a, b = built.search(queries, 10), loaded.search(queries, 10)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])


def test_a_stale_index_is_refused(feats: Path, built: FeatureIndex, tmp_path: Path):
    written = built.save(tmp_path / "feats.index")
    other = tmp_path / "other.npy"
    matrix = np.load(feats).copy()
    matrix[123, 0] += 1.0  # same shape, one value changed
    np.save(other, matrix)
    with pytest.raises(StaleIndexError, match=r"rebuild it: mec-hub index .*other\.npy --out .*feats\.index"):
        FeatureIndex.load(written, features=other)


def test_without_faiss_one_line_says_how_to_install(feats: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    with pytest.raises(FaissMissingError, match=r"pip install 'mec-hub\[index\]'"):
        FeatureIndex.build(feats)
    result = CliRunner().invoke(main, ["index", str(feats), "--out", str(tmp_path / "x.index")])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: the index needs FAISS, which is not installed: pip install 'mec-hub[index]'"


def test_index_cli_writes_index_and_record(feats: Path, tmp_path: Path):
    out = tmp_path / "cli.index"
    result = CliRunner().invoke(
        main, ["index", str(feats), "--out", str(out), "--exact-below", "1000", "--recall", "0.9"]
    )
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "cli.index.json").read_text())
    assert record["kind"] == "ivf" and record["recall_at_10"] >= 0.9
    matrix = np.load(feats)
    queries = clustered(100, seed=4)
    _, truth = brute_force(matrix, queries, 10)
    assert recall(FeatureIndex.load(out, features=feats).search(queries, 10)[1], truth) >= 0.9


def write_feature_file(path: Path, matrix: np.ndarray) -> Path:
    """A feature file as mec-embed lays it out, without the meta (not needed to query by row)."""
    np.save(path, matrix)
    path.with_name(path.stem + ".paths.txt").write_text("".join(f"img{i:05d}.png\n" for i in range(len(matrix))))
    return path


def search_json(*args: object) -> list[dict]:
    result = CliRunner().invoke(main, ["search", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_search_by_row_exact_with_and_without_self(tmp_path: Path):
    matrix = clustered(2000)
    feats = write_feature_file(tmp_path / "small.npy", matrix)
    scores, rows = brute_force(matrix, matrix[[5, 1234]], 6)
    out = search_json(feats, "--row", 5, "--row", 1234, "-k", 5)
    assert [h["row"] for h in out[0]["neighbours"]] == rows[0, :5].tolist()
    assert out[0]["neighbours"][0]["row"] == 5 and out[1]["neighbours"][0]["row"] == 1234
    np.testing.assert_allclose([h["score"] for h in out[1]["neighbours"]], scores[1, :5], atol=1e-5)
    assert out[1]["neighbours"][2]["path"] == f"img{rows[1, 2]:05d}.png"
    out = search_json(feats, "--row", 5, "--row", 1234, "-k", 5, "--exclude-self")
    for q, hits in enumerate(out):
        assert [h["row"] for h in hits["neighbours"]] == rows[q, 1:6].tolist()
        assert [h["rank"] for h in hits["neighbours"]] == [1, 2, 3, 4, 5]


def test_search_uses_the_index_beside_the_file_and_refuses_it_when_stale(feats: Path, tmp_path: Path):
    matrix = np.load(feats)
    local = write_feature_file(tmp_path / "feats.npy", matrix)
    built = CliRunner().invoke(main, ["index", str(local), "--exact-below", "1000", "--recall", "0.9"])
    assert built.exit_code == 0, built.output
    assert (tmp_path / "feats.index").is_file()
    query_rows = list(range(0, 20_000, 400))  # 50 rows
    args = [x for r in query_rows for x in ("--row", r)]
    out = search_json(local, *args, "-k", 10, "--exclude-self")
    _, truth = brute_force(matrix, matrix[query_rows], 11)
    found = np.array([[h["row"] for h in hits["neighbours"]] for hits in out])
    assert found.shape == (50, 10) and not np.any(found == np.array(query_rows)[:, None])
    assert recall(found, truth[:, 1:]) >= 0.9
    # The same file with one value changed: the index beside it no longer describes it.
    matrix[7, 3] += 0.5
    np.save(local, matrix)
    result = CliRunner().invoke(main, ["search", str(local), "--row", "0"])
    assert result.exit_code == 1
    assert "rebuild it: mec-hub index" in result.output and "Traceback" not in result.output
    # An explicit --index is checked the same way: fine for a file with the very bytes it was built from.
    copy = write_feature_file(tmp_path / "copy.npy", np.load(feats))
    index = tmp_path / "feats.index"
    assert search_json(copy, "--index", index, "--row", 0)[0]["neighbours"][0]["row"] == 0
    result = CliRunner().invoke(main, ["search", str(local), "--index", str(index), "--row", "0"])
    assert result.exit_code == 1 and "rebuild it: mec-hub index" in result.output
    # A bad row is one clear line.
    result = CliRunner().invoke(main, ["search", str(copy), "--row", "20000"])
    assert result.exit_code == 1 and "has rows 0 to 19999" in result.output


def test_hnsw_reaches_the_recall_and_keeps_its_setting_through_save_and_load(tmp_path: Path):
    data = clustered(5300, seed=5)
    matrix, queries = data[:5000], data[5000:]
    index = FeatureIndex.build(matrix, kind="hnsw", recall=0.95)
    assert index.kind == "hnsw"
    _, truth = brute_force(matrix, queries, 10)
    found = index.search(queries, 10)[1]
    assert recall(found, truth) >= 0.95
    loaded = FeatureIndex.load(index.save(tmp_path / "h.index"))
    assert loaded.params["ef_search"] == index.params["ef_search"]
    np.testing.assert_array_equal(loaded.search(queries, 10)[1], found)


def test_image_query_exclude_self_and_through_an_index(indexed: Path, tmp_path: Path):  # noqa: F811
    root = indexed
    feats, query = root / "FEATS.npy", root / "images" / "cat" / "0001.png"
    plain = search_json(feats, query, "-k", 4)[0]["neighbours"]
    assert Path(plain[0]["resolved"]).resolve() == query.resolve()
    excluded = search_json(feats, query, "-k", 3, "--exclude-self")[0]["neighbours"]
    assert [h["row"] for h in excluded] == [h["row"] for h in plain[1:]]
    assert [h["rank"] for h in excluded] == [1, 2, 3]
    # Through an exact index written elsewhere: the same answer.
    index = tmp_path / "FEATS.index"
    assert CliRunner().invoke(main, ["index", str(feats), "--out", str(index)]).exit_code == 0
    via_index = search_json(feats, query, "-k", 4, "--index", index)[0]["neighbours"]
    assert [h["row"] for h in via_index] == [h["row"] for h in plain]


def test_without_faiss_search_warns_and_searches_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    matrix = clustered(500)
    feats = write_feature_file(tmp_path / "f.npy", matrix)
    assert CliRunner().invoke(main, ["index", str(feats)]).exit_code == 0
    monkeypatch.setitem(sys.modules, "faiss", None)
    result = CliRunner().invoke(main, ["search", str(feats), "--row", "3", "-k", "4", "--json"])
    assert result.exit_code == 0, result.output
    assert "f.index not used, exact search instead: the index needs FAISS" in result.stderr
    out = json.loads(result.stdout)
    assert [h["row"] for h in out[0]["neighbours"]] == brute_force(matrix, matrix[[3]], 4)[1][0].tolist()
    result = CliRunner().invoke(main, ["search", str(feats), "--index", str(tmp_path / "f.index"), "--row", "3"])
    assert result.exit_code == 1 and "pip install 'mec-hub[index]'" in result.output


def test_index_and_search_read_parquet_shards(tmp_path: Path):
    pytest.importorskip("pyarrow")
    from mec_hub.data.featurefile import FeatureFile, write_parquet

    matrix = clustered(3000)
    npy = write_feature_file(tmp_path / "src.npy", matrix)
    shards = write_parquet(FeatureFile.open(npy), tmp_path / "feats.parquet", shard_rows=1000)
    assert len(shards) == 3 and not (tmp_path / "feats.parquet").exists()
    result = CliRunner().invoke(main, ["index", str(tmp_path / "feats.parquet"), "--exact-below", "1000"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "feats.index").is_file()
    out = search_json(tmp_path / "feats.parquet", "--row", 2500, "-k", 10, "--exclude-self")
    _, truth = brute_force(matrix, matrix[[2500]], 11)
    found = np.array([[h["row"] for h in out[0]["neighbours"]]])
    assert recall(found, truth[:, 1:]) >= 0.9
    # Rewrite one shard with other rows: the index no longer matches.
    changed = matrix.copy()
    changed[1500] *= -1
    write_parquet(
        FeatureFile.open(write_feature_file(tmp_path / "src.npy", changed)), tmp_path / "feats.parquet", shard_rows=1000
    )
    result = CliRunner().invoke(main, ["search", str(tmp_path / "feats.parquet"), "--row", "0"])
    assert result.exit_code == 1 and "rebuild it: mec-hub index" in result.output


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "auto"])
def test_a_tiny_file_gets_an_exact_index_whatever_the_kind(kind: str):
    matrix = clustered(12, seed=6)
    index = FeatureIndex.build(matrix, kind=kind)
    assert index.kind == "flat"
    _, rows = index.search(matrix[:2], 50)
    assert rows.shape == (2, 12)
    np.testing.assert_array_equal(rows, brute_force(matrix, matrix[:2], 12)[1])
