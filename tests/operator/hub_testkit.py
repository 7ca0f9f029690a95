"""A Hugging Face Hub emulation on localhost, shared by the fetcher's and the operator's tests.

It speaks the endpoints the real Hub serves (`/api/models/{repo}/revision/{rev}`, `/api/models/{repo}/tree/
{rev}`, `/{repo}/resolve/{rev}/{file}` with a redirect of LFS files to a CDN host); test_fetch.py's
`test_hub_emulation_serves_huggingface_hub` holds it to the official `huggingface_hub` client. The CDN lives
on `localhost` and the Hub on `127.0.0.1`, two different hosts, so a test can see whether a token leaks
across the redirect. One repository, REPO, whose branches (`refs`) a test may move to another commit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REPO = "pagoda-test/tiny-llama"
COMMIT = "4b1f0c3e2d9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c"
TOKEN = "hf_test_token_123"


def _blob(seed: str, size: int) -> bytes:
    """Deterministic pseudo-random bytes, so a wrong offset in a resumed download shows up."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


REPO_FILES: dict[str, bytes] = {
    ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
    "README.md": b"# tiny llama\n",
    "config.json": b'{"model_type": "llama", "hidden_size": 64}\n',
    "generation_config.json": b'{"eos_token_id": 2}\n',
    "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}\n',
    "tokenizer_config.json": b'{"tokenizer_class": "PreTrainedTokenizerFast"}\n',
    "special_tokens_map.json": b'{"eos_token": "</s>"}\n',
    "chat_template.jinja": b"{% for m in messages %}{{ m.content }}{% endfor %}",
    "model.safetensors.index.json": b'{"weight_map": {}}\n',
    "model-00001-of-00002.safetensors": _blob("shard1", 300_000),
    "model-00002-of-00002.safetensors": _blob("shard2", 120_001),
    "pytorch_model.bin": _blob("bin", 1000),
    "onnx/model.safetensors": _blob("onnx", 1000),
}
LFS_SUFFIXES = (".safetensors", ".bin")


@dataclass
class Seen:
    method: str
    host: str
    path: str
    headers: dict[str, str]


@dataclass
class FakeHub:
    """State shared by the handler threads: what is served, and every request seen."""

    port: int = 0
    require_token: bool = False
    corrupt_blobs: bool = False
    # The branches and tags of REPO and the commit each names now; a test may move one.
    refs: dict[str, str] = field(default_factory=lambda: {"main": COMMIT})
    # Set: the model-info API answers this HTTP status (an outage, a rate limit).
    api_failure: int | None = None
    requests: list[Seen] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests_to(self, path_prefix: str) -> list[Seen]:
        return [r for r in self.requests if r.path.startswith(path_prefix)]

    def commit_of(self, revision: str) -> str | None:
        """The commit a branch, tag or commit id names; None for an unknown revision."""
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in {COMMIT, *self.refs.values()} else None


def _is_lfs(name: str) -> bool:
    return name.endswith(LFS_SUFFIXES)


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _sibling(name: str, data: bytes, with_blobs: bool) -> dict:
    if not with_blobs:
        return {"rfilename": name}
    sibling = {"rfilename": name, "size": len(data), "blobId": _git_blob_id(data)}
    if _is_lfs(name):
        sibling["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return sibling


def _make_handler(hub: FakeHub, files_by_path: dict[str, bytes]) -> type[BaseHTTPRequestHandler]:
    blobs_by_sha = {hashlib.sha256(d).hexdigest(): d for n, d in REPO_FILES.items() if _is_lfs(n)}
    api_re = re.compile(rf"^/api/models/{re.escape(REPO)}/revision/([^/?]+)(\?.*)?$")
    tree_re = re.compile(rf"^/api/models/{re.escape(REPO)}/tree/([^/?]+)(\?.*)?$")
    resolve_re = re.compile(rf"^/{re.escape(REPO)}/resolve/([^/]+)/(.+)$")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

        def do_HEAD(self) -> None:
            self.route(send_body=False)

        def do_GET(self) -> None:
            self.route(send_body=True)

        def route(self, send_body: bool) -> None:
            host = self.headers.get("Host", "")
            hub.requests.append(Seen(self.command, host, self.path, dict(self.headers)))
            if self.path.startswith("/cdn/"):
                return self.send_blob(blobs_by_sha.get(self.path.removeprefix("/cdn/")), send_body)
            if self.path in files_by_path:
                return self.send_blob(files_by_path[self.path], send_body)
            if hub.require_token and self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self.send_json(401, {"error": "Invalid credentials in Authorization header"})
            if match := api_re.match(self.path):
                if hub.api_failure is not None:
                    return self.send_json(hub.api_failure, {"error": "Service unavailable"})
                return self.send_repo_info(match.group(1), "blobs=true" in (match.group(2) or ""))
            if match := tree_re.match(self.path):
                return self.send_tree(match.group(1))
            if match := resolve_re.match(self.path):
                return self.send_resolve(match.group(1), match.group(2), send_body)
            self.send_json(404, {"error": "Repository not found"}, error_code="RepoNotFound")

        def send_json(self, status: int, body: dict | list, error_code: str | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if error_code:
                self.send_header("X-Error-Code", error_code)
            self.end_headers()
            self.wfile.write(data)

        def send_repo_info(self, revision: str, with_blobs: bool) -> None:
            commit = hub.commit_of(urllib.parse.unquote(revision))
            if commit is None:
                return self.send_json(404, {"error": f"Invalid rev id: {revision}"}, "RevisionNotFound")
            siblings = [_sibling(n, d, with_blobs) for n, d in REPO_FILES.items()]
            self.send_json(200, {"id": REPO, "modelId": REPO, "sha": commit, "private": False,
                                 "siblings": siblings})

        def send_tree(self, revision: str) -> None:
            """The recursive tree listing that newer huggingface_hub clients use instead of `siblings`."""
            if hub.commit_of(revision) is None:
                return self.send_json(404, {"error": f"Invalid rev id: {revision}"}, "RevisionNotFound")
            entries: list[dict] = [{"type": "directory", "oid": "0" * 40, "size": 0, "path": "onnx"}]
            for name, data in REPO_FILES.items():
                entry = {"type": "file", "oid": _git_blob_id(data), "size": len(data), "path": name}
                if _is_lfs(name):
                    sha = hashlib.sha256(data).hexdigest()
                    entry["lfs"] = {"oid": sha, "size": len(data), "pointerSize": 134}
                entries.append(entry)
            self.send_json(200, entries)

        def send_resolve(self, revision: str, name: str, send_body: bool) -> None:
            data = REPO_FILES.get(name)
            if hub.commit_of(revision) is None or data is None:
                return self.send_json(404, {"error": "Entry not found"}, "EntryNotFound")
            if not _is_lfs(name):
                return self.send_blob(data, send_body, etag=_git_blob_id(data))
            sha = hashlib.sha256(data).hexdigest()
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{hub.port}/cdn/{sha}")
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("X-Linked-Etag", f'"{sha}"')
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("ETag", f'"{_git_blob_id(data)}"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        def send_blob(self, data: bytes | None, send_body: bool, etag: str | None = None) -> None:
            if data is None:
                return self.send_json(404, {"error": "Not found"})
            if hub.corrupt_blobs and len(data) > 10_000:
                data = data[:-1] + bytes([data[-1] ^ 0xFF])
            start = 0
            if match := re.match(r"bytes=(\d+)-$", self.headers.get("Range", "")):
                start = int(match.group(1))
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{etag or hashlib.sha256(data).hexdigest()}"')
            self.send_header("X-Repo-Commit", COMMIT)
            self.end_headers()
            if send_body:
                self.wfile.write(data[start:])

    return Handler


GGUF_BYTES = b"GGUF" + _blob("gguf", 50_000)


@contextlib.contextmanager
def serve_hub() -> Iterator[FakeHub]:
    """The Hub emulation on a free port of 127.0.0.1 (the CDN on localhost), for one test."""
    state = FakeHub()
    handler = _make_handler(state, {"/files/tiny.Q4_1.gguf": GGUF_BYTES})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
