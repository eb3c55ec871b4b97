"""The neighbour browser behind ``mec-hub serve``: a web page and a JSON API over one feature file.

``NeighbourBrowser`` holds the logic and knows nothing of HTTP: the rows of the file, the ``k``
nearest rows of a row or of an uploaded image (embedded with the model recorded in the meta,
its weights checked by SHA-256 exactly as ``mec-hub search`` does), and thumbnails. ``create_app``
wraps it in a Starlette application (the optional extra ``mec-hub[serve]``):

* ``GET /api/rows?offset=O&limit=L``: ``{"total": N, "offset": O, "rows": [{"row": i, "path": p}]}``;
* ``GET /api/neighbours?row=I&k=K``: ``{"query": {"row": I, ...}, "neighbours": [{"rank", "row", "score", "path"}]}``;
* ``POST /api/search?k=K``: the body is the bytes of one image file; the same answer without a query row;
* ``GET /thumb/I``: a JPEG thumbnail of row ``I``;
* ``GET /image/I``: row ``I``'s image as a JPEG, full size up to ``FULL_SIZE`` pixels a side;
* ``/``: the page (``mec_hub/apps/static``: plain HTML, CSS and JS), under a Content-Security-Policy
  that lets it load nothing but this server's own files (and the ``blob:`` image of an upload).

What a hostile browser (or a web page it visits) cannot do:

* **Reach it under another name** (DNS rebinding): a request whose ``Host`` is not one of the
  names the server was started for (the ``--host`` address, the localhost names, ``--allow-host``)
  is a 400 before any route runs (Starlette's ``TrustedHostMiddleware``).
* **Make it work for another site**: an API request whose ``Sec-Fetch-Site`` says ``cross-site``
  or ``same-site``, or whose ``Origin`` is not this server's, is a 403. An upload must also carry
  ``X-Requested-With`` (a header no form can send, and that makes a browser ask first, a question
  this server never answers yes to) and be ``application/octet-stream`` or ``image/*``: a
  cross-site ``text/plain`` POST is refused before its body is read.
* **Read a file**: no request names one; a row's image is read only when its recorded name is
  relative, and, symbolic links resolved, lies inside one of the set's folders (``base_dir`` of
  the meta, the recorded inputs, the feature file's folder; never the filesystem root). An
  absolute name, a ``../`` climbing out, a link pointing out: all get the same 404 as a file that
  is not there. Rows from tar shards (``SHARD.tar/MEMBER``) are read from the shard, found the same way.
* **Exhaust it with uploads**: the body is refused above ``MAX_UPLOAD_BYTES`` (the declared length
  up front, and while it streams), must arrive within ``UPLOAD_TIMEOUT_S``, its header must claim
  at most ``MAX_UPLOAD_PIXELS`` (wide samples counted ``WIDE_SAMPLE_WEIGHT`` times) before any pixel
  is decoded, and at most ``MAX_CONCURRENT_UPLOADS`` are read and embedded at once (503 otherwise).

Every error is a JSON ``{"error": message}``, never a traceback or a text page.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from PIL import ImageMode

from mec_hub.apps.index import FeatureIndex, default_index_path
from mec_hub.apps.search import check_same_weights, cosine_top_k, load_query_embedder
from mec_hub.data.featurefile import META_SUFFIX, FeatureFile, sidecar
from mec_hub.data.images import ImageDecodeError, decode_image, decode_image_bytes, image_header
from mec_hub.embedding.inputs import TarMember, list_tar_members
from mec_hub.errors import MecHubError

STATIC_DIR = Path(__file__).with_name("static")
MAX_K = 1000
MAX_PAGE = 500
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
# Pixels an uploaded image may claim (its header is read before anything is decoded): well under
# PIL's MAX_IMAGE_PIXELS (89 M, what mec-embed allows for the user's own files), since a stranger
# chooses this one. Images with 16-bit, 32-bit or float samples count WIDE_SAMPLE_WEIGHT times
# their pixels: their conversion to 8-bit RGB holds 64-bit copies of every sample.
MAX_UPLOAD_PIXELS = 40_000_000
WIDE_SAMPLE_WEIGHT = 4
MAX_CONCURRENT_UPLOADS = 2  # uploads read, decoded and embedded at once; more are a 503
UPLOAD_TIMEOUT_S = 30.0  # the whole body must arrive within this
RETRY_AFTER_S = 5
MAX_CONCURRENT_THUMBS = 4  # row images (thumbnails, full size) decoded at once; more wait their turn
MAX_MEMBER_BYTES = 64 * 1024 * 1024  # a tar member larger than this gets no thumbnail
TAR_LISTINGS_CACHED = 8
THUMB_SIZE = 192
FULL_SIZE = 2048  # the full-size view: a larger image is scaled down to this many pixels a side
THUMB_CACHE_ENTRIES = 1024
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")
UPLOAD_CONTENT_TYPES = ("application/octet-stream", "image/")
UPLOAD_MARK_HEADER = "x-requested-with"  # what the page's own script sends with an upload ("mec-hub")
SERVE_EXTRA_HINT = "pip install 'mec-hub[serve]'"
NO_IMAGE = "no image to show for this row"  # the one answer for "not there", "not yours" and "not an image"
# The page's own script, style sheet, API and images; the uploaded query is shown from a blob: URL.
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_TRUSTED_HOST = "mec_hub.trusted_host"

log = logging.getLogger("mec_hub.serve")


class RequestError(MecHubError):
    """A request the browser refuses; ``status`` is the HTTP status (4xx/5xx) it answers with."""

    def __init__(self, message: str, status: int = 400, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def _whole_number(value: Any, name: str, low: int, high: int) -> int:
    """``value`` (a query-string value or an int) as an int in ``[low, high]``, else a 422 naming ``name``."""
    try:
        number = int(str(value).strip(), 10)
    except (TypeError, ValueError):
        raise RequestError(f"{name} must be a whole number, got {value!r}", 422) from None
    if not low <= number <= high:
        raise RequestError(f"{name} must be between {low} and {high}, got {number}", 422)
    return number


def _too_large() -> RequestError:
    return RequestError(f"the image is larger than the {MAX_UPLOAD_BYTES // 2**20} MiB limit", 413)


def check_upload_size(width: int, height: int, mode: str) -> None:
    """Refuse (413) an upload whose header claims more than ``MAX_UPLOAD_PIXELS`` weighted pixels."""
    try:
        wide = int(ImageMode.getmode(mode).typestr[-1]) > 1
    except (KeyError, ValueError):  # a mode Pillow cannot describe: counted as wide
        wide = True
    weight = WIDE_SAMPLE_WEIGHT if wide else 1
    if width * height * weight > MAX_UPLOAD_PIXELS:
        counted = f" of {mode} (counted {weight} times)" if wide else ""
        what = f"{width} x {height} = {width * height} pixels{counted}"
        raise RequestError(f"the image is {what}, more than the {MAX_UPLOAD_PIXELS} pixel limit for uploads", 413)


# --------------------------------------------------------------------------- which file a row may read


def image_roots(features: FeatureFile) -> list[Path]:
    """The folders (real paths, in order) a row's recorded name may be read under: ``base_dir`` of the
    meta, the recorded inputs, and the feature file's own folder. Not the current folder (an accident
    of where the server was started), and never a filesystem root (a set with ``base_dir`` ``/``
    would otherwise let its rows name any file on the machine)."""
    meta = features.meta
    base = Path(meta.base_dir) if meta is not None and meta.base_dir else None
    roots: list[Path] = []
    for root in features.search_roots:
        if root == Path.cwd() and root != base:  # search_roots adds the current folder: not the set's
            continue
        real = Path(os.path.realpath(root))
        if real.parent == real:
            log.warning("%s: its folder %s is a filesystem root; no image is read under it", features.path, root)
            continue
        if real.is_dir() and real not in roots:
            roots.append(real)
    real_own = Path(os.path.realpath(features.path.parent))
    if real_own.parent != real_own and real_own not in roots:
        roots.append(real_own)
    return roots


def resolve_inside(name: str, roots: Sequence[Path]) -> Path | None:
    """The regular file the recorded relative ``name`` stands for under the first of ``roots`` (real
    paths) that holds it, symbolic links resolved, only when it lies inside that root; ``None``
    otherwise: an absolute name, a name climbing out (``../``), or a link pointing out.

    (This belongs beside ``FeatureFile.resolve`` in ``mec_hub.data.featurefile``.)
    """
    recorded = Path(name)
    if not name or recorded.is_absolute() or recorded.anchor:
        return None
    for root in roots:
        real = Path(os.path.realpath(root / recorded))
        if real != root and real.is_relative_to(root) and real.is_file():
            return real
    return None


def _shard_and_member(name: str, roots: Sequence[Path]) -> tuple[Path, str] | None:
    """``SHARD.tar/MEMBER`` (the shard named as mec-embed names it) as (the shard's real path, member name)."""
    parts = Path(name).parts
    for cut in range(1, len(parts)):
        if parts[cut - 1].lower().endswith(".tar"):
            shard = resolve_inside(os.path.join(*parts[:cut]), roots)
            if shard is not None:
                return shard, "/".join(parts[cut:])
    return None


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
        max_uploads: int = MAX_CONCURRENT_UPLOADS,
    ) -> None:
        self.features = features
        self.index = index
        self.weights = weights
        self.device = device
        self.thumb_size = thumb_size
        self.cache_entries = cache_entries
        self.roots = image_roots(features)
        self._thumbs: OrderedDict[int, bytes] = OrderedDict()
        self._thumbs_lock = threading.Lock()
        self._thumb_slots = threading.BoundedSemaphore(MAX_CONCURRENT_THUMBS)
        self._upload_slots = threading.BoundedSemaphore(max_uploads)
        self._shards: OrderedDict[tuple[Path, int, int], dict[str, TarMember]] = OrderedDict()
        self._shards_lock = threading.Lock()
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

    @contextmanager
    def upload_slot(self) -> Iterator[None]:
        """Hold one of the ``max_uploads`` slots while an upload is read and searched; a 503 when none is free."""
        if not self._upload_slots.acquire(blocking=False):
            raise RequestError(
                "the server is busy with other uploads; try again in a few seconds",
                503,
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        try:
            yield
        finally:
            self._upload_slots.release()

    def search_image(self, data: bytes, k: Any = 10) -> dict[str, Any]:
        """The ``k`` rows nearest to the image whose file bytes are ``data`` (its size is checked from
        its header before it is decoded)."""
        k = _whole_number(k, "k", 1, MAX_K)
        if not data:
            raise RequestError("the request body is empty: send the bytes of one image file", 400)
        if len(data) > MAX_UPLOAD_BYTES:
            raise _too_large()
        try:
            check_upload_size(*image_header(data))
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

    def _shard_members(self, shard: Path) -> dict[str, TarMember]:
        """The image members of ``shard`` by name (headers only, cached for a few shards)."""
        st = shard.stat()
        key = (shard, st.st_size, st.st_mtime_ns)
        with self._shards_lock:
            if key in self._shards:
                self._shards.move_to_end(key)
                return self._shards[key]
        members: dict[str, TarMember] = {}
        for name, member in list_tar_members(str(shard)).members:
            if name is not None:
                members.setdefault(name, member)
        with self._shards_lock:
            self._shards[key] = members
            while len(self._shards) > TAR_LISTINGS_CACHED:
                self._shards.popitem(last=False)
        return members

    def _decode_row(self, i: int) -> Any:
        """Row ``i``'s image, decoded; ``MecHubError`` or ``OSError`` saying why not."""
        name = self.features.paths[i]
        path = resolve_inside(name, self.roots)
        if path is not None:
            return decode_image(path)
        found = _shard_and_member(name, self.roots)
        if found is None:
            raise ImageDecodeError("not found inside the feature set's folders (or outside them)")
        shard, member_name = found
        member = self._shard_members(shard).get(member_name)
        if member is None:
            raise ImageDecodeError(f"no image member {member_name} in {shard}")
        if member.size > MAX_MEMBER_BYTES:
            raise ImageDecodeError(f"tar member of {member.size} bytes, over the {MAX_MEMBER_BYTES} limit")
        return decode_image_bytes(member.read())

    def _jpeg(self, i: int, size: int, quality: int) -> bytes:
        """Row ``i``'s image as a JPEG at most ``size`` pixels a side (never enlarged).

        A row whose image cannot be shown, for whatever reason, is the same 404 (``NO_IMAGE``): the
        answer does not tell a file outside the set's folders from one that does not exist.
        """
        with self._thumb_slots:
            try:
                image = self._decode_row(i)
            except (MecHubError, OSError) as exc:
                log.info("row %d (%s): no image: %s", i, self.features.paths[i], exc)
                raise RequestError(NO_IMAGE, 404) from None
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=quality)
        return buffer.getvalue()

    def thumbnail(self, row: Any) -> bytes:
        """A JPEG of row ``row``'s image, at most ``thumb_size`` pixels a side (kept in a bounded cache)."""
        i = self.row_number(row)
        with self._thumbs_lock:
            if i in self._thumbs:
                self._thumbs.move_to_end(i)
                return self._thumbs[i]
        data = self._jpeg(i, self.thumb_size, 85)
        with self._thumbs_lock:
            self._thumbs[i] = data
            while len(self._thumbs) > self.cache_entries:
                self._thumbs.popitem(last=False)
        return data

    def full_image(self, row: Any) -> bytes:
        """A JPEG of row ``row``'s image at its own size, scaled down to ``FULL_SIZE`` pixels a side when
        larger (not cached); the same ``NO_IMAGE`` 404 as ``thumbnail``."""
        return self._jpeg(self.row_number(row), FULL_SIZE, 90)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def load_index(
    features: FeatureFile, index_path: str | os.PathLike[str] | None, *, say: Callable[[str], None] = _say
) -> Any:
    """The index of ``index_path``, or of the set's own index (``default_index_path``) when it exists;
    ``None`` (said in one line): exact search. A stale or foreign index raises its ``MecHubError``."""
    if index_path is None:
        beside = default_index_path(features.path)
        if not beside.is_file():
            say(f"no index {beside} (mec-hub index {features.path} makes one): exact search")
            return None
        index_path = beside
    return FeatureIndex.load(index_path, features=features)


# --------------------------------------------------------------------------- HTTP


def allowed_hosts(host: str, extra: Iterable[str] = ()) -> list[str]:
    """The ``Host`` names the server answers to: the localhost names, the address it listens on
    (unless a wildcard) and ``extra``; an IPv6 address in both spellings (``::1``, ``[::1]``)."""
    names = list(LOCAL_HOSTS)
    for name in (host, *extra):
        name = name.strip().lower()
        if not name or name in ("0.0.0.0", "::", "[::]"):
            continue
        bare = name.strip("[]")
        for spelling in (bare, f"[{bare}]") if ":" in bare else (name,):
            if spelling not in names:
                names.append(spelling)
    return names


def _same_origin_refusal(headers: Any, hosts: Sequence[str], port: int | None) -> str | None:
    """Why a request is refused as coming from another site (``Sec-Fetch-Site``, ``Origin``), or ``None``."""
    site = headers.get("sec-fetch-site", "").lower()
    if site in ("cross-site", "same-site"):
        return f"refused: a {site} request (only this server's own page may call its API)"
    origin = headers.get("origin")
    if origin is None:
        return None
    try:
        parts = urlsplit(origin)
        origin_port = parts.port
    except ValueError:
        return f"refused: the Origin {origin!r} is not this server's"
    host = (parts.hostname or "").lower()
    host_ok = host in hosts or f"[{host}]" in hosts
    port_ok = port in (None, 0) or (origin_port or (80 if parts.scheme == "http" else None)) == port
    if parts.scheme != "http" or not host_ok or not port_ok:
        return f"refused: the Origin {origin!r} is not this server's"
    return None


def _upload_refusal(headers: Any) -> RequestError | None:
    """Why an upload is refused before its body is read (not the way the page sends it), or ``None``."""
    if not headers.get(UPLOAD_MARK_HEADER):
        return RequestError("an upload must carry the header X-Requested-With: mec-hub (as the page sends it)", 403)
    kind = headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != UPLOAD_CONTENT_TYPES[0] and not kind.startswith(UPLOAD_CONTENT_TYPES[1]):
        return RequestError(f"an upload must be sent as application/octet-stream or image/*, not {kind!r}", 415)
    declared = headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            return RequestError(f"Content-Length {declared!r} is not a number of bytes", 400)
        if int(declared) > MAX_UPLOAD_BYTES:
            return _too_large()
    return None


def create_app(browser: NeighbourBrowser, *, hosts: Sequence[str] = LOCAL_HOSTS, port: int | None = None) -> Any:
    """The Starlette application serving ``browser``, answering only requests whose ``Host`` is one of
    ``hosts`` (see ``allowed_hosts``) and, from a browser, whose origin is ``http://HOST:port``
    (any port when ``port`` is ``None`` or 0)."""
    try:
        from starlette.applications import Starlette
        from starlette.concurrency import run_in_threadpool
        from starlette.datastructures import Headers
        from starlette.exceptions import HTTPException
        from starlette.middleware import Middleware
        from starlette.middleware.trustedhost import TrustedHostMiddleware
        from starlette.requests import ClientDisconnect, Request
        from starlette.responses import FileResponse, JSONResponse, Response
        from starlette.routing import Mount, Route
        from starlette.staticfiles import StaticFiles
        from starlette.types import ASGIApp, Message, Receive, Scope, Send
    except ImportError:
        raise MecHubError(f"mec-hub serve needs Starlette and uvicorn: {SERVE_EXTRA_HINT}") from None

    hosts = [h.lower() for h in hosts]

    def refused(exc: RequestError) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=exc.headers)

    def api(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        """``handler`` behind the same-origin check, its ``RequestError`` answered as JSON."""

        async def guarded(request: Request) -> Response:
            why = _same_origin_refusal(request.headers, hosts, port)
            if why is not None:
                return refused(RequestError(why, 403))
            try:
                return await handler(request)
            except RequestError as exc:
                return refused(exc)

        return guarded

    async def page(request: Request) -> Response:
        return FileResponse(
            STATIC_DIR / "index.html", media_type="text/html", headers={"Content-Security-Policy": PAGE_POLICY}
        )

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
                "max_upload_pixels": MAX_UPLOAD_PIXELS,
            }
        )

    async def rows(request: Request) -> Response:
        q = request.query_params
        return JSONResponse(browser.rows(q.get("offset", "0"), q.get("limit", "60")))

    async def neighbours(request: Request) -> Response:
        q = request.query_params
        if "row" not in q:
            raise RequestError("give the query row: /api/neighbours?row=I&k=K", 422)
        return JSONResponse(await run_in_threadpool(browser.neighbours, q["row"], q.get("k", "10")))

    async def read_body(request: Request) -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_UPLOAD_BYTES:
                raise _too_large()
        return bytes(body)

    async def search(request: Request) -> Response:
        k = _whole_number(request.query_params.get("k", "10"), "k", 1, MAX_K)
        refusal = _upload_refusal(request.headers)
        if refusal is not None:
            raise refusal
        with browser.upload_slot():
            try:
                body = await asyncio.wait_for(read_body(request), UPLOAD_TIMEOUT_S)
            except asyncio.TimeoutError:
                raise RequestError(f"the image did not arrive within {UPLOAD_TIMEOUT_S:g} s", 408) from None
            except ClientDisconnect:
                raise RequestError("the upload was cut off", 400) from None
            return JSONResponse(await run_in_threadpool(browser.search_image, body, k))

    async def thumb(request: Request) -> Response:
        data = await run_in_threadpool(browser.thumbnail, request.path_params["row"])
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    async def image(request: Request) -> Response:
        data = await run_in_threadpool(browser.full_image, request.path_params["row"])
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = f"no such page: {request.url.path}" if exc.status_code == 404 else exc.detail
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    async def internal(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)

    def trusted_hosts(app: ASGIApp) -> ASGIApp:
        """``TrustedHostMiddleware`` over ``app``, its refusal answered as JSON like every other error."""

        async def passed(scope: Scope, receive: Receive, send: Send) -> None:
            scope[_TRUSTED_HOST] = True
            await app(scope, receive, send)

        guard = TrustedHostMiddleware(passed, allowed_hosts=hosts, www_redirect=False)

        async def checked(scope: Scope, receive: Receive, send: Send) -> None:
            async def answer(message: Message) -> None:
                if scope.get(_TRUSTED_HOST):
                    await send(message)
                elif message["type"] == "http.response.start":  # the guard's own refusal: said in JSON
                    host = Headers(scope=scope).get("host", "")
                    error = f"refused: this server does not answer to the host {host!r} (it answers to {hosts})"
                    await JSONResponse({"error": error}, status_code=message["status"])(scope, receive, send)

            await guard(scope, receive, answer if scope["type"] == "http" else send)

        return checked

    routes = [
        Route("/", page),
        Route("/api/info", api(info)),
        Route("/api/rows", api(rows)),
        Route("/api/neighbours", api(neighbours)),
        Route("/api/search", api(search), methods=["POST"]),
        Route("/thumb/{row:int}", api(thumb)),
        Route("/image/{row:int}", api(image)),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(trusted_hosts)],
        exception_handlers={HTTPException: http_error, Exception: internal},
    )


def serve(
    features_path: str | os.PathLike[str],
    *,
    index_path: str | os.PathLike[str] | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    weights: str | None = None,
    device: str = "auto",
    allow_hosts: Sequence[str] = (),
) -> None:
    """Open the feature file and serve the browser until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise MecHubError(f"mec-hub serve needs Starlette and uvicorn: {SERVE_EXTRA_HINT}") from None
    features = FeatureFile.open(features_path)
    browser = NeighbourBrowser(features, index=load_index(features, index_path), weights=weights, device=device)
    app = create_app(browser, hosts=allowed_hosts(host, allow_hosts), port=port)
    uvicorn.run(app, host=host, port=port, log_level="info")
