"""``mec-hub search``: exact cosine search of a feature file, its weights check and its picture."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mec_hub.apps.search import cosine_top_k
from mec_hub.cli.hub import main


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def parse_results(output: str) -> dict[str, list[tuple[int, float, str]]]:
    results: dict[str, list[tuple[int, float, str]]] = {}
    current = None
    for line in output.splitlines():
        if line.startswith("query "):
            current = line[len("query "):]
            results[current] = []
        elif current is not None and line.startswith("  "):
            rank, score, path = line.split(maxsplit=2)
            results[current].append((int(rank), float(score), path))
    return results


def test_an_image_is_its_own_nearest_neighbour(indexed: Path, tmp_path: Path):
    images = indexed / "images"
    queries = [images / "cat" / "0001.png", images / "truck" / "0002.png"]
    grid = tmp_path / "grid.png"
    result = run("search", indexed / "FEATS.npy", *queries, "--top-k", 3, "--grid", grid, "--tile", 64)
    assert result.exit_code == 0, result.output

    found = parse_results(result.stdout)
    assert list(found) == [str(q) for q in queries]
    for query, hits in zip(queries, found.values(), strict=True):
        assert [rank for rank, _, _ in hits] == [1, 2, 3]
        assert Path(hits[0][2]).resolve() == query.resolve()
        assert hits[0][1] == pytest.approx(1.0, abs=2e-3)  # float16 rows
        assert hits[0][1] >= hits[1][1] >= hits[2][1]

    with Image.open(grid) as picture:
        assert picture.format == "PNG"
        # 2 rows of 1 + 3 tiles of 64 px, 8 px margins, 16 px captions
        assert picture.size == (8 + 4 * (64 + 8), 8 + 2 * (64 + 16 + 8))


def test_missing_neighbour_image_gets_a_grey_tile(indexed: Path, tmp_path: Path):
    # A query equal to an indexed image whose file has since gone: its row still matches best.
    copy = tmp_path / "copy"
    shutil.copytree(indexed, copy)
    query = tmp_path / "query.png"
    shutil.move(copy / "images" / "ship" / "0000.png", query)
    meta = json.loads((copy / "FEATS.meta.json").read_text())
    meta["inputs"] = [str(copy / "images")]
    (copy / "FEATS.meta.json").write_text(json.dumps(meta))

    grid = tmp_path / "grid.png"
    result = run("search", copy / "FEATS.npy", query, "-k", 2, "--grid", grid, "--json")
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)[0]["neighbours"]
    assert hits[0]["path"] == "ship/0000.png" and hits[0]["resolved"] is None
    assert hits[1]["resolved"] is not None and Path(hits[1]["resolved"]).is_file()

    with Image.open(grid) as picture:
        assert picture.size == (8 + 3 * (128 + 8), 8 + (128 + 16 + 8))
        left = 8 + (128 + 8)  # the first neighbour's tile
        assert picture.getpixel((left + 3, 8 + 3)) == (160, 160, 160)


def test_cosine_top_k_matches_brute_force(tmp_path: Path):
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(23, 6)).astype(np.float32)
    matrix[7] = matrix[3] * 2.0  # same direction: an exact tie with row 3
    matrix[11] = 0.0  # an empty row scores 0, it does not break the search
    np.save(tmp_path / "m.npy", matrix)
    mapped = np.load(tmp_path / "m.npy", mmap_mode="r")
    queries = np.vstack([matrix[3], rng.normal(size=(3, 6))]).astype(np.float32)

    scores, rows = cosine_top_k(mapped, queries, 5, chunk_rows=4)

    unit = matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
    for q, query in enumerate(queries):
        sims = unit @ (query / np.linalg.norm(query))
        expected = sorted(range(len(matrix)), key=lambda r: (-round(float(sims[r]), 5), r))[:5]
        assert rows[q].tolist() == expected
        np.testing.assert_allclose(scores[q], sims[expected], atol=1e-5)
    assert rows[0, :2].tolist() == [3, 7]

    _, all_rows = cosine_top_k(mapped, queries[:1], 100, chunk_rows=5)
    assert all_rows.shape == (1, 23) and sorted(all_rows[0].tolist()) == list(range(23))


def test_search_refuses_other_weights(indexed: Path, tmp_path: Path):
    copy = tmp_path / "copy"
    shutil.copytree(indexed, copy)
    meta = json.loads((copy / "FEATS.meta.json").read_text())
    meta["weights_sha256"] = "0" * 64
    (copy / "FEATS.meta.json").write_text(json.dumps(meta))
    result = run("search", copy / "FEATS.npy", indexed / "images" / "cat" / "0000.png")
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert "000000000000" in result.output and "--weights" in result.output


def test_search_errors(indexed: Path, tmp_path: Path):
    query = indexed / "images" / "cat" / "0000.png"
    missing = run("search", tmp_path / "nope.npy", query)
    assert missing.exit_code == 1 and "feature file not found" in missing.output

    copy = tmp_path / "copy"
    shutil.copytree(indexed, copy)
    no_query = run("search", copy / "FEATS.npy", tmp_path / "absent.png")
    assert no_query.exit_code == 1 and "query image not found" in no_query.output

    (copy / "FEATS.paths.txt").write_text("cat/0000.png\n")
    short = run("search", copy / "FEATS.npy", query)
    assert short.exit_code == 1 and "has 1 paths but" in short.output and "9 rows" in short.output

    (copy / "FEATS.paths.txt").write_text((indexed / "FEATS.paths.txt").read_text())
    (copy / "FEATS.meta.json").unlink()
    no_meta = run("search", copy / "FEATS.npy", query)
    assert no_meta.exit_code == 1 and "FEATS.meta.json" in no_meta.output


def test_search_reads_what_mec_embed_writes(indexed: Path, tiny_weights_dir: Path, tmp_path: Path):
    """The same check on a feature file written by mec-embed itself (float16, L2-normalised)."""
    from mec_hub.cli.embed import main as mec_embed

    embedded = CliRunner().invoke(mec_embed, [
        str(indexed / "images"), "--out", str(tmp_path / "FEATS.npy"), "--weights", str(tiny_weights_dir),
        "--device", "cpu", "--num-workers", "0", "--normalize", "--out-dtype", "float16", "--quiet",
    ])
    assert embedded.exit_code == 0, embedded.output
    query = indexed / "images" / "ship" / "0001.png"
    result = run("search", tmp_path / "FEATS.npy", query, "--top-k", 2, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)[0]["neighbours"]
    assert hits[0]["path"] == "ship/0001.png" and Path(hits[0]["resolved"]).resolve() == query.resolve()
    assert hits[0]["score"] == pytest.approx(1.0, abs=2e-3) and hits[1]["score"] < hits[0]["score"]

    # The same file is valid kNN input, labelled by its folders: with k=1 each image finds itself.
    knn = run("eval", "knn", "--train-features", tmp_path / "FEATS.npy", "--val-features", tmp_path / "FEATS.npy",
              "--top-k", 1, "--device", "cpu", "--out", tmp_path / "knn.json")
    assert knn.exit_code == 0, knn.output
    report = json.loads((tmp_path / "knn.json").read_text())
    assert report["results"]["top1"] == 100.0 and report["data"]["classes"] == ["cat", "ship", "truck"]
    assert report["model"]["weights_sha256"] == json.loads((tmp_path / "FEATS.meta.json").read_text())["weights_sha256"]
