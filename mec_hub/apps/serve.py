"""The neighbour browser behind ``mec-hub serve``: a web page and a JSON API over one feature file.

``NeighbourBrowser`` holds the logic and knows nothing of HTTP: the rows of the file, the ``k``
nearest rows of a row or of an uploaded image (embedded with the model recorded in the meta,
its weights checked by SHA-256 exactly as ``mec-hub search`` does), and thumbnails. ``create_app``
wraps it in a Starlette application (the optional extra ``mec-hub[serve]``):

* ``GET /api/rows?offset=O&limit=L``: ``{"total": N, "offset": O, "rows": [{"row": i, "path": p}]}``;
* ``GET /api/neighbours?row=I&k=K``: ``{"query": {"row": I, ...}, "neighbours": [{"rank", "row", "score", "path"}]}``;
* ``POST /api/search?k=K``: the body is the bytes of one image file; the same answer without a query row;
* ``GET /thumb/I``: a JPEG thumbnail of row ``I``;
* ``/``: the page (``mec_hub/apps/static``: plain HTML, CSS and JS).

No request names a file: images are read by row number only, and a row's image is read only when
the path recorded for it, symbolic links resolved, lies inside the folder it was recorded relative
to (an absolute recorded path: its own folder), so neither a ``../`` line nor a link planted in the
folder that points elsewhere reads anything outside. Bad input is a 4xx with a JSON
``{"error": message}``, never a traceback.
"""

from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from mec_hub.apps.search import check_same_weights, cosine_top_k, load_query_embedder
from mec_hub.data.featurefile import META_SUFFIX, FeatureFile, sidecar
from mec_hub.errors import MecHubError

STATIC_DIR = Path(__file__).with_name("static")
INDEX_SUFFIX = ".index"
MAX_K = 1000
MAX_PAGE = 500
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
THUMB_SIZE = 192
THUMB_CACHE_ENTRIES = 1024
SERVE_EXTRA_HINT = "pip install 'mec-hub[serve]'"


class RequestError(MecHubError):
    """A request the browser refuses; ``status`` is the HTTP status (4xx) it answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _whole_number(value: Any, name: str, low: int, high: int) -> int:
    """``value`` (a query-string value or an int) as an int in ``[low, high]``, else a 422 naming ``name``."""
    try:
        number = int(str(value).strip(), 10)
    except (TypeError, ValueError):
        raise RequestError(f"{name} must be a whole number, got {value!r}", 422) from None
    if not low <= number <= high:
        raise RequestError(f"{name} must be between {low} and {high}, got {number}", 422)
    return number


class NeighbourBrowser:
    """Rows, neighbours and thumbnails of one feature file.

    ``index`` is an object with ``.search(queries, k) -> (scores, rows)`` (a ``FeatureIndex``);
    without one, search is exact (``cosine_top_k``). The query model is loaded on the first
    uploaded image.
    """

    def __init__(
        self,
        features: FeatureFile,
        *,
        index: Any = None,
        weights: str | None = None,
        device: str = "auto",
        thumb_size: int = THUMB_SIZE,
        cache_entries: int = THUMB_CACHE_ENTRIES,
    ) -> None:
        self.features = features
        self.index = index
        self.weights = weights
        self.device = device
        self.thumb_size = thumb_size
        self.cache_entries = cache_entries
        self._thumbs: OrderedDict[int, bytes] = OrderedDict()
        self._thumbs_lock = threading.Lock()
        self._embedder: Any = None
        self._embedder_lock = threading.Lock()

    @property
    def num_rows(self) -> int:
        return int(self.features.matrix.shape[0])

    # ------------------------------------------------------------------ rows and neighbours

    def row_number(self, value: Any) -> int:
        return _whole_number(value, "row", 0, self.num_rows - 1)

    def rows(self, offset: Any = 0, limit: Any = 60) -> dict[str, Any]:
        start = _whole_number(offset, "offset", 0, max(self.num_rows - 1, 0))
        count = _whole_number(limit, "limit", 1, MAX_PAGE)
        stop = min(start + count, self.num_rows)
        return {
            "total": self.num_rows,
            "offset": start,
            "rows": [{"row": i, "path": self.features.paths[i]} for i in range(start, stop)],
        }

    def _top_k(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.index is not None:
            scores, rows = self.index.search(queries, k)
        else:
            scores, rows = cosine_top_k(self.features.matrix, queries, k)
        return np.asarray(scores), np.asarray(rows)

    def _answer(self, scores: np.ndarray, rows: np.ndarray) -> list[dict[str, Any]]:
        hits = [(float(s), int(r)) for s, r in zip(scores, rows, strict=True) if 0 <= int(r) < self.num_rows]
        return [
            {"rank": rank, "row": row, "score": score, "path": self.features.paths[row]}
            for rank, (score, row) in enumerate(hits, start=1)
        ]

    def neighbours(self, row: Any, k: Any = 10) -> dict[str, Any]:
        """The ``k`` rows nearest to row ``row`` (itself included, normally first)."""
        i = self.row_number(row)
        k = _whole_number(k, "k", 1, MAX_K)
        query = np.asarray(self.features.matrix[i : i + 1], dtype=np.float32)
        scores, rows = self._top_k(query, k)
        return {
            "query": {"row": i, "path": self.features.paths[i]},
            "neighbours": self._answer(scores[0], rows[0]),
        }

    def _query_embedder(self) -> Any:
        with self._embedder_lock:
            if self._embedder is None:
                meta = self.features.meta
                meta_file = sidecar(self.features.path, META_SUFFIX)
                if meta is None:
                    raise RequestError(
                        f"{self.features.path}: no {meta_file.name} beside it, so the model that made it is "
                        "unknown and an image cannot be searched (rows can)",
                        409,
                    )
                try:
                    embedder = load_query_embedder(meta, weights=self.weights, device=self.device)
                    check_same_weights(meta, embedder.weights_sha256, origin=str(meta_file))
                except RequestError:
                    raise
                except MecHubError as exc:
                    raise RequestError(str(exc), 409) from None
                self._embedder = embedder
            return self._embedder

    def search_image(self, data: bytes, k: Any = 10) -> dict[str, Any]:
        """The ``k`` rows nearest to the image whose file bytes are ``data``."""
        from mec_hub.data.images import ImageDecodeError, decode_image_bytes

        k = _whole_number(k, "k", 1, MAX_K)
        if not data:
            raise RequestError("the request body is empty: send the bytes of one image file", 400)
        if len(data) > MAX_UPLOAD_BYTES:
            raise RequestError(f"the image is larger than the {MAX_UPLOAD_BYTES // 2**20} MiB limit", 413)
        try:
            image = decode_image_bytes(data)
        except ImageDecodeError as exc:
            raise RequestError(f"the uploaded file is not a usable image: {exc.reason}", 422) from None
        embedder = self._query_embedder()
        features = np.asarray(embedder.embed([image]), dtype=np.float32)
        if features.shape != (1, self.features.matrix.shape[1]):
            raise RequestError(
                f"the query model gives {features.shape[-1]}-d features, but {self.features.path.name} has "
                f"{self.features.matrix.shape[1]} dimensions (different head?)",
                409,
            )
        scores, rows = self._top_k(features, k)
        return {"query": None, "neighbours": self._answer(scores[0], rows[0])}

    # ------------------------------------------------------------------ images

    def image_path(self, row: Any) -> Path:
        """The file of row ``row``, only when it lies inside the folder its path was recorded relative to.

        ``RequestError`` (404) when it cannot be found, or when the recorded path climbs out of that
        folder (``../``) or is a symbolic link (itself or a folder on the way) to somewhere outside it.
        """
        i = self.row_number(row)
        recorded = Path(self.features.paths[i])
        resolved = self.features.resolve(i)
        if resolved is None:
            raise RequestError(f"row {i}: its image {recorded} is not found on this machine", 404)
        if recorded.is_absolute():
            root = recorded.parent
        else:
            root = next((r for r in self.features.search_roots if r / recorded == resolved), resolved.parent)
        real, real_root = Path(os.path.realpath(resolved)), Path(os.path.realpath(root))
        if not real.is_relative_to(real_root) or real == real_root:
            raise RequestError(f"row {i}: its image {recorded} lies outside the folder it was recorded in", 404)
        return real

    def thumbnail(self, row: Any) -> bytes:
        """A JPEG of row ``row``'s image, at most ``thumb_size`` pixels a side (kept in a bounded cache)."""
        from mec_hub.data.images import ImageDecodeError, decode_image

        i = self.row_number(row)
        with self._thumbs_lock:
            if i in self._thumbs:
                self._thumbs.move_to_end(i)
                return self._thumbs[i]
        path = self.image_path(i)
        try:
            image = decode_image(path)
        except ImageDecodeError as exc:
            raise RequestError(f"row {i}: cannot decode its image ({exc.reason})", 404) from None
        image.thumbnail((self.thumb_size, self.thumb_size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        data = buffer.getvalue()
        with self._thumbs_lock:
            self._thumbs[i] = data
            while len(self._thumbs) > self.cache_entries:
                self._thumbs.popitem(last=False)
        return data


def load_index(features: FeatureFile, index_path: str | os.PathLike[str] | None) -> Any:
    """The index of ``index_path``, or of ``FEATS.index`` beside the file when it exists; ``None``: exact search."""
    if index_path is None:
        beside = sidecar(features.path, INDEX_SUFFIX)
        if not beside.is_file():
            return None
        index_path = beside
    try:
        from mec_hub.apps.index import FeatureIndex  # type: ignore[import-not-found]
    except ImportError as exc:
        raise MecHubError(f"--index {index_path}: cannot load indexes here ({exc})") from None
    return FeatureIndex.load(index_path, features=features.path)


def create_app(browser: NeighbourBrowser) -> Any:
    """The Starlette application serving ``browser``."""
    try:
        from starlette.applications import Starlette
        from starlette.concurrency import run_in_threadpool
        from starlette.requests import Request
        from starlette.responses import FileResponse, JSONResponse, Response
        from starlette.routing import Mount, Route
        from starlette.staticfiles import StaticFiles
    except ImportError:
        raise MecHubError(f"mec-hub serve needs Starlette and uvicorn: {SERVE_EXTRA_HINT}") from None

    def refused(exc: RequestError) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    async def page(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    async def info(request: Request) -> Response:
        meta = browser.features.meta
        return JSONResponse(
            {
                "file": browser.features.path.name,
                "rows": browser.num_rows,
                "dim": int(browser.features.matrix.shape[1]),
                "model": None if meta is None else (meta.model or meta.weights),
                "search": "exact" if browser.index is None else "index",
                "max_k": MAX_K,
                "max_upload_bytes": MAX_UPLOAD_BYTES,
            }
        )

    async def rows(request: Request) -> Response:
        q = request.query_params
        try:
            return JSONResponse(browser.rows(q.get("offset", "0"), q.get("limit", "60")))
        except RequestError as exc:
            return refused(exc)

    async def neighbours(request: Request) -> Response:
        q = request.query_params
        if "row" not in q:
            return refused(RequestError("give the query row: /api/neighbours?row=I&k=K", 422))
        try:
            return JSONResponse(await run_in_threadpool(browser.neighbours, q["row"], q.get("k", "10")))
        except RequestError as exc:
            return refused(exc)

    async def search(request: Request) -> Response:
        try:
            k = _whole_number(request.query_params.get("k", "10"), "k", 1, MAX_K)
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > MAX_UPLOAD_BYTES:
                raise RequestError(f"the image is larger than the {MAX_UPLOAD_BYTES // 2**20} MiB limit", 413)
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_UPLOAD_BYTES:
                    raise RequestError(f"the image is larger than the {MAX_UPLOAD_BYTES // 2**20} MiB limit", 413)
            return JSONResponse(await run_in_threadpool(browser.search_image, bytes(body), k))
        except RequestError as exc:
            return refused(exc)

    async def thumb(request: Request) -> Response:
        try:
            data = await run_in_threadpool(browser.thumbnail, request.path_params["row"])
        except RequestError as exc:
            return refused(exc)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    async def not_found(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": f"no such page: {request.url.path}"}, status_code=404)

    async def internal(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)

    routes = [
        Route("/", page),
        Route("/api/info", info),
        Route("/api/rows", rows),
        Route("/api/neighbours", neighbours),
        Route("/api/search", search, methods=["POST"]),
        Route("/thumb/{row:int}", thumb),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, Exception: internal})


def serve(
    features_path: str | os.PathLike[str],
    *,
    index_path: str | os.PathLike[str] | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    weights: str | None = None,
    device: str = "auto",
) -> None:
    """Open the feature file and serve the browser until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise MecHubError(f"mec-hub serve needs Starlette and uvicorn: {SERVE_EXTRA_HINT}") from None
    features = FeatureFile.open(features_path)
    browser = NeighbourBrowser(features, index=load_index(features, index_path), weights=weights, device=device)
    app = create_app(browser)
    uvicorn.run(app, host=host, port=port, log_level="info")
