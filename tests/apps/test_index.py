"""mec_hub.apps.index (FeatureIndex) and ``mec-hub index``, checked against brute-force NumPy search."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mec_hub.apps.index import FaissMissingError, FeatureIndex, StaleIndexError
from mec_hub.cli.hub import main
from mec_hub.errors import MecHubError


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
    return json.loads(result.stdout)


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


def test_image_query_exclude_self_and_through_an_index(indexed: Path, tmp_path: Path):
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
    # One shard is not a set: index the set, named for the set.
    result = CliRunner().invoke(main, ["index", str(tmp_path / "feats-00001.parquet")])
    assert result.exit_code == 2 and "index the whole set (mec-hub index" in result.output


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfpq", "auto"])
def test_a_tiny_file_gets_an_exact_index_whatever_the_kind(kind: str):
    matrix = clustered(12, seed=6)
    index = FeatureIndex.build(matrix, kind=kind)
    assert index.kind == "flat"
    _, rows = index.search(matrix[:2], 50)
    assert rows.shape == (2, 12)
    np.testing.assert_array_equal(rows, brute_force(matrix, matrix[:2], 12)[1])


# --------------------------------------------------------------------------- hostile and inconsistent files


def sha256_hex(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def publish(index_file: Path, data: bytes, record: dict) -> Path:
    """An index file and a record that agree with it (its SHA-256), as a stranger can make them."""
    index_file.write_bytes(data)
    record = {**record, "index_sha256": sha256_hex(data)}
    (index_file.parent / (index_file.name + ".json")).write_text(json.dumps(record))
    return index_file


def small_set(tmp_path: Path, rows: int = 300, seed: int = 7) -> tuple[Path, np.ndarray]:
    matrix = np.random.default_rng(seed).normal(size=(rows, 8)).astype(np.float32)
    np.save(tmp_path / "small.npy", matrix)
    return tmp_path / "small.npy", matrix


def test_a_crafted_index_claiming_gigabytes_is_refused_without_allocating_them(tmp_path: Path, memory_cap):
    import faiss

    flat = faiss.IndexFlatIP(4)
    flat.add(np.eye(4, dtype=np.float32)[:3])
    data = bytearray(faiss.serialize_index(flat).tobytes())
    # The header (fourcc, d, ntotal, 2 x int64, is_trained, metric) is 37 bytes; then the vector of
    # codes: its length as uint64, then the bytes. Claim 4.2e9 floats: 16.8 GB for a 93-byte file.
    assert len(data) == 93 and bytes(data[:4]) == b"IxFI"
    data[37:45] = (4_200_000_000).to_bytes(8, "little")
    record = {"format": "mec-hub-index", "kind": "flat", "params": {}, "recall_at_10": 1.0, "rows": 3, "dim": 4,
              "source": None, "source_sha256": None, "build_seconds": 0.1}
    path = publish(tmp_path / "crafted.index", bytes(data), record)
    before = faiss.get_deserialization_vector_byte_limit()
    with memory_cap(512 * 2**20), pytest.raises(MecHubError, match=r"crafted\.index: unreadable FAISS index"):
        FeatureIndex.load(path)
    assert faiss.get_deserialization_vector_byte_limit() == before  # the process-wide limit is restored
    # A header claiming more vectors than the file's bytes can hold is refused before FAISS reads it.
    data = bytearray(faiss.serialize_index(flat).tobytes())
    data[8:16] = (10**9).to_bytes(8, "little")
    path = publish(tmp_path / "huge.index", bytes(data), {**record, "rows": 10**9})
    claims = r"huge\.index: the header claims 1000000000 vectors"
    with memory_cap(512 * 2**20), pytest.raises(MecHubError, match=claims):
        FeatureIndex.load(path)


def test_an_index_of_other_rows_is_refused_even_with_a_matching_digest(tmp_path: Path):
    """A record can state any digest: the rows and the vectors themselves are compared with the set's."""
    feats, matrix = small_set(tmp_path, rows=300)
    digest = sha256_hex(feats.read_bytes())
    # 1. An index of 200 other rows whose record claims this set: its row numbers mean nothing here.
    other = FeatureIndex.build(np.random.default_rng(1).normal(size=(200, 8)).astype(np.float32), kind="flat")
    path = other.save(tmp_path / "other.index")
    record = json.loads((tmp_path / "other.index.json").read_text())
    (tmp_path / "other.index.json").write_text(json.dumps({**record, "source_sha256": digest}))
    with pytest.raises(StaleIndexError, match=r"other\.index indexes 200 x 8 rows but .*small\.npy holds 300 x 8"):
        FeatureIndex.load(path, features=feats)
    # 2. As many rows, but not these: every answer would be a wrong row at the score of another.
    shuffled = FeatureIndex.build(matrix[::-1].copy(), kind="flat")
    path = shuffled.save(tmp_path / "shuffled.index")
    record = json.loads((tmp_path / "shuffled.index.json").read_text())
    (tmp_path / "shuffled.index.json").write_text(json.dumps({**record, "source_sha256": digest}))
    with pytest.raises(StaleIndexError, match=r"shuffled\.index: its vectors are not the rows .* rebuild it"):
        FeatureIndex.load(path, features=feats)
    # The honest index of the set loads and answers what brute force does.
    honest = FeatureIndex.load(FeatureIndex.build(feats, kind="flat").save(tmp_path / "small.index"), features=feats)
    np.testing.assert_array_equal(honest.search(matrix[:5], 4)[1], brute_force(matrix, matrix[:5], 4)[1])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kind", "ivf2"),
        ("kind", None),
        ("rows", "300"),
        ("rows", -1),
        ("rows", 2.5),
        ("dim", True),
        ("dim", 0),
        ("params", "nprobe=3"),
        ("params", {"nprobe": "3"}),
        ("params", {"nprobe": 10**9}),
        ("params", {"ef_search": 16}),  # a parameter of another kind
        ("recall_at_10", 2),
        ("recall_at_10", "0.9"),
        ("source_sha256", 12),
        ("source", ["a"]),
        ("build_seconds", "fast"),
        ("format", "something-else"),
    ],
)
def test_every_field_of_the_record_is_checked(tmp_path: Path, field: str, value: object):
    feats, _ = small_set(tmp_path, rows=2000)
    path = FeatureIndex.build(feats, kind="ivf", recall=0.5).save(tmp_path / "small.index")
    record_file = tmp_path / "small.index.json"
    record = json.loads(record_file.read_text())
    assert record["kind"] == "ivf"
    record[field] = value
    record_file.write_text(json.dumps(record))
    from mec_hub.errors import MalformedFileError

    with pytest.raises(MalformedFileError) as caught:
        FeatureIndex.load(path, features=feats)
    message = str(caught.value)
    assert str(record_file) in message and field in message and "\n" not in message
    # The CLI says it in one line, exit 1.
    write_feature_file(feats, np.load(feats))
    result = CliRunner().invoke(main, ["search", str(feats), "--index", str(path), "--row", "0"])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and result.output.startswith("Error: ")
    assert "Traceback" not in result.output


def test_row_numbers_an_ivf_index_cannot_answer_are_refused_at_load(tmp_path: Path):
    import faiss

    feats, _ = small_set(tmp_path, rows=2000)
    built = FeatureIndex.build(feats, kind="ivf", recall=0.5)
    ivf = faiss.extract_index_ivf(built.index)
    number = next(n for n in range(ivf.nlist) if ivf.invlists.list_size(n))
    ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(number), ivf.invlists.list_size(number))
    ids[0] = 123_456  # a row the set does not have (save records the altered file's digest)
    path = built.save(tmp_path / "small.index")
    with pytest.raises(MecHubError, match=rf"small\.index: list {number} holds row numbers outside 0 to 1999"):
        FeatureIndex.load(path, features=feats)
    with pytest.raises(MecHubError, match=r"row numbers outside 0 to 1999"):  # loaded without the set, too
        FeatureIndex.load(path)


def test_an_hnsw_graph_linking_outside_itself_is_refused_at_load(tmp_path: Path):
    import faiss

    feats, _ = small_set(tmp_path, rows=500)
    built = FeatureIndex.build(feats, kind="hnsw", recall=0.5)
    graph = built.index.hnsw
    links = faiss.rev_swig_ptr(graph.neighbors.data(), graph.neighbors.size())
    links[3] = 10**6  # FAISS would read the vector of node 1e6 while searching: out of bounds
    path = built.save(tmp_path / "g.index")
    # FAISS 1.15 checks this one itself while reading (validate_HNSW); load checks it too, for other versions.
    with pytest.raises(MecHubError, match=r"g\.index: .*(out of range|links to nodes outside 0 to 499)"):
        FeatureIndex.load(path)


def test_default_index_path_names_the_set(tmp_path: Path):
    from mec_hub.apps.index import default_index_path

    assert default_index_path(tmp_path / "feats.npy") == tmp_path / "feats.index"
    assert default_index_path(tmp_path / "feats.parquet") == tmp_path / "feats.index"
    assert default_index_path(tmp_path / "feats-00001-of-00003.parquet") == tmp_path / "feats.index"
    assert default_index_path("feats.bin") == Path("feats.bin.index")
    # A shard written as X-NNNNN.parquet names its set's index once it is one of the set's files.
    (tmp_path / "photos-00000.parquet").write_bytes(b"")
    assert default_index_path(tmp_path / "photos-00000.parquet") == tmp_path / "photos.index"


def test_search_says_once_on_stderr_that_it_is_exact_and_refuses_a_stale_index_in_one_line(tmp_path: Path):
    matrix = clustered(500)
    feats = write_feature_file(tmp_path / "f.npy", matrix)
    result = CliRunner().invoke(main, ["search", str(feats), "--row", "3", "-k", "4", "--json"])
    assert result.exit_code == 0, result.output
    assert result.stderr.count("\n") == 1 and f"no index {tmp_path / 'f.index'}" in result.stderr
    assert "exact search" in result.stderr
    assert [h["row"] for h in json.loads(result.stdout)[0]["neighbours"]] == brute_force(matrix, matrix[[3]], 4)[1][
        0
    ].tolist()
    assert CliRunner().invoke(main, ["index", str(feats)]).exit_code == 0
    result = CliRunner().invoke(main, ["search", str(feats), "--row", "3", "-k", "4", "--json"])
    assert result.exit_code == 0 and result.stderr == ""
    matrix[10] *= 2.0
    np.save(feats, matrix)
    result = CliRunner().invoke(main, ["search", str(feats), "--row", "3"])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert f"{tmp_path / 'f.index'} is stale" in result.output and "rebuild it" in result.output


def test_cli_usage_errors_exit_2(tmp_path: Path, feats: Path):
    result = CliRunner().invoke(main, ["search", str(feats)])
    assert result.exit_code == 2 and "give at least one QUERY image or --row I" in result.output
    shard = tmp_path / "set-00000.parquet"
    shard.write_bytes(b"not read")
    result = CliRunner().invoke(main, ["index", str(shard)])
    assert result.exit_code == 2 and "is one shard of set.parquet: index the whole set" in result.output
    result = CliRunner().invoke(main, ["index", str(feats), "--kind", "pq"])
    assert result.exit_code == 2


# --------------------------------------------------------------------------- NaN and infinity


def test_rows_holding_nan_or_infinity_are_refused_by_build_and_search(tmp_path: Path):
    from mec_hub.apps.search import NonFiniteRowsError, cosine_top_k, refuse_non_finite

    matrix = clustered(3000)
    bad = [5, 17, 18, 400, 1999, 2000, 2998]
    matrix[5, 0] = np.nan
    matrix[17, 3] = np.inf
    matrix[18] = -np.inf
    for row in bad[3:]:
        matrix[row, row % 32] = np.nan
    feats = write_feature_file(tmp_path / "bad.npy", matrix)
    expected = r"bad\.npy: rows 5, 17, 18, 400, 1999 and 2 more hold NaN or infinite values \(7 rows in all\)"
    with pytest.raises(NonFiniteRowsError, match=expected):
        FeatureIndex.build(feats, kind="flat")
    mapped = np.load(feats, mmap_mode="r")
    with pytest.raises(NonFiniteRowsError, match=r"rows 5, 17, 18, 400, 1999 and 2 more .*\(7 rows in all\)"):
        refuse_non_finite(mapped, "bad.npy", block_rows=64)  # found across blocks, numbered in the whole
    with pytest.raises(NonFiniteRowsError, match=expected):
        cosine_top_k(mapped, matrix[:1] * 0 + 1, 3, chunk_rows=128, origin=str(feats))
    result = CliRunner().invoke(main, ["index", str(feats)])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "7 rows in all" in result.output
    result = CliRunner().invoke(main, ["search", str(feats), "--row", "0"])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "7 rows in all" in result.output
    result = CliRunner().invoke(main, ["search", str(feats), "--row", "17"])  # the query row itself
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "bad.npy: row 17 holds NaN or infinite values; cosine similarity is undefined" in result.output
    # The query vectors too, through an index and exactly.
    good = clustered(500)
    index = FeatureIndex.build(good, kind="flat")
    queries = good[:4].copy()
    queries[2, 1] = np.nan
    with pytest.raises(NonFiniteRowsError, match=r"the query vectors: query 2 holds NaN"):
        index.search(queries, 3)
    with pytest.raises(NonFiniteRowsError, match=r"the query vectors: query 2 holds NaN"):
        cosine_top_k(good, queries, 3)


def test_large_finite_values_are_not_zeroed_by_an_overflowing_norm():
    from mec_hub.apps.search import cosine_top_k

    matrix = np.random.default_rng(3).normal(size=(50, 8)).astype(np.float32)
    matrix[9] = matrix[4] * 1e30  # finite in float32; its squares are not
    scores, rows = cosine_top_k(matrix, matrix[[4]], 2)
    assert sorted(rows[0].tolist()) == [4, 9]
    np.testing.assert_allclose(scores[0], [1.0, 1.0], atol=1e-5)
    index = FeatureIndex.build(matrix, kind="flat")
    assert sorted(index.search(matrix[[4]], 2)[1][0].tolist()) == [4, 9]


# --------------------------------------------------------------------------- the recorded recall


def top_10(matrix: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """The exact cosine top 10 (unordered), 250 queries at a time: ``brute_force`` without the full sort."""
    m = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return np.concatenate([np.argpartition(-(q[i : i + 250] @ m.T), 9, axis=1)[:, :10] for i in range(0, len(q), 250)])


def test_the_recorded_recall_is_what_unseen_queries_get_on_hard_unclustered_data():
    """i.i.d. Gaussian rows: no clusters to make every estimate look right. The recall recorded at
    build time must agree with recall@10 measured here on fresh queries from the same distribution,
    within what the two sample sizes allow (4 standard errors)."""
    rng = np.random.default_rng(2026)
    matrix = rng.normal(size=(20_000, 32)).astype(np.float32)
    queries = rng.normal(size=(2000, 32)).astype(np.float32)
    index = FeatureIndex.build(matrix, kind="ivf", recall=0.8, seed=11)
    assert index.kind == "ivf"
    sampled = index.params.get("recall_queries", 1000)  # queries behind the recorded estimate
    truth = top_10(matrix, queries)
    found = index.search(queries, 10)[1]
    per_query = np.array([len(set(f.tolist()) & set(t.tolist())) / 10 for f, t in zip(found, truth, strict=True)])
    measured = float(per_query.mean())
    tolerance = 4 * per_query.std(ddof=1) * np.sqrt(1 / sampled + 1 / len(queries))
    assert abs(index.recall - measured) <= tolerance, (index.recall, measured, tolerance)
    # The test can tell: an estimate from the indexed rows as queries, each finding itself, is
    # farther off than the tolerance (the row itself is one of its ten neighbours, found for free).
    own = matrix[:1000]
    own_truth = top_10(matrix, own)
    self_estimate = recall(index.search(own, 10)[1], own_truth)
    assert abs(self_estimate - measured) > tolerance, (self_estimate, measured, tolerance)


def test_a_faiss_that_cannot_bound_its_reads_is_told_to_upgrade(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import faiss

    feats, _ = small_set(tmp_path, rows=50)
    path = FeatureIndex.build(feats, kind="flat").save(tmp_path / "small.index")
    monkeypatch.delattr(faiss, "set_deserialization_vector_byte_limit")
    with pytest.raises(MecHubError, match=r"cannot bound what it allocates .* pip install -U faiss-cpu"):
        FeatureIndex.load(path, features=feats)
