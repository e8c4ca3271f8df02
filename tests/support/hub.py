"""A stand-in for the Hugging Face Hub: local folders served over HTTP the way huggingface_hub's
`snapshot_download` fetches a model (point `HF_ENDPOINT` at `LocalHub.url`), for tests with no network.

What it answers, as the hub does for a public model repo:
- `GET /api/models/ORG/NAME[/revision/REV]`: the commit sha and the file list (`siblings`, which
  older clients read instead of the tree);
- `GET /api/models/ORG/NAME/tree/REV[/PATH]` (`?recursive=`): files with size, git blob id and, for
  weight files, the LFS sha256 (one page: no pagination);
- `HEAD`/`GET /ORG/NAME/resolve/REV/PATH`: `X-Repo-Commit`, `ETag` (the LFS sha256 or the blob id),
  `Content-Length`, byte ranges for resumed downloads, then the bytes;
- 404 with the hub's `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound) otherwise.
Every request is recorded, so a test can tell a download from a reuse. Not served: tokens (any is
accepted), private or gated repos, Xet storage, redirects to a CDN, uploads.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")  # what the hub keeps in LFS (its .gitattributes)


@dataclass(frozen=True)
class HubFile:
    path: str  # relative to the repo root, with '/'
    size: int
    blob_id: str  # git's sha1 of the blob
    sha256: str | None  # set for LFS files

    @property
    def etag(self) -> str:
        return self.sha256 or self.blob_id


@dataclass(frozen=True)
class HubRepo:
    folder: Path
    files: tuple[HubFile, ...]
    commit: str

    @classmethod
    def of(cls, folder: Path) -> HubRepo:
        files = []
        for item in sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts):
            data = item.read_bytes()
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            lfs = hashlib.sha256(data).hexdigest() if item.suffix in LFS_SUFFIXES else None
            files.append(HubFile(item.relative_to(folder).as_posix(), len(data), blob, lfs))
        commit = hashlib.sha1("".join(f"{f.path}:{f.etag}\n" for f in files).encode()).hexdigest()
        return cls(folder, tuple(files), commit)

    def file(self, path: str) -> HubFile | None:
        return next((f for f in self.files if f.path == path), None)


class LocalHub:
    """Serves `repos` ({"org/name": folder}) on 127.0.0.1; `requests` lists (method, path) as they came."""

    def __init__(self, repos: Mapping[str, Path]) -> None:
        self.repos = {repo_id: HubRepo.of(folder) for repo_id, folder in repos.items()}
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                hub._answer(self, head=False)

            def do_HEAD(self) -> None:
                hub._answer(self, head=True)

            def log_message(self, *_: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-hub", daemon=True)
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def downloads(self, repo_id: str) -> list[str]:
        """The files of `repo_id` whose bytes were asked for (GET on resolve), in order."""
        prefix = f"/{repo_id}/resolve/"
        with self._lock:
            asked = [
                path.removeprefix(prefix)
                for method, path in self.requests
                if method == "GET" and path.startswith(prefix)
            ]
        return [rest.split("/", 1)[1] for rest in asked]  # drop the revision

    def start(self) -> LocalHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ---------------------------------------------------------------------------------------------

    def _answer(self, req: BaseHTTPRequestHandler, *, head: bool) -> None:
        url = urlsplit(req.path)
        path = unquote(url.path)
        with self._lock:
            self.requests.append((req.command, path))
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        match = api or tree or resolve
        repo = self.repos.get(match.group(1)) if match else None
        if match is None or repo is None:
            return self._error(req, 404, "RepoNotFound", f"Repository not found: {path}")
        if match.group(2) not in (None, "main", repo.commit):
            return self._error(req, 404, "RevisionNotFound", f"Invalid rev id: {match.group(2)}")
        if api:
            siblings = [{"rfilename": f.path} for f in repo.files]
            return self._json(req, {"id": match.group(1), "sha": repo.commit, "siblings": siblings, "private": False})
        if tree:
            recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() == "true"
            return self._json(req, self._tree(repo, tree.group(3) or "", recursive))
        found = repo.file(match.group(3))
        if found is None:
            return self._error(req, 404, "EntryNotFound", f"Entry not found: {match.group(3)}")
        self._file(req, repo, found, head=head)

    def _tree(self, repo: HubRepo, under: str, recursive: bool) -> list[dict[str, Any]]:
        prefix = f"{under.strip('/')}/" if under.strip("/") else ""
        entries: dict[str, dict[str, Any]] = {}
        for f in repo.files:
            if not f.path.startswith(prefix):
                continue
            rest = f.path[len(prefix) :].split("/")
            for depth in range(1, len(rest)):  # the folders on the way
                folder = prefix + "/".join(rest[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "oid": "0" * 40, "size": 0, "path": folder})
            if recursive or len(rest) == 1:
                entry: dict[str, Any] = {"type": "file", "oid": f.blob_id, "size": f.size, "path": f.path}
                if f.sha256 is not None:
                    entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
                entries[f.path] = entry
        return list(entries.values())

    def _file(self, req: BaseHTTPRequestHandler, repo: HubRepo, f: HubFile, *, head: bool) -> None:
        data = (repo.folder / f.path).read_bytes()
        start = 0
        ranged = re.fullmatch(r"bytes=(\d+)-", req.headers.get("Range", ""))
        if ranged and not head:
            start = min(int(ranged.group(1)), len(data))
        req.send_response(206 if start else 200)
        req.send_header("X-Repo-Commit", repo.commit)
        req.send_header("ETag", f'"{f.etag}"')
        req.send_header("Accept-Ranges", "bytes")
        req.send_header("Content-Length", str(len(data) - start))
        if start:
            req.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        req.end_headers()
        if not head:
            req.wfile.write(data[start:])

    def _json(self, req: BaseHTTPRequestHandler, body: Any) -> None:
        data = json.dumps(body).encode()
        req.send_response(200)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if req.command != "HEAD":
            req.wfile.write(data)

    def _error(self, req: BaseHTTPRequestHandler, status: int, code: str, message: str) -> None:
        data = json.dumps({"error": message}).encode()
        req.send_response(status)
        req.send_header("X-Error-Code", code)
        req.send_header("X-Error-Message", message)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if req.command != "HEAD":
            req.wfile.write(data)


@contextmanager
def local_hub(repos: Mapping[str, Path]) -> Iterator[LocalHub]:
    """A running LocalHub over `repos`, stopped on exit."""
    hub = LocalHub(repos).start()
    try:
        yield hub
    finally:
        hub.stop()
