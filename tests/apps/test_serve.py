"""``mec-hub serve``: the JSON API over a feature file, its refusals, and what it never reads.

The feature file is made here by ``Embedder.embed_folder`` (what ``mec-embed`` runs) on the
shipped photos; answers are checked against a brute-force cosine search written with NumPy.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageOps

pytest.importorskip("starlette", reason="the serve extra (starlette) is not installed")
pytest.importorskip("httpx", reason="starlette's TestClient needs httpx")
from starlette.testclient import TestClient

from mec_hub.apps import serve
from mec_hub.cli.hub import main
from mec_hub.data.featurefile import FeatureFile

K = 5
ORIGIN = "http://127.0.0.1:8000"
UPLOAD = {"X-Requested-With": "mec-hub", "Content-Type": "application/octet-stream"}  # as the page sends it


def local_client(app) -> TestClient:
    """A client that talks to ``app`` as the page served on 127.0.0.1 does (TestClient's default Host,
    ``testserver``, is refused)."""
    return TestClient(app, base_url=ORIGIN, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def feats(photos_dir: Path, tiny_weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mec_hub.embedding.engine import Embedder

    root = tmp_path_factory.mktemp("serve")
    shutil.copytree(photos_dir, root / "photos")
    out = root / "feats.npy"
    Embedder(weights=tiny_weights_dir, device="cpu", num_workers=0).embed_folder(root / "photos", out, progress=False)
    return out


@pytest.fixture(scope="module")
def client(feats: Path):
    browser = serve.NeighbourBrowser(FeatureFile.open(feats), device="cpu")
    with local_client(serve.create_app(browser)) as c:
        yield c


def brute_force(matrix: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    m = matrix.astype(np.float64)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    q = query.astype(np.float64) / np.linalg.norm(query)
    scores = m @ q
    order = np.argsort(-scores, kind="stable")[:k]
    return scores[order], order


def test_rows_pages_through_the_paths_file(client: TestClient, feats: Path):
    paths = (feats.parent / "feats.paths.txt").read_text().splitlines()
    first = client.get("/api/rows", params={"offset": 0, "limit": 7}).json()
    rest = client.get("/api/rows", params={"offset": 7, "limit": 500}).json()
    assert first["total"] == rest["total"] == len(paths) == 18
    assert [r["path"] for r in first["rows"] + rest["rows"]] == paths
    assert [r["row"] for r in first["rows"] + rest["rows"]] == list(range(18))


@pytest.mark.parametrize("row", [0, 9, 17])
def test_neighbours_are_the_brute_force_cosine_top_k_row_itself_first(client: TestClient, feats: Path, row: int):
    matrix = np.load(feats)
    answer = client.get("/api/neighbours", params={"row": row, "k": K})
    assert answer.status_code == 200, answer.text
    hits = answer.json()["neighbours"]
    want_scores, want_rows = brute_force(matrix, matrix[row], K)
    assert len(hits) == K
    assert hits[0]["row"] == row
    assert [h["row"] for h in hits] == want_rows.tolist()
    np.testing.assert_allclose([h["score"] for h in hits], want_scores, atol=1e-5)
    assert [h["rank"] for h in hits] == list(range(1, K + 1))


def test_an_uploaded_photo_finds_its_own_row_first(client: TestClient, feats: Path, photos_dir: Path):
    paths = (feats.parent / "feats.paths.txt").read_text().splitlines()
    name = "skimage-chelsea.png"
    answer = client.post("/api/search", params={"k": 3}, headers=UPLOAD, content=(photos_dir / name).read_bytes())
    assert answer.status_code == 200, answer.text
    hits = answer.json()["neighbours"]
    assert len(hits) == 3
    assert hits[0]["row"] == paths.index(name)
    assert hits[0]["score"] > 0.9999


def test_thumbnail_is_the_rows_photo_scaled_down(client: TestClient, feats: Path, photos_dir: Path):
    paths = (feats.parent / "feats.paths.txt").read_text().splitlines()
    row = paths.index("skimage-astronaut.png")
    answer = client.get(f"/thumb/{row}")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(answer.content))
    original = ImageOps.exif_transpose(Image.open(photos_dir / "skimage-astronaut.png"))
    assert max(thumb.size) == serve.THUMB_SIZE
    assert abs(thumb.size[0] / thumb.size[1] - original.size[0] / original.size[1]) < 0.02
    small = np.asarray(original.convert("RGB").resize(thumb.size), dtype=np.float64)
    assert np.abs(np.asarray(thumb, dtype=np.float64) - small).mean() < 12


@pytest.mark.parametrize(
    ("params", "word"),
    [
        ({"row": 18, "k": 3}, "row"),
        ({"row": -1, "k": 3}, "row"),
        ({"row": "abc", "k": 3}, "row"),
        ({"row": "/etc/passwd", "k": 3}, "row"),
        ({"k": 3}, "row"),
        ({"row": 0, "k": 0}, "k"),
        ({"row": 0, "k": -2}, "k"),
        ({"row": 0, "k": "ten"}, "k"),
        ({"row": 0, "k": serve.MAX_K + 1}, "k"),
    ],
)
def test_bad_row_or_k_is_a_4xx_with_a_message(client: TestClient, params: dict, word: str):
    answer = client.get("/api/neighbours", params=params)
    assert 400 <= answer.status_code < 500
    assert word in answer.json()["error"]


def test_bad_paging_is_a_4xx(client: TestClient):
    for params in ({"offset": -1}, {"offset": 18}, {"limit": 0}, {"limit": "x"}, {"limit": serve.MAX_PAGE + 1}):
        answer = client.get("/api/rows", params=params)
        assert answer.status_code == 422, params
        assert "error" in answer.json()


def test_broken_uploads_are_4xx_with_a_message(client: TestClient, photos_dir: Path, monkeypatch):
    jpeg = (photos_dir / "skimage-rocket.jpg").read_bytes()
    for body, status in ((b"", 400), (b"not an image at all", 422), (jpeg[: len(jpeg) // 2], 422)):
        answer = client.post("/api/search", params={"k": 3}, headers=UPLOAD, content=body)
        assert answer.status_code == status, answer.text
        assert answer.json()["error"]
    answer = client.post("/api/search", params={"k": 0}, headers=UPLOAD, content=jpeg)
    assert answer.status_code == 422 and "k" in answer.json()["error"]
    monkeypatch.setattr(serve, "MAX_UPLOAD_BYTES", 1000)
    answer = client.post("/api/search", params={"k": 3}, headers=UPLOAD, content=jpeg)
    assert answer.status_code == 413 and "limit" in answer.json()["error"]

    def chunks():  # no Content-Length: the limit holds while reading the stream
        yield jpeg[:800]
        yield jpeg[800:1600]

    answer = client.post("/api/search", params={"k": 3}, headers=UPLOAD, content=chunks())
    assert answer.status_code == 413
    answer = client.get("/api/search")
    assert answer.status_code == 405


@pytest.fixture()
def hostile(feats: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A feature file whose paths file lists ``../`` and a symlink pointing out of its folder, beside normal rows."""
    folder = tmp_path / "photos"
    shutil.copytree(feats.parent / "photos", folder)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(secret)
    (folder / "link.png").symlink_to(secret)
    (folder / "sub").mkdir()
    (folder / "sub" / "dirlink").symlink_to(outside, target_is_directory=True)
    original = FeatureFile.open(feats)
    names = [
        *original.paths[:3],
        "../outside/secret.png",
        "link.png",
        "sub/dirlink/secret.png",
        "sub/../skimage-coins.png",
    ]
    matrix = np.asarray(original.matrix[: len(names)])
    meta = dataclasses.replace(
        original.meta, shape=matrix.shape, base_dir=str(folder), inputs=[str(folder)], run_id=None
    )
    out = tmp_path / "hostile.npy"
    FeatureFile.write(out, names, meta, matrix=matrix)
    return out, secret


def test_no_request_reads_a_file_outside_the_folder(hostile: tuple[Path, Path], opened_files: list[str]):
    out, secret = hostile
    browser = serve.NeighbourBrowser(FeatureFile.open(out), device="cpu")
    with local_client(serve.create_app(browser)) as client:
        assert client.get("/thumb/0").status_code == 200  # a listed photo inside the folder is served
        assert client.get("/thumb/6").status_code == 200  # sub/../x stays inside: served
        for row in (3, 4, 5):  # ../outside, a symlink to a file outside, a path through a symlinked folder
            answer = client.get(f"/thumb/{row}")
            assert answer.status_code == 404, (row, answer.text)
            assert answer.json() == {"error": serve.NO_IMAGE}
        for url in (
            f"/thumb/{secret}",
            "/thumb/../outside/secret.png",
            "/thumb/%2e%2e%2foutside%2fsecret.png",
            "/thumb//etc/passwd",
            "/thumb/-1",
            "/thumb/7",
            "/static/../serve.py",
            "/static/%2e%2e/serve.py",
            "/static/%2e%2e%2f%2e%2e%2fsearch.py",
            f"/static/{secret}",
            "/api/rows?offset=../../etc/passwd",
        ):
            answer = client.get(url)
            assert answer.status_code in (404, 422), (url, answer.status_code)
            assert answer.headers["content-type"].startswith("application/json") or url.startswith("/static/"), url
            assert b"def " not in answer.content and b"root:" not in answer.content, url
    real_secret = os.path.realpath(secret)
    touched = [p for p in opened_files if os.path.realpath(p) == real_secret or "outside" in p or "passwd" in p]
    assert touched == []
    assert any(p.endswith(".png") for p in opened_files)  # the hook did see the photos that were read


def test_without_the_serve_extra_the_message_says_how_to_install_it(feats: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "starlette.applications", None)
    browser = serve.NeighbourBrowser(FeatureFile.open(feats))
    with pytest.raises(serve.MecHubError, match=r"pip install 'mec-hub\[serve\]'"):
        serve.create_app(browser)
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    result = CliRunner().invoke(main, ["serve", str(feats), "--port", "1"])
    assert result.exit_code == 1
    assert "pip install 'mec-hub[serve]'" in result.output and "Traceback" not in result.output


def test_serve_help_imports_neither_torch_nor_the_web_framework():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from mec_hub.cli.hub import main\n"
        "r = CliRunner().invoke(main, ['serve', '--help'])\n"
        "assert r.exit_code == 0 and '--port' in r.output, r.output\n"
        "print(sorted(m for m in ('torch', 'starlette', 'uvicorn') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_missing_feature_file_is_one_line(tmp_path: Path):
    result = CliRunner().invoke(main, ["serve", str(tmp_path / "none.npy")])
    assert result.exit_code == 1
    assert "none.npy" in result.output and "Traceback" not in result.output


def test_an_index_beside_the_file_answers_and_a_stale_one_is_refused(feats: Path, tmp_path: Path):
    index_module = pytest.importorskip("mec_hub.apps.index", reason="no mec_hub.apps.index")
    pytest.importorskip("faiss", reason="the index extra (faiss-cpu) is not installed")
    folder = tmp_path / "copy"
    folder.mkdir()
    for suffix in (".npy", ".paths.txt", ".meta.json"):
        shutil.copy(feats.with_name("feats" + suffix), folder / ("feats" + suffix))
    copy = folder / "feats.npy"
    index_module.FeatureIndex.build(copy, kind="hnsw").save(folder / "feats.index")
    opened = FeatureFile.open(copy)
    index = serve.load_index(opened, None)  # FEATS.index beside FEATS.npy is picked up
    assert index is not None
    browser = serve.NeighbourBrowser(opened, index=index, device="cpu")
    matrix = np.load(copy)
    with local_client(serve.create_app(browser)) as client:
        assert client.get("/api/info").json()["search"] == "index"
        for row in (2, 13):
            hits = client.get("/api/neighbours", params={"row": row, "k": K}).json()["neighbours"]
            want_scores, want_rows = brute_force(matrix, matrix[row], K)
            assert [h["row"] for h in hits] == want_rows.tolist()
            np.testing.assert_allclose([h["score"] for h in hits], want_scores, atol=1e-5)
    # An index of another file given with --index: one line, nothing served.
    other = tmp_path / "other.npy"
    np.save(other, matrix[::-1].copy())
    index_module.FeatureIndex.build(other, kind="flat").save(tmp_path / "other.index")
    result = CliRunner().invoke(main, ["serve", str(copy), "--index", str(tmp_path / "other.index"), "--port", "1"])
    assert result.exit_code == 1, result.output
    assert "other.index" in result.output and "Traceback" not in result.output


def test_the_command_serves_on_127_0_0_1(feats: Path, tmp_path: Path):
    import json
    import socket
    import time
    import urllib.error
    import urllib.request

    with socket.socket() as probe:  # a free port (released just before the server binds it)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mec_hub.cli.hub", "serve", str(feats), "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline, answer = time.monotonic() + 30, None
        while answer is None and time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/rows?limit=2", timeout=5) as response:
                    answer = json.load(response)
            except OSError:
                time.sleep(0.1)
        assert answer is not None, (tmp_path / "serve.log").read_text()
        assert answer["total"] == 18 and len(answer["rows"]) == 2
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            assert b"/static/app.js" in response.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/static/app.js", timeout=5) as response:
            assert b"/api/neighbours" in response.read()
        # The command passes its address to the Host check: another name is refused (DNS rebinding).
        rebound = urllib.request.Request(f"http://127.0.0.1:{port}/api/rows", headers={"Host": f"evil.example:{port}"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(rebound, timeout=5)
        assert refused.value.code == 400 and "evil.example" in json.load(refused.value)["error"]
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
    assert f"127.0.0.1:{port}" in (tmp_path / "serve.log").read_text()


def test_an_upload_is_refused_when_the_weights_are_not_those_that_made_the_file(
    feats: Path, tmp_path: Path, photos_dir: Path
):
    original = FeatureFile.open(feats)
    out = tmp_path / "wrong.npy"
    meta = dataclasses.replace(original.meta, weights_sha256="0" * 64, run_id=None)
    FeatureFile.write(out, original.paths, meta, matrix=np.asarray(original.matrix))
    browser = serve.NeighbourBrowser(FeatureFile.open(out), device="cpu")
    with local_client(serve.create_app(browser)) as client:
        photo = (photos_dir / "skimage-coins.png").read_bytes()
        answer = client.post("/api/search", params={"k": 3}, headers=UPLOAD, content=photo)
        assert answer.status_code == 409, answer.text
        assert "SHA-256" in answer.json()["error"] and "000000000000" in answer.json()["error"]
        assert client.get("/api/neighbours", params={"row": 0, "k": 3}).status_code == 200  # rows still answer


def test_thumbnails_are_cached_and_the_cache_is_bounded(feats: Path, tmp_path: Path):
    folder = tmp_path / "photos"
    shutil.copytree(feats.parent / "photos", folder)
    original = FeatureFile.open(feats)
    out = tmp_path / "copy.npy"
    meta = dataclasses.replace(original.meta, base_dir=str(folder), inputs=[str(folder)], run_id=None)
    FeatureFile.write(out, original.paths, meta, matrix=np.asarray(original.matrix))
    browser = serve.NeighbourBrowser(FeatureFile.open(out), device="cpu", cache_entries=3)
    with local_client(serve.create_app(browser)) as client:
        first = {row: client.get(f"/thumb/{row}").content for row in range(5)}
        for row in range(5):
            (folder / original.paths[row]).unlink()
        # The three most recent stay in memory; the two before were dropped, so their files are needed.
        assert [client.get(f"/thumb/{row}").status_code for row in range(5)] == [404, 404, 200, 200, 200]
        assert [client.get(f"/thumb/{row}").content for row in (2, 3, 4)] == [first[2], first[3], first[4]]


def test_an_unexpected_failure_is_a_json_500_without_a_traceback(feats: Path, monkeypatch):
    browser = serve.NeighbourBrowser(FeatureFile.open(feats), device="cpu")

    def broken(*args, **kwargs):
        raise RuntimeError("secret internals /home/user")

    monkeypatch.setattr(browser, "rows", broken)
    with local_client(serve.create_app(browser)) as client:
        answer = client.get("/api/rows")
    assert answer.status_code == 500
    assert answer.json() == {"error": "internal error (RuntimeError)"}
