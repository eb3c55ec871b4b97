"""A Hugging Face Hub that accepts pushes, served on 127.0.0.1 at the level of its HTTP API.

It answers what ``HfApi.create_repo``, ``create_branch`` and ``create_commit`` send (huggingface_hub 2.x):

* ``POST /api/repos/create``: ``{"name", "organization", "visibility", "type"}``; 409 if the repo exists;
* ``POST /api/validate-yaml``: the model card's metadata check;
* ``POST /api/models/{repo}/branch/{branch}``: a new branch from ``main`` (or ``startingPoint``); 409 if it exists;
* ``POST /api/models/{repo}/preupload/{revision}``: says which files go inline in the commit ("regular")
  and which through LFS (``lfs_suffixes``, as the Hub's default ``.gitattributes`` does for safetensors);
* ``POST /{repo}.git/info/lfs/objects/batch``: the LFS batch API, "basic" transfer (one ``PUT`` per
  object, then a verify ``POST``); the Xet protocol is not served;
* ``POST /api/models/{repo}/commit/{revision}``: ndjson lines, a ``header`` (summary, description),
  then ``file`` (base64 content) and ``lfsFile`` (sha256 oid of an uploaded object).

Like the Hub, a new repo has a ``main`` branch whose first commit holds ``.gitattributes``, a
preupload or commit to a branch that does not exist is a 404 ``RevisionNotFound``, and every API
call needs the bearer token (LFS object uploads go to pre-signed URLs and carry none).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

TOKEN = "hf_fakehub_push_token"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
_REPO_API = re.compile(r"^/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/([^/]+)$")
_LFS_BATCH = re.compile(r"^/([^/]+/[^/]+)\.git/info/lfs/objects/batch$")
_LFS_OBJECT = re.compile(r"^/lfs-objects/([0-9a-f]{64})$")


@dataclass
class Commit:
    oid: str
    parent: str | None
    summary: str
    description: str
    tree: dict[str, bytes]  # every file of the repo at this commit
    added: dict[str, bytes]  # the files this commit sent
    modes: dict[str, str]  # path -> "regular" (inline, base64) or "lfs"


@dataclass
class PushedRepo:
    create_payload: dict[str, Any]
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit oid

    def add_commit(
        self, branch: str, summary: str, description: str, added: dict[str, bytes], modes: dict[str, str]
    ) -> Commit:
        parent = self.branches.get(branch)
        tree = {**(self.commits[parent].tree if parent else {}), **added}
        digest = hashlib.sha1(
            repr((parent, summary, sorted((k, hashlib.sha256(v).hexdigest()) for k, v in tree.items()))).encode()
        )
        commit = Commit(digest.hexdigest(), parent, summary, description, tree, dict(added), dict(modes))
        self.commits[commit.oid] = commit
        self.branches[branch] = commit.oid
        return commit


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


class PushHub:
    def __init__(self, *, lfs_suffixes: tuple[str, ...] = (".safetensors",)) -> None:
        self.lfs_suffixes = lfs_suffixes
        self.repos: dict[str, PushedRepo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> bytes received by PUT
        self.requests: list[tuple[str, str]] = []
        self._server: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "server not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- the API, one method per endpoint -------------------------------------------------------------

    def _repo(self, repo_id: str) -> PushedRepo:
        if repo_id not in self.repos:
            raise HubError(404, "RepoNotFound", f"Repository not found: {repo_id}")
        return self.repos[repo_id]

    def _branch_head(self, repo: PushedRepo, revision: str) -> str:
        if revision not in repo.branches:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo.branches[revision]

    def create_repo(self, payload: dict[str, Any]) -> dict[str, Any]:
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.repos:
            raise HubError(409, None, "You already created this model repo", url=url)  # as the Hub answers
        repo = self.repos[repo_id] = PushedRepo(create_payload=payload)
        repo.add_commit("main", "initial commit", "", {".gitattributes": GITATTRIBUTES}, {".gitattributes": "regular"})
        return {"url": url, "name": repo_id}

    def create_branch(self, repo_id: str, branch: str, payload: dict[str, Any]) -> dict[str, Any]:
        repo = self._repo(repo_id)
        if branch in repo.branches:
            raise HubError(409, None, f"Reference already exists: refs/heads/{branch}")
        start = payload.get("startingPoint") or "main"
        repo.branches[branch] = repo.branches.get(start, start)
        if repo.branches[branch] not in repo.commits:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {start}")
        return {}

    def preupload(self, repo_id: str, revision: str, payload: dict[str, Any]) -> dict[str, Any]:
        self._branch_head(self._repo(repo_id), revision)
        return {
            "files": [
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if f["path"].endswith(self.lfs_suffixes) and f["size"] > 0 else "regular",
                    "shouldIgnore": False,
                    "oid": None,
                }
                for f in payload["files"]
            ]
        }

    def lfs_batch(self, repo_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        self._repo(repo_id)
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", []):
            raise HubError(400, None, f"unsupported LFS batch request: {payload}")
        objects = []
        for obj in payload["objects"]:
            href = f"{self.endpoint}/lfs-objects/{obj['oid']}"
            actions = {"upload": {"href": href}, "verify": {"href": f"{self.endpoint}/lfs-verify"}}
            objects.append({"oid": obj["oid"], "size": obj["size"], "actions": actions})
        return {"transfer": "basic", "objects": objects}

    def lfs_put(self, oid: str, body: bytes) -> dict[str, Any]:
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, None, f"uploaded bytes do not hash to {oid}")
        self.lfs_objects[oid] = body
        return {}

    def lfs_verify(self, payload: dict[str, Any]) -> dict[str, Any]:
        body = self.lfs_objects.get(payload["oid"])
        if body is None or len(body) != payload["size"]:
            raise HubError(404, None, f"LFS object {payload['oid']} was not uploaded")
        return {}

    def commit(self, repo_id: str, revision: str, body: bytes) -> dict[str, Any]:
        repo = self._repo(repo_id)
        self._branch_head(repo, revision)
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            raise HubError(400, None, "the commit payload must start with its header")
        header = lines[0]["value"]
        added: dict[str, bytes] = {}
        modes: dict[str, str] = {}
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, None, f"unexpected encoding {value.get('encoding')!r}")
                added[value["path"]], modes[value["path"]] = base64.b64decode(value["content"]), "regular"
            elif line["key"] == "lfsFile":
                content = self.lfs_objects.get(value["oid"])
                if value.get("algo") != "sha256" or content is None or len(content) != value["size"]:
                    raise HubError(400, None, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                added[value["path"]], modes[value["path"]] = content, "lfs"
            else:
                raise HubError(400, None, f"operation {line['key']!r} is not served here")
        commit = repo.add_commit(revision, header["summary"], header.get("description", ""), added, modes)
        return {
            "commitUrl": f"{self.endpoint}/{repo_id}/commit/{commit.oid}",
            "commitOid": commit.oid,
            "pullRequestUrl": None,
        }

    # -- HTTP --------------------------------------------------------------------------------------------

    def _route(self, method: str, path: str, headers: Any, body: bytes) -> dict[str, Any]:
        if method == "PUT" and (m := _LFS_OBJECT.match(path)):
            return self.lfs_put(m.group(1), body)  # a pre-signed upload URL: no token
        if headers.get("Authorization") != f"Bearer {TOKEN}":
            raise HubError(401, None, "Invalid credentials in Authorization header")
        content_type = headers.get("Content-Type", "")
        is_json = content_type.endswith("json") and "ndjson" not in content_type
        payload = json.loads(body) if body and is_json else {}
        if method == "POST" and path == "/api/repos/create":
            return self.create_repo(payload)
        if method == "POST" and path == "/api/validate-yaml":
            return {"errors": [], "warnings": []}
        if method == "POST" and path == "/lfs-verify":
            return self.lfs_verify(payload)
        if method == "POST" and (m := _LFS_BATCH.match(path)):
            return self.lfs_batch(m.group(1), payload)
        if method == "POST" and (m := _REPO_API.match(path)):
            repo_id, action, revision = m.group(1), m.group(2), unquote(m.group(3))
            if action == "branch":
                return self.create_branch(repo_id, revision, payload)
            if action == "preupload":
                return self.preupload(repo_id, revision, payload)
            return self.commit(repo_id, revision, body)
        raise HubError(404, None, f"{method} {path} is not served by this fake Hub")

    def start(self) -> PushHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def _body(self) -> bytes:
                # huggingface_hub sends a Content-Length with every body, LFS uploads included.
                assert "chunked" not in self.headers.get("Transfer-Encoding", ""), "chunked bodies are not read here"
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                path = urlsplit(self.path).path
                body = self._body()
                with hub._lock:
                    hub.requests.append((self.command, path))
                    try:
                        status, headers, answer = 200, {}, hub._route(self.command, path, self.headers, body)
                    except HubError as exc:
                        status, answer = exc.status, {"error": exc.message, **exc.extra}
                        headers = {"X-Error-Message": exc.message, **({"X-Error-Code": exc.code} if exc.code else {})}
                data = json.dumps(answer).encode()
                self.send_response(status)
                for key, value in {**headers, "Content-Type": "application/json"}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_POST = _handle
            do_PUT = _handle
            do_GET = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
