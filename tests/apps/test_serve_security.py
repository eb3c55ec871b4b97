"""``mec-hub serve`` against a hostile browser, web page or feature set (issue 21).

A small feature set is made here with real files on disk (PNGs written by Pillow, a tar shard
written by ``tarfile``), its names made by ``collect_inputs`` exactly as ``mec-embed`` names them.
No model is needed: where an upload would be decoded, the decode function is replaced by a spy, so
each test sees whether a request got that far.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import struct
import tarfile
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("starlette", reason="the serve extra (starlette) is not installed")
pytest.importorskip("httpx", reason="starlette's TestClient needs httpx")
from starlette.testclient import TestClient

from mec_hub.apps import grid, serve
from mec_hub.cli.hub import main
from mec_hub.data import images
from mec_hub.data.featurefile import FeatureFile, FeatureMeta, write_parquet
from mec_hub.embedding.inputs import collect_inputs

PORT = 8000
HERE = f"http://127.0.0.1:{PORT}"
UPLOAD = {"X-Requested-With": "mec-hub", "Content-Type": "application/octet-stream"}
COLOURS = {"a.png": (200, 30, 30), "b.png": (30, 200, 30), "one.png": (30, 30, 200), "two.png": (220, 220, 20)}


def png_header(width: int, height: int, bit_depth: int, colour_type: int) -> bytes:
    """A PNG whose IHDR claims ``width x height`` (with a tiny, valid IDAT that is far too short):
    what a header-only check sees, in a few dozen bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture()
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """``root/photos/{a,b}.png``, ``root/shards/s.tar`` (``x/one.png``, ``two.png``, a text file) and,
    outside the set's folders, ``tmp/outside/secret.png``; the set ``root/feats.npy`` lists them as
    ``mec-embed photos shards/s.tar`` run in ``root`` names them, then some hostile rows."""
    root = tmp_path / "root"
    (root / "photos").mkdir(parents=True)
    (root / "shards").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (60, 40), COLOURS[name]).save(root / "photos" / name)
    with tarfile.open(root / "shards" / "s.tar", "w") as shard:
        for member, name in (("x/one.png", "one.png"), ("two.png", "two.png"), ("notes.txt", None)):
            data = io.BytesIO()
            if name is None:
                data.write(b"not an image")
            else:
                Image.new("RGB", (50, 50), COLOURS[name]).save(data, format="PNG")
            info = tarfile.TarInfo(member)
            info.size = data.tell()
            data.seek(0)
            shard.addfile(info, data)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.png"
    Image.new("RGB", (40, 30), (250, 0, 250)).save(secret)
    (root / "photos" / "link.png").symlink_to(secret)
    monkeypatch.chdir(root)
    collected = collect_inputs(["photos", "shards/s.tar"])
    names = [item.name for item in collected.items if "link" not in item.name]
    assert names == ["photos/a.png", "photos/b.png", "s.tar/x/one.png", "s.tar/two.png"]
    hostile = {
        "absolute": str(secret),  # exists, readable, outside
        "absolute_missing": str(outside / "nothing.png"),
        "climbs_out": "../outside/secret.png",
        "link_out": "photos/link.png",
        "missing": "photos/nothing.png",
        "missing_member": "s.tar/nothing.png",
    }
    names += list(hostile.values())
    matrix = np.random.default_rng(0).standard_normal((len(names), 8)).astype(np.float32)
    meta = FeatureMeta(shape=matrix.shape, base_dir=collected.base_dir, inputs=collected.sources)
    out = FeatureFile.write(root / "feats.npy", names, meta, matrix=matrix)
    monkeypatch.chdir(tmp_path)  # the server runs elsewhere: rows are found from the meta, not the current folder
    rows = {name: i for i, name in enumerate(names)} | {key: names.index(value) for key, value in hostile.items()}
    return {"feats": out, "secret": secret, "rows": rows, "root": root}


@pytest.fixture()
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Replaces the decoding of uploads with a spy that records the size of what it was given and
    fails as an undecodable image would (a 422)."""
    seen: list[int] = []

    def spy(data: bytes):
        seen.append(len(data))
        raise images.ImageDecodeError("spy: not decoded in this test")

    monkeypatch.setattr(images, "decode_image_bytes", spy)
    monkeypatch.setattr(serve, "decode_image_bytes", spy, raising=False)
    return seen


def app_of(feats: Path, **browser_options):
    return serve.create_app(
        serve.NeighbourBrowser(FeatureFile.open(feats), device="cpu", **browser_options),
        hosts=serve.allowed_hosts("127.0.0.1"),
        port=PORT,
    )


def client_of(app, base_url: str = HERE) -> TestClient:
    return TestClient(app, base_url=base_url, raise_server_exceptions=False)


# --------------------------------------------------------------------------- 1. Host, Origin, Sec-Fetch-Site


def test_a_foreign_host_is_refused_with_json_before_any_route(world: dict):
    browser = serve.NeighbourBrowser(FeatureFile.open(world["feats"]), device="cpu")
    app = serve.create_app(browser)  # the default: the localhost names only
    with client_of(app, "http://rebound.example:8000") as client:
        for url in ("/", "/api/rows", "/api/info", "/thumb/0", "/static/app.js"):
            answer = client.get(url)
            assert answer.status_code == 400, url
            assert answer.headers["content-type"].startswith("application/json"), url
            assert "rebound.example" in answer.json()["error"]
    for base in ("http://localhost:8000", "http://127.0.0.1:8000", "http://[::1]:8000", "http://LOCALHOST"):
        with client_of(app, base) as client:
            assert client.get("/api/rows").status_code == 200, base


def test_the_listening_address_and_allow_host_names_are_answered(world: dict):
    browser = serve.NeighbourBrowser(FeatureFile.open(world["feats"]), device="cpu")
    hosts = serve.allowed_hosts("0.0.0.0", ["photos.lan", "fd00::5"])
    assert "0.0.0.0" not in hosts and {"photos.lan", "[fd00::5]", "localhost"} <= set(hosts)
    app = serve.create_app(browser, hosts=hosts, port=PORT)
    for base, status in (("http://photos.lan:8000", 200), ("http://[fd00::5]:8000", 200), ("http://evil.lan", 400)):
        with client_of(app, base) as client:
            assert client.get("/api/rows").status_code == status, base


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 200),  # not a browser (curl, a script)
        ({"Sec-Fetch-Site": "same-origin"}, 200),
        ({"Sec-Fetch-Site": "none"}, 200),  # typed in the address bar
        ({"Origin": HERE}, 200),
        ({"Sec-Fetch-Site": "cross-site"}, 403),
        ({"Sec-Fetch-Site": "same-site"}, 403),
        ({"Origin": "http://evil.example"}, 403),
        ({"Origin": "http://127.0.0.1:9999"}, 403),  # another local server's page
        ({"Origin": "https://127.0.0.1:8000"}, 403),
        ({"Origin": "null"}, 403),  # a sandboxed frame, a file:// page
    ],
)
def test_api_requests_from_other_sites_are_refused(world: dict, headers: dict, status: int):
    with client_of(app_of(world["feats"])) as client:
        for url in ("/api/rows", "/api/neighbours?row=0&k=2", f"/thumb/{world['rows']['photos/a.png']}"):
            answer = client.get(url, headers=headers)
            assert answer.status_code == status, (url, answer.text)
            if status == 403:
                assert "refused" in answer.json()["error"]


def test_an_upload_is_taken_only_as_the_page_sends_it(world: dict, decodes: list[int]):
    body = png_header(40, 30, 8, 2)
    refused = [
        ({"Content-Type": "text/plain", "X-Requested-With": "mec-hub"}, 415),  # a form could send this type
        ({"Content-Type": "multipart/form-data; boundary=x", "X-Requested-With": "mec-hub"}, 415),
        ({"Content-Type": "application/octet-stream"}, 403),  # no custom header: no preflight was needed
        ({**UPLOAD, "Origin": "http://evil.example"}, 403),
        ({**UPLOAD, "Sec-Fetch-Site": "cross-site"}, 403),
    ]
    with client_of(app_of(world["feats"])) as client:
        for headers, status in refused:
            answer = client.post("/api/search", params={"k": 2}, headers=headers, content=body)
            assert answer.status_code == status, (headers, answer.text)
            assert answer.json()["error"]
        assert decodes == []  # none of them got as far as decoding
        for headers in (UPLOAD, {**UPLOAD, "Content-Type": "image/png", "Origin": HERE}):
            answer = client.post("/api/search", params={"k": 2}, headers=headers, content=body)
            assert answer.status_code == 422 and "spy" in answer.json()["error"], answer.text
    assert decodes == [len(body), len(body)]


def test_the_page_sends_uploads_the_way_the_server_takes_them():
    script = (Path(serve.__file__).with_name("static") / "app.js").read_text()
    assert '"X-Requested-With": "mec-hub"' in script
    assert '"Content-Type": "application/octet-stream"' in script


# --------------------------------------------------------------------------- 2. which files a row reads


def _colour(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(axis=0)


def test_rows_inside_the_set_and_in_its_tar_shard_get_thumbnails(world: dict):
    rows = world["rows"]
    with client_of(app_of(world["feats"])) as client:
        for name, size in (("photos/a.png", (60, 40)), ("s.tar/x/one.png", (50, 50)), ("s.tar/two.png", (50, 50))):
            answer = client.get(f"/thumb/{rows[name]}")
            assert answer.status_code == 200, (name, answer.text)
            assert Image.open(io.BytesIO(answer.content)).size == size
            np.testing.assert_allclose(_colour(answer.content), COLOURS[name.rsplit("/", 1)[-1]], atol=4)


def test_every_row_that_cannot_be_shown_gets_one_identical_answer(world: dict, opened_files: list[str]):
    rows = world["rows"]
    with client_of(app_of(world["feats"])) as client:
        answers = {
            key: client.get(f"/thumb/{rows[key]}")
            for key in ("absolute", "absolute_missing", "climbs_out", "link_out", "missing", "missing_member")
        }
    for key, answer in answers.items():
        assert (answer.status_code, answer.content) == (404, answers["missing"].content), key
    assert answers["missing"].json() == {"error": serve.NO_IMAGE}
    real_secret = os.path.realpath(world["secret"])
    assert [p for p in opened_files if os.path.realpath(p) == real_secret] == []


def test_a_base_folder_of_the_filesystem_root_lets_no_file_out(world: dict, tmp_path: Path, opened_files: list[str]):
    secret = world["secret"]
    folder = tmp_path / "set"
    folder.mkdir()
    names = [str(secret.relative_to(secret.anchor)), "../" * 40 + str(secret.relative_to(secret.anchor))]
    matrix = np.ones((2, 4), np.float32)
    meta = FeatureMeta(shape=matrix.shape, base_dir=secret.anchor, inputs=[secret.anchor])
    feats = FeatureFile.write(folder / "feats.npy", names, meta, matrix=matrix)
    assert FeatureFile.open(feats).resolve(0) == Path(secret.anchor) / names[0]  # the set does name the secret
    with client_of(app_of(feats)) as client:
        for row in (0, 1):
            answer = client.get(f"/thumb/{row}")
            assert answer.status_code == 404 and answer.json() == {"error": serve.NO_IMAGE}
    assert [p for p in opened_files if os.path.realpath(p) == os.path.realpath(secret)] == []


# --------------------------------------------------------------------------- 3. uploads that exhaust


@pytest.mark.parametrize(
    ("header", "refused"),
    [
        (png_header(9400, 9400, 16, 2), True),  # 16-bit RGB: 88 M pixels, 530 MB of samples
        (png_header(9400, 9400, 1, 0), True),  # 1-bit: still 88 M pixels once decoded
        (png_header(4000, 4000, 16, 0), True),  # 16-bit grey: 16 M pixels, counted 4 times
        (png_header(60000, 1000, 8, 2), True),  # 60 M pixels in a long strip
        (png_header(6000, 6000, 8, 2), False),  # 36 M 8-bit pixels: within the limit, decoded
        (png_header(3000, 3000, 16, 0), False),  # 9 M 16-bit pixels (36 M counted): decoded
    ],
    ids=["16bit-rgb-9400", "1bit-9400", "16bit-grey-4000", "strip", "8bit-6000", "16bit-grey-3000"],
)
def test_an_upload_claiming_too_many_pixels_is_refused_before_decoding(
    world: dict, decodes: list[int], header: bytes, refused: bool
):
    with client_of(app_of(world["feats"])) as client:
        answer = client.post("/api/search", params={"k": 2}, headers=UPLOAD, content=header)
    if refused:
        assert answer.status_code == 413, answer.text
        assert "pixel limit" in answer.json()["error"]
        assert decodes == []
    else:
        assert answer.status_code == 422 and decodes == [len(header)], answer.text


def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_read(world: dict, decodes: list[int]):
    read: list[int] = []

    def body():
        read.append(1)
        yield b"\x89PNG" + b"\0" * 100

    with client_of(app_of(world["feats"])) as client:
        answer = client.post(
            "/api/search",
            headers={**UPLOAD, "Content-Length": str(serve.MAX_UPLOAD_BYTES + 1)},
            content=body(),
        )
    assert answer.status_code == 413 and "limit" in answer.json()["error"]
    assert decodes == []


def test_uploads_beyond_the_concurrency_bound_are_a_503_with_retry_after(world: dict, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def slow(data: bytes):
        calls.append(len(data))
        entered.set()
        release.wait(10)
        raise images.ImageDecodeError("spy: released")

    monkeypatch.setattr(images, "decode_image_bytes", slow)
    monkeypatch.setattr(serve, "decode_image_bytes", slow, raising=False)
    body = png_header(40, 30, 8, 2)
    first: list = []
    with client_of(app_of(world["feats"], max_uploads=1)) as client:
        worker = threading.Thread(
            target=lambda: first.append(client.post("/api/search", headers=UPLOAD, content=body)), daemon=True
        )
        worker.start()
        try:
            assert entered.wait(10), "the first upload never reached decoding"
            busy = client.post("/api/search", headers=UPLOAD, content=body)
        finally:
            release.set()
            worker.join(15)
        assert busy.status_code == 503, busy.text
        assert int(busy.headers["Retry-After"]) > 0 and "busy" in busy.json()["error"]
        assert calls == [len(body)]  # the second was never decoded
        assert first[0].status_code == 422
        again = client.post("/api/search", headers=UPLOAD, content=body)  # the slot was given back
        assert again.status_code == 422 and calls == [len(body)] * 2


def test_a_body_that_does_not_arrive_in_time_is_a_408(world: dict, monkeypatch, decodes: list[int]):
    monkeypatch.setattr(serve, "UPLOAD_TIMEOUT_S", 0.3)
    app = app_of(world["feats"])
    sent: list[dict] = []
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/api/search", "raw_path": b"/api/search", "root_path": "", "query_string": b"k=2",
        "headers": [
            (b"host", b"127.0.0.1:8000"), (b"content-type", b"application/octet-stream"),
            (b"x-requested-with", b"mec-hub"),
        ],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", PORT),
    }  # fmt: skip
    chunks = [{"type": "http.request", "body": b"\x89PNG\r\n\x1a\n", "more_body": True}]

    async def receive() -> dict:
        if chunks:
            return chunks.pop()
        await asyncio.sleep(5)  # a client that sends nothing more
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    async def run() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(app(scope, receive, send), 20)
        return loop.time() - started

    elapsed = asyncio.run(run())
    assert sent[0]["status"] == 408, sent
    assert "did not arrive" in json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["error"]
    assert elapsed < 3 and decodes == []


# --------------------------------------------------------------------------- 4. errors are JSON


def test_every_error_is_json(world: dict):
    with client_of(app_of(world["feats"])) as client:
        for method, url, status in (
            ("DELETE", "/api/rows", 405),
            ("PUT", "/api/search", 405),
            ("GET", "/api/search", 405),
            ("POST", "/thumb/0", 405),
            ("GET", "/no/such/page", 404),
            ("GET", "/static/nothing.css", 404),
        ):
            answer = client.request(method, url)
            assert answer.status_code == status, (method, url)
            assert answer.headers["content-type"].startswith("application/json"), (method, url)
            assert answer.json()["error"], (method, url)
        assert "GET" in client.delete("/api/rows").headers["allow"]


# --------------------------------------------------------------------------- 5. the grid picture


def test_the_grid_decodes_through_the_one_decode_path(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # Pillow alone only warns between 1x and 2x this
    big, small = tmp_path / "big.png", tmp_path / "small.png"
    Image.new("RGB", (80, 60), (200, 0, 0)).save(big)  # 4,800 pixels: over the limit
    Image.new("RGB", (40, 30), (0, 0, 200)).save(small)  # 1,200 pixels: within
    tile, margin = 64, grid.MARGIN
    picture = grid.draw_grid([[grid.Cell(big, "big"), grid.Cell(small, "small")]], tile=tile, margin=margin)
    probe_y = margin + 12  # inside the fitted image (80x60 -> 64x48 from y=8), above the note drawn mid-tile
    assert picture.getpixel((margin + tile // 2, probe_y)) == grid.MISSING  # refused, as mec-embed refuses it
    assert picture.getpixel((2 * margin + tile + tile // 2, probe_y)) == (0, 0, 200)


# --------------------------------------------------------------------------- 6. the set's index


def test_the_index_mec_hub_index_writes_for_a_parquet_set_is_the_one_served(world: dict, tmp_path: Path, capsys):
    index_module = pytest.importorskip("mec_hub.apps.index", reason="no mec_hub.apps.index")
    pytest.importorskip("faiss", reason="the index extra (faiss-cpu) is not installed")
    pytest.importorskip("pyarrow", reason="no pyarrow")
    folder = tmp_path / "pq"
    folder.mkdir()
    parquet = folder / "feats.parquet"
    write_parquet(FeatureFile.open(world["feats"]), parquet)
    opened = FeatureFile.open(parquet)
    assert serve.load_index(opened, None) is None  # no index yet: exact search, said in one line
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and "exact search" in said[0] and "feats.index" in said[0]
    index_module.FeatureIndex.build(parquet, kind="flat").save(folder / "feats.index")  # the README's name
    assert serve.load_index(opened, None) is not None
    # A stale index under that name: the command stops with one line naming it, before serving.
    shutil.copy(folder / "feats.index", tmp_path / "kept.index")
    other = np.asarray(opened.matrix)[::-1].copy()
    index_module.FeatureIndex.build(other, kind="flat").save(folder / "feats.index")
    result = CliRunner().invoke(main, ["serve", str(parquet), "--port", "1"])
    assert result.exit_code == 1, result.output
    assert "feats.index" in result.output and "Traceback" not in result.output


def test_load_index_names_the_file_by_the_one_rule(world: dict, monkeypatch):
    index_module = pytest.importorskip("mec_hub.apps.index", reason="no mec_hub.apps.index")
    asked: list[Path] = []

    def spy(features):
        asked.append(Path(features))
        return Path(features).with_name("nowhere.index")

    monkeypatch.setattr(serve, "default_index_path", spy, raising=False)
    monkeypatch.setattr(index_module, "default_index_path", spy)
    said: list[str] = []
    assert serve.load_index(FeatureFile.open(world["feats"]), None, say=said.append) is None
    assert asked == [world["feats"]] and "nowhere.index" in said[0]
