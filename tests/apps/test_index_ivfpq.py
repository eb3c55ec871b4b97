"""The compressed index, ``FeatureIndex.build(kind="ivfpq")`` and ``mec-hub index --kind ivfpq``.

Checked against an exact cosine search written here in NumPy (float64), independent of the package:
recall@10 on fresh queries, scores equal to the exact cosines of the rows returned (the re-ranking is
real, not the codes' estimate), the file a fraction of the rows' bytes, the feature set required and
checked, and a stranger's file refused before FAISS reads it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mec_hub.apps.index import FeatureIndex, StaleIndexError, compress_above_rows, pq_shape
from mec_hub.cli.hub import main
from mec_hub.errors import MecHubError
from tests.support.faiss_files import ivf_fields

DIM = 64
ROWS = 20_000


def clustered(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """``n`` points around 64 centres that are the same whatever ``seed`` (which draws the points)."""
    centres = np.random.default_rng(12345).normal(size=(64, dim))
    rng = np.random.default_rng(seed)
    return (centres[rng.integers(64, size=n)] + 0.6 * rng.normal(size=(n, dim))).astype(np.float32)


def exact(matrix: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, rows)`` of the exact cosine top ``k``, in float64."""
    m = matrix / np.linalg.norm(matrix.astype(np.float64), axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries.astype(np.float64), axis=1, keepdims=True)
    similarity = q @ m.T
    rows = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(similarity, rows, axis=1), rows


def cosines(matrix: np.ndarray, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
    m = matrix / np.linalg.norm(matrix.astype(np.float64), axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries.astype(np.float64), axis=1, keepdims=True)
    return np.einsum("qd,qkd->qk", q, m[rows])


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = [len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits)) / truth.shape[1]


def feature_file(path: Path, matrix: np.ndarray) -> Path:
    """``path`` (``.npy``) and its ``.paths.txt``, as ``mec-hub search`` reads a set."""
    np.save(path, matrix)
    path.with_name(path.stem + ".paths.txt").write_text("".join(f"img{i:05d}.png\n" for i in range(len(matrix))))
    return path


@pytest.fixture(scope="module")
def feats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return feature_file(tmp_path_factory.mktemp("ivfpq") / "feats.npy", clustered(ROWS))


@pytest.fixture(scope="module")
def built(feats: Path) -> FeatureIndex:
    return FeatureIndex.build(feats, kind="ivfpq", recall=0.9)


def test_recall_on_fresh_queries_and_scores_are_exact_cosines(feats: Path, built: FeatureIndex):
    matrix = np.load(feats)
    assert built.kind == "ivfpq" and built.params["m"] == DIM // 4 and built.params["nbits"] == 8
    queries = clustered(500, seed=1)  # the same clusters, not rows of the file
    _, truth = exact(matrix, queries, 10)
    scores, rows = built.search(queries, 10)
    assert rows.shape == (500, 10) and rows.dtype == np.int64 and np.all(rows >= 0)
    # The setting is the cheapest to reach 0.9 on 1,000 rows of the file, so unseen queries get 0.9 up
    # to the sampling noise of 1,000 and 500 queries (about 0.01 each); so does the held-out recall recorded.
    found = recall(rows, truth)
    assert found >= 0.9 - 0.015 and built.recall >= 0.9 - 0.015 and abs(found - built.recall) <= 0.03
    # Re-ranked from the file: the scores are the exact cosines of the rows returned, best first ...
    np.testing.assert_allclose(scores, cosines(matrix, queries, rows), rtol=0, atol=1e-6)
    assert np.all(np.diff(scores, axis=1) <= 0)
    # ... which the codes alone do not give: FAISS's own scores for the same queries are estimates.
    estimates, proposed = built.index.search(queries / np.linalg.norm(queries, axis=1, keepdims=True), 10)
    assert np.abs(estimates - cosines(matrix, queries, proposed)).max() > 1e-3


def test_the_index_is_under_an_eighth_of_the_rows(feats: Path, built: FeatureIndex, tmp_path: Path):
    import faiss

    flat_bytes = ROWS * DIM * 4
    ivf = faiss.extract_index_ivf(built.index)
    stored = sum(ivf.invlists.list_size(n) for n in range(ivf.nlist))
    assert stored == ROWS and ivf.code_size == DIM // 4
    # What grows with the rows, a code and a row number each, is under an eighth of the float32 rows ...
    assert stored * (ivf.code_size + 8) <= flat_bytes / 8
    assert "24 bytes a row in memory (256 as float32)" in built.describe()
    # ... and the whole file too once the centroids, which grow as sqrt(rows) (the coarse quantizer's
    # 4 sqrt(N) lists) or not at all (the PQ's 256 per part), are set aside: at 20,000 rows they are a
    # third of it; at 1,000,000 x 128 the whole file is 1/12 of the rows (benchmarks/ivfpq_speed.py).
    centroids = (ivf.nlist + 256) * DIM * 4
    assert built.save(tmp_path / "feats.index").stat().st_size - centroids <= flat_bytes / 8


def test_save_and_load_need_the_feature_set_and_check_it(feats: Path, built: FeatureIndex, tmp_path: Path):
    path = built.save(tmp_path / "feats.index")
    record = json.loads((tmp_path / "feats.index.json").read_text())
    assert record["kind"] == "ivfpq" and {"nprobe", "k_factor", "m", "nbits", "nlist"} <= set(record["params"])
    queries = clustered(50, seed=2)
    want = built.search(queries, 10)
    for loaded in (FeatureIndex.load(path, features=feats), FeatureIndex.load(path)):  # the recorded source
        got = loaded.search(queries, 10)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
    # One value changed: refused, in one line that says how to rebuild.
    changed = np.load(feats)
    changed[123, 0] += 1.0
    np.save(tmp_path / "changed.npy", changed)
    with pytest.raises(StaleIndexError, match=r"rebuild it: mec-hub index .*changed\.npy") as caught:
        FeatureIndex.load(path, features=tmp_path / "changed.npy")
    assert "\n" not in str(caught.value)
    # A feature set that is not there, named or recorded: one line each.
    with pytest.raises(MecHubError, match=r"feature file not found: .*gone\.npy") as caught:
        FeatureIndex.load(path, features=tmp_path / "gone.npy")
    assert "\n" not in str(caught.value)
    record["source"] = str(tmp_path / "moved" / "elsewhere.npy")
    (tmp_path / "feats.index.json").write_text(json.dumps(record))
    with pytest.raises(MecHubError, match=r"feats\.index re-ranks from the feature set .* pass it") as caught:
        FeatureIndex.load(path)
    assert "\n" not in str(caught.value)


def test_auto_compresses_above_the_threshold(tmp_path: Path):
    assert compress_above_rows(128) == 4_194_304 and compress_above_rows(2048) == 262_144  # 2 GiB of float32
    assert pq_shape(128) == (32, 8) and pq_shape(2048) == (512, 8) and pq_shape(100) == (25, 8)
    matrix = clustered(1500, seed=4)
    kinds = {
        above: FeatureIndex.build(matrix, kind="auto", exact_below=1000, compress_above=above, sample_queries=100).kind
        for above in (1499, 1500)
    }
    assert kinds == {1499: "ivfpq", 1500: "ivf"}
    assert FeatureIndex.build(matrix, kind="auto", exact_below=1501, compress_above=0).kind == "flat"


def test_cli_index_then_search_and_serve(tmp_path: Path):
    pytest.importorskip("faiss")
    from mec_hub.apps.serve import NeighbourBrowser, load_index
    from mec_hub.data.featurefile import FeatureFile

    matrix = clustered(2000, seed=5)
    feats = feature_file(tmp_path / "photos.npy", matrix)
    result = CliRunner().invoke(main, ["index", str(feats), "--kind", "ivfpq", "--recall", "0.9"])
    assert result.exit_code == 0, result.output
    assert "ivfpq index of 2000 x 64" in result.output and "re-ranked exactly from" in result.output
    assert json.loads((tmp_path / "photos.index.json").read_text())["kind"] == "ivfpq"
    queried = [7, 1234, 1999]
    result = CliRunner().invoke(
        main, ["search", str(feats), *[x for r in queried for x in ("--row", str(r))], "-k", "10", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert "exact search" not in result.stderr  # it went through photos.index
    out = json.loads(result.stdout)
    rows = np.array([[h["row"] for h in hits["neighbours"]] for hits in out])
    scores = np.array([[h["score"] for h in hits["neighbours"]] for hits in out])
    np.testing.assert_allclose(scores, cosines(matrix, matrix[queried], rows), atol=1e-6)
    assert recall(rows, exact(matrix, matrix[queried], 10)[1]) >= 0.8
    # mec-hub serve loads the index beside the set the same way, and answers from it.
    features = FeatureFile.open(feats)
    browser = NeighbourBrowser(features, index=load_index(features, None, say=lambda _: None))
    assert browser.index.kind == "ivfpq"
    answer = browser.neighbours(1234, 5)["neighbours"]
    assert [h["row"] for h in answer] == rows[1, :5].tolist()  # the first 5 of 10: re-ranked as deep for k <= 10


def test_a_parquet_set_is_re_ranked_from_its_rows(tmp_path: Path):
    pytest.importorskip("pyarrow")
    from mec_hub.data.featurefile import FeatureFile, write_parquet

    matrix = clustered(1500, seed=6)
    write_parquet(FeatureFile.open(feature_file(tmp_path / "src.npy", matrix)), tmp_path / "p.parquet")
    built = FeatureIndex.build(tmp_path / "p.parquet", kind="ivfpq", recall=0.8, sample_queries=100)
    loaded = FeatureIndex.load(built.save(tmp_path / "p.index"), features=FeatureFile.open(tmp_path / "p.parquet"))
    queries = clustered(20, seed=7)
    scores, rows = loaded.search(queries, 10)
    np.testing.assert_allclose(scores, cosines(matrix, queries, rows), atol=1e-6)


def test_without_its_features_an_index_made_in_memory_still_searches_and_one_loaded_says_why(tmp_path: Path):
    matrix = clustered(1000, seed=8)
    index = FeatureIndex.build(matrix, kind="ivfpq", recall=0.8, sample_queries=100)
    assert index.search(matrix[:2], 3)[1][:, 0].tolist() == [0, 1]
    path = index.save(tmp_path / "array.index")  # built from an array: no file to re-rank from once saved
    with pytest.raises(MecHubError, match=r"array\.index re-ranks from the feature set it was built from \(an array"):
        FeatureIndex.load(path)


def test_when_no_setting_reaches_the_recall_the_best_is_kept_and_said(monkeypatch: pytest.MonkeyPatch):
    """Exact search would hold every row, which this kind exists to avoid: it keeps its best and warns."""
    import mec_hub.apps.index as index_module

    monkeypatch.setattr(index_module, "_K_FACTORS", (1,))  # re-rank only k: the codes alone must find them
    matrix = np.random.default_rng(10).normal(size=(1000, DIM)).astype(np.float32)  # no clusters: hard
    with pytest.warns(UserWarning, match=r"no setting of the ivfpq index reaches recall@10 1.0 \(best 0\.\d+, kept\)"):
        index = FeatureIndex.build(matrix, kind="ivfpq", recall=1.0, sample_queries=100)
    assert index.kind == "ivfpq" and index.params["nprobe"] == index.params["nlist"]
    assert index.params["k_factor"] == 1 and index.params["best_recall"] < 1.0 and index.recall < 1.0
    scores, rows = index.search(matrix[:3], 5)
    np.testing.assert_allclose(scores, cosines(matrix, matrix[:3], rows), atol=1e-6)


# --------------------------------------------------------------------------- files from strangers


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, dict]:
    folder = tmp_path_factory.mktemp("hostile")
    feats = feature_file(folder / "s.npy", clustered(2000, seed=9))
    path = FeatureIndex.build(feats, kind="ivfpq", recall=0.5, sample_queries=100).save(folder / "s.index")
    return feats, path.read_bytes(), json.loads((folder / "s.index.json").read_text())


def publish(path: Path, data: bytes, record: dict) -> Path:
    import hashlib

    path.write_bytes(data)
    record = {**record, "index_sha256": hashlib.sha256(data).hexdigest()}
    (path.parent / (path.name + ".json")).write_text(json.dumps(record))
    return path


def test_the_layout_read_here_is_the_one_faiss_writes(small: tuple[Path, bytes, dict]):
    _, data, record = small
    at = {name: offset for name, (offset, _) in ivf_fields(data).items()}
    assert data[:4] == b"IwPQ" and data[at["quantizer"] : at["quantizer"] + 4] == b"IxFI"
    assert data[at["lists"] : at["lists"] + 4] == b"ilar" and data[at["list_type"] : at["list_type"] + 4] == b"full"
    assert struct.unpack_from("<QQQ", data, at["pq_d"]) == (DIM, record["params"]["m"], record["params"]["nbits"])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("nlist", 2**62, r"lists and nprobe"),
        ("centroid_floats", 2**40, r"coarse quantizer holds"),
        ("direct_map", 1, r"direct map"),
        ("code_size", 1 << 30, r"product quantizer of"),
        ("pq_m", 7, r"product quantizer of 7 x"),
        ("pq_nbits", 24, r"product quantizer of .* x 24 bits"),
        ("pq_floats", 2**50, r"its product quantizer holds"),
        ("list_count", 3, r"its lists are b'ilar' of 3 lists"),
        ("first_size", 2**40, r"its list sizes do not add up"),
        ("size_count", 2**40, r"its list sizes are b'full' of 1099511627776 numbers"),
    ],
)
def test_a_crafted_ivfpq_file_is_refused_before_faiss_reads_it(
    small: tuple[Path, bytes, dict], tmp_path: Path, memory_cap, field: str, value: int, message: str
):
    feats, data, record = small
    changed = bytearray(data)
    at, width = ivf_fields(data)[field]
    changed[at : at + width] = value.to_bytes(width, "little")
    path = publish(tmp_path / "x.index", bytes(changed), record)
    with memory_cap(256 * 2**20), pytest.raises(MecHubError, match=rf"x\.index: .*{message}") as caught:
        FeatureIndex.load(path, features=feats)
    assert "\n" not in str(caught.value)


def test_lists_kept_on_disk_elsewhere_are_refused_unopened(small: tuple[Path, bytes, dict], tmp_path: Path):
    """FAISS's on-disk lists (``ilod``) name a file FAISS would open: refused from the layout alone."""
    feats, data, record = small
    at = ivf_fields(data)["lists"][0]
    path = publish(tmp_path / "y.index", data[:at] + b"ilod" + data[at + 4 :], record)
    with pytest.raises(MecHubError, match=r"y\.index: its lists are b'ilod'"):
        FeatureIndex.load(path, features=feats)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"m": 7}, "m dividing dim 64"),
        ({"nbits": 9}, "nbits from 1 to 8"),
        ({"k_factor": 10**6}, "over 64"),
        ({"nprobe": None}, "params.nprobe"),
    ],
)
def test_the_record_states_a_sane_quantizer(
    small: tuple[Path, bytes, dict], tmp_path: Path, params: dict, message: str
):
    feats, data, record = small
    merged = {key: value for key, value in {**record["params"], **params}.items() if value is not None}
    path = publish(tmp_path / "z.index", data, {**record, "params": merged})
    with pytest.raises(MecHubError, match=message):
        FeatureIndex.load(path, features=feats)


def test_an_index_of_other_rows_is_refused_even_with_a_matching_digest(small: tuple[Path, bytes, dict], tmp_path: Path):
    """A record can state any digest: the codes are decoded and compared with the rows they claim."""
    feats, data, record = small
    matrix = np.load(feats)
    other = FeatureIndex.build(matrix[::-1].copy(), kind="ivfpq", recall=0.5, sample_queries=100)
    path = other.save(tmp_path / "other.index")
    forged = {**json.loads((tmp_path / "other.index.json").read_text()), **{
        key: record[key] for key in ("source", "source_sha256")}}
    (tmp_path / "other.index.json").write_text(json.dumps(forged))
    with pytest.raises(StaleIndexError, match=r"other\.index: its codes do not encode the rows .* rebuild it"):
        FeatureIndex.load(path, features=feats)
    honest = FeatureIndex.load(publish(tmp_path / "s.index", data, record), features=feats)
    scores, rows = honest.search(matrix[:5], 3)
    np.testing.assert_allclose(scores, cosines(matrix, matrix[:5], rows), atol=1e-6)
