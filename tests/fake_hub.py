"""A local HTTP server that speaks enough of the Hugging Face Hub protocol for downloads.

It serves real files from directories (a tiny model made by :mod:`tests.tiny_model`) with the
metadata ``huggingface_hub`` expects: ``/api/models/{repo}/revision/{rev}``,
``/api/models/{repo}/tree/{commit}``, ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` with
``Range``. Switches make a repo gated, add or drop revisions, slow the transfer down or make
every request fail, so error paths can be tested without the internet.

Usage as a script (for benchmarks)::

    python -m tests.fake_hub MODEL_DIR --repo org/name --port 8765
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".h5", ".msgpack")
INVALID_TOKEN_MESSAGE = "Invalid credentials in Authorization header"


def git_blob_sha1(data: bytes) -> str:
    """The git blob id of ``data`` (what the Hub reports as ``blobId``/``oid``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class RepoFile:
    """One file of a fake repo: where its bytes are and what the Hub says about it."""

    path: str
    source: Path
    size: int
    blob_id: str
    sha256: str | None  # set for LFS files

    @property
    def etag(self) -> str:
        """The ETag the Hub sends: the sha256 for LFS files, the git blob id otherwise."""
        return self.sha256 or self.blob_id


@dataclass
class FakeRepo:
    """A repo with one commit whose files come from ``source`` (read once, at creation)."""

    repo_id: str
    source: Path
    commit: str
    files: dict[str, RepoFile]
    branches: dict[str, str] = field(default_factory=dict)
    gated: bool = False


def load_repo(repo_id: str, source: Path, extra_files: dict[str, bytes] | None = None) -> FakeRepo:
    """Describe every file under ``source`` (plus ``extra_files``, written next to it)."""
    source = Path(source)
    files: dict[str, RepoFile] = {}
    for extra_name, content in (extra_files or {}).items():
        target = source / extra_name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        rel = path.relative_to(source).as_posix()
        if rel.startswith(".cache/"):
            continue
        data = path.read_bytes()
        is_lfs = rel.endswith(LFS_SUFFIXES)
        files[rel] = RepoFile(
            path=rel,
            source=path,
            size=len(data),
            blob_id=git_blob_sha1(data),
            sha256=hashlib.sha256(data).hexdigest() if is_lfs else None,
        )
    commit = hashlib.sha1(
        json.dumps({k: f.etag for k, f in files.items()}, sort_keys=True).encode()
    ).hexdigest()
    return FakeRepo(repo_id, source, commit, files, branches={"main": commit})


class FakeHub:
    """The server and its switches; use as a context manager or call start/stop.

    Attributes:
        repos: Served repositories by id.
        tokens: Tokens the Hub knows, mapped to the gated repos each may read.
        fail_status: When set, every request is answered with this status (Hub down).
        bytes_per_second: When set, file bodies are sent at about this rate.
        requests: Paths requested, in order (``"GET /api/..."``), for assertions.
    """

    def __init__(self, port: int = 0) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.tokens: dict[str, set[str]] = {}
        self.fail_status: int | None = None
        self.bytes_per_second: float | None = None
        self.requests: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler_for(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The endpoint to put in ``HF_ENDPOINT``."""
        port = self._server.server_address[1]
        return f"http://127.0.0.1:{port}"

    def add_repo(
        self,
        repo_id: str,
        source: Path,
        *,
        gated: bool = False,
        extra_files: dict[str, bytes] | None = None,
    ) -> FakeRepo:
        """Serve the files under ``source`` as ``repo_id`` (branch ``main``)."""
        repo = load_repo(repo_id, source, extra_files)
        repo.gated = gated
        self.repos[repo_id] = repo
        return repo

    def grant(self, token: str, *repo_ids: str) -> None:
        """Make ``token`` valid, with access to the gated ``repo_ids``."""
        self.tokens.setdefault(token, set()).update(repo_ids)

    def start(self) -> FakeHub:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_API_REVISION = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>.+)$")
_API_MODEL = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)$")
_API_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass  # keep test output clean

        def do_GET(self) -> None:  # noqa: N802
            self._dispatch(head=False)

        def do_HEAD(self) -> None:  # noqa: N802
            self._dispatch(head=True)

        def _send(
            self,
            status: int,
            body: bytes = b"",
            headers: dict[str, str] | None = None,
            head: bool = False,
        ) -> None:
            self.send_response(status)
            all_headers = {"Content-Length": str(len(body)), **(headers or {})}
            for key, value in all_headers.items():
                self.send_header(key, value)
            self.end_headers()
            if not head and body:
                self.wfile.write(body)

        def _error(self, status: int, code: str | None, message: str, head: bool) -> None:
            headers = {"Content-Type": "application/json", "X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, json.dumps({"error": message}).encode(), headers, head)

        def _json(self, data: object, head: bool) -> None:
            self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json"}, head)

        def _authorize(self, repo: FakeRepo, head: bool, gate: bool) -> bool:
            auth = self.headers.get("Authorization", "")
            token = auth[7:] if auth.startswith("Bearer ") else None
            if token is not None and token not in hub.tokens:
                self._error(401, None, INVALID_TOKEN_MESSAGE, head)
                return False
            if not (repo.gated and gate):
                return True
            if token is None:
                self._error(401, "GatedRepo", "Access to this model is restricted", head)
                return False
            if repo.repo_id not in hub.tokens[token]:
                self._error(403, "GatedRepo", "Access to this model is restricted", head)
                return False
            return True

        def _lookup(self, repo_id: str, rev: str, head: bool,
                    gate: bool = False) -> FakeRepo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found", head)
                return None
            if not self._authorize(repo, head, gate):
                return None
            if rev != repo.commit and rev not in repo.branches:
                self._error(404, "RevisionNotFound", "Invalid rev id: " + rev, head)
                return None
            return repo

        def _dispatch(self, head: bool) -> None:
            split = urlsplit(self.path)
            path = unquote(split.path)
            hub.requests.append(f"{self.command} {path}")
            if hub.fail_status is not None:
                self._error(hub.fail_status, None, "Service unavailable", head)
                return
            if match := _API_REVISION.match(path):
                repo = self._lookup(match["repo"], match["rev"], head)
                if repo:
                    self._json(_model_info(repo, with_blobs="blobs=true" in split.query), head)
            elif match := _API_MODEL.match(path):
                repo = self._lookup(match["repo"], "main", head)
                if repo:
                    self._json(_model_info(repo, with_blobs="blobs=true" in split.query), head)
            elif match := _API_TREE.match(path):
                repo = self._lookup(match["repo"], match["rev"], head)
                if repo:
                    self._json(_tree(repo, match["sub"] or ""), head)
            elif match := _RESOLVE.match(path):
                # As on the real Hub, a gated repo's metadata is public; its files are not.
                repo = self._lookup(match["repo"], match["rev"], head, gate=True)
                if repo:
                    self._file(repo, match["path"], head)
            else:
                self._error(404, None, "Not found", head)

        def _file(self, repo: FakeRepo, path: str, head: bool) -> None:
            entry = repo.files.get(path)
            if entry is None:
                self._error(404, "EntryNotFound", f"{path} does not exist", head)
                return
            headers = {
                "X-Repo-Commit": repo.commit,
                "ETag": f'"{entry.etag}"',
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
            }
            if head:
                self._send(200, b"", {**headers, "Content-Length": str(entry.size)}, head=True)
                return
            data = entry.source.read_bytes()
            start = 0
            status = 200
            range_header = self.headers.get("Range")
            if range_header and (m := re.match(r"bytes=(\d+)-", range_header)):
                start = int(m.group(1))
                status = 206
                headers["Content-Range"] = f"bytes {start}-{entry.size - 1}/{entry.size}"
            body = data[start:]
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            self._write_body(body)

        def _write_body(self, body: bytes) -> None:
            rate = hub.bytes_per_second
            chunk = 1 << 20 if rate is None else max(1024, int(rate / 20))
            try:
                for offset in range(0, len(body), chunk):
                    self.wfile.write(body[offset : offset + chunk])
                    if rate is not None:
                        time.sleep(chunk / rate)
            except (BrokenPipeError, ConnectionResetError):
                pass

    return Handler


def _model_info(repo: FakeRepo, with_blobs: bool) -> dict[str, object]:
    siblings: list[dict[str, object]] = []
    for entry in repo.files.values():
        sibling: dict[str, object] = {"rfilename": entry.path}
        if with_blobs:
            sibling["size"] = entry.size
            sibling["blobId"] = entry.blob_id
            if entry.sha256:
                sibling["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": 134}
        siblings.append(sibling)
    return {
        "id": repo.repo_id,
        "modelId": repo.repo_id,
        "sha": repo.commit,
        "private": False,
        "gated": "manual" if repo.gated else False,
        "siblings": siblings,
        "tags": [],
    }


def _tree(repo: FakeRepo, sub: str) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for entry in repo.files.values():
        if sub and not entry.path.startswith(sub.rstrip("/") + "/"):
            continue
        item: dict[str, object] = {
            "type": "file",
            "path": entry.path,
            "size": entry.size,
            "oid": entry.blob_id,
        }
        if entry.sha256:
            item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": 134}
        out.append(item)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve a model directory as a fake Hub repo.")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--repo", default="test-org/tiny-model")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    hub = FakeHub(args.port)
    hub.add_repo(args.repo, args.model_dir)
    hub.start()
    print(hub.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        hub.stop()


if __name__ == "__main__":
    main()
