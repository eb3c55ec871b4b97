"""A minimal Hugging Face Hub for tests, served on 127.0.0.1.

It answers what ``hf_hub_download`` asks: ``HEAD``/``GET /{repo_id}/resolve/{revision}/{filename}``
with the ``X-Repo-Commit`` and ``ETag`` headers, and the ``X-Error-Code`` 404s the client maps to
its exceptions. Repos have commits; branches point at commits. Requests are logged so tests can
tell a cache hit from a download.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote


@dataclass
class FakeRepo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit sha -> {filename: bytes}
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha

    def add_commit(self, files: dict[str, bytes], *, branch: str = "main") -> str:
        digest = hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode())
        commit = digest.hexdigest()
        self.commits[commit] = dict(files)
        self.branches[branch] = commit
        return commit


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[tuple[str, str]] = []
        self.tamper: dict[tuple[str, str], bytes] = {}  # (repo_id, filename) -> bytes served instead
        self.stall: dict[tuple[str, str], float] = {}  # (repo_id, filename) -> seconds a GET body stops halfway
        self.cut: set[tuple[str, str]] = set()  # (repo_id, filename): the connection closes halfway through a GET body
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def repo(self, repo_id: str) -> FakeRepo:
        return self.repos.setdefault(repo_id, FakeRepo())

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "server not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def downloads(self, filename: str) -> int:
        return sum(1 for method, path in self.requests if method == "GET" and path.endswith("/" + filename))

    def start(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def _reply(
                self, status: int, headers: dict[str, str], body: bytes = b"", stall: float = 0.0, cut: bool = False
            ) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command == "GET":
                    half = len(body) // 2
                    self.wfile.write(body[:half])
                    if cut:  # the full length announced, half of it sent, the connection closed
                        self.wfile.flush()
                        self.close_connection = True
                        return
                    if stall:  # a slow link: the rest comes after a pause
                        self.wfile.flush()
                        time.sleep(stall)
                    self.wfile.write(body[half:])

            def _resolve(self) -> None:
                hub.requests.append((self.command, self.path))
                parts = unquote(self.path.split("?")[0]).strip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._reply(404, {"X-Error-Code": "RepoNotFound"})
                repo_id, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self._reply(401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
                commit = repo.branches.get(revision, revision)
                if commit not in repo.commits:
                    return self._reply(404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "bad revision"})
                files = repo.commits[commit]
                if filename not in files:
                    return self._reply(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
                body = hub.tamper.get((repo_id, filename), files[filename])
                etag = hashlib.sha256(files[filename]).hexdigest()
                stall = hub.stall.get((repo_id, filename), 0.0)
                cut = (repo_id, filename) in hub.cut
                self._reply(200, {"X-Repo-Commit": commit, "ETag": f'"{etag}"'}, body, stall, cut)

            do_GET = _resolve
            do_HEAD = _resolve

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
