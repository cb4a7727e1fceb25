"""A Hugging Face Hub on loopback serving one model repository, so that `huggingface_hub` itself downloads
from it and lays out its cache, with nothing fetched from the internet.

It answers the three calls `snapshot_download` makes: the revision's info
(`/api/models/{repo}/revision/{rev}`), its file tree (`/api/models/{repo}/tree/{commit}`)
and each file (`/{repo}/resolve/{commit}/{path}`, HEAD then GET). It records the paths
fetched and the Authorization headers seen.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeHub:
    repo_id: str
    files: dict[str, bytes]  # path in the repository → content
    revisions: tuple[str, ...] = ("main",)
    fetched: list[str] = field(default_factory=list)
    authorizations: set[str] = field(default_factory=set)
    url: str = ""


def repo_files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@contextmanager
def fake_hub(repo_id: str, files: dict[str, bytes], revisions: tuple[str, ...] = ("main",)) -> Iterator[FakeHub]:
    hub = FakeHub(repo_id, files, revisions)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            if self.headers.get("Authorization"):
                hub.authorizations.add(self.headers["Authorization"])
            path = unquote(urlparse(self.path).path)
            info = f"/api/models/{repo_id}/revision/"
            tree = f"/api/models/{repo_id}/tree/{COMMIT}"
            resolve = f"/{repo_id}/resolve/"
            if path.startswith(info) and path[len(info):] in (*revisions, COMMIT):
                siblings = [{"rfilename": name} for name in files]
                self._send(json.dumps({"id": repo_id, "sha": COMMIT, "siblings": siblings}).encode(), body)
            elif path.rstrip("/") == tree:
                entries = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                           for name, data in files.items()]
                self._send(json.dumps(entries).encode(), body)
            elif path.startswith(resolve):
                revision, _, name = path[len(resolve):].partition("/")
                if revision not in (*revisions, COMMIT) or name not in files:
                    return self._send(b'{"error": "Entry not found"}', body, status=404, error="EntryNotFound")
                if body:
                    hub.fetched.append(name)
                data = files[name]
                self._send(data, body, headers={"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'})
            else:
                self._send(b'{"error": "Repository not found"}', body, status=404, error="RepoNotFound")

        def _send(self, data: bytes, body: bool, status: int = 200, headers: dict | None = None, error: str | None = None) -> None:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if error:
                self.send_header("X-Error-Code", error)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
