"""`pagoda-fetch` against local servers: a Hugging Face Hub emulation, a plain file server, moto's S3.

The Hub emulation speaks the endpoints the real Hub serves (`/api/models/{repo}/revision/{rev}`,
`/{repo}/resolve/{rev}/{file}` with a redirect of LFS files to a CDN host); `test_hub_emulation_serves_
huggingface_hub` checks that the official `huggingface_hub` client downloads the same bytes from it, so
the emulation is held to the real client and not only to our fetcher. The CDN lives on `localhost` and the
Hub on `127.0.0.1`, two different hosts, so the test can see whether the token leaks across the redirect.
The gguf case uses plain http:// on 127.0.0.1 through the fetcher's explicit `--allow-http` flag.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pagoda_operator.fetch import COMPLETE_MARKER, local_model_path, main

Capsys = pytest.CaptureFixture[str]
MonkeyPatch = pytest.MonkeyPatch
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
# Written out by hand: what `pagoda serve` needs from this repository.
EXPECTED_SERVING_FILES = {
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "model.safetensors.index.json",
    "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
}


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
    requests: list[Seen] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests_to(self, path_prefix: str) -> list[Seen]:
        return [r for r in self.requests if r.path.startswith(path_prefix)]


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
            if revision not in ("main", COMMIT):
                return self.send_json(404, {"error": f"Invalid rev id: {revision}"}, "RevisionNotFound")
            siblings = [_sibling(n, d, with_blobs) for n, d in REPO_FILES.items()]
            self.send_json(200, {"id": REPO, "modelId": REPO, "sha": COMMIT, "private": False,
                                 "siblings": siblings})

        def send_tree(self, revision: str) -> None:
            """The recursive tree listing that newer huggingface_hub clients use instead of `siblings`."""
            if revision not in ("main", COMMIT):
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
            if revision not in ("main", COMMIT) or data is None:
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


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    state = FakeHub()
    handler = _make_handler(state, {"/files/tiny.Q4_1.gguf": GGUF_BYTES})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def no_hf_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


def run_fetch(capsys: Capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out.strip(), captured.err


# ------------------------------------------------------------------------------------------- paths


def test_local_model_path_layout() -> None:
    url = "https://example.com/models/tiny%20model.Q4_1.gguf?download=true"
    url_digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    assert local_model_path("hf://Qwen/Qwen2.5-0.5B", None) == "/models/hf/Qwen/Qwen2.5-0.5B/main"
    assert local_model_path("hf://Qwen/Qwen2.5-0.5B", "refs/pr/1", "/c") == \
        "/c/hf/Qwen/Qwen2.5-0.5B/refs--pr--1"
    assert local_model_path("hf://gpt2", "v1") == "/models/hf/gpt2/v1"
    assert local_model_path(url, None) == f"/models/https/{url_digest}/tiny model.Q4_1.gguf"
    assert local_model_path("s3://bucket/llama/8b/", None) == "/models/s3/bucket/llama/8b"
    assert local_model_path("pvc://weights/llama/8b", None) == "/models/pvc/llama/8b"
    assert local_model_path("builtin://smollm2-135m-instruct", None) is None


@pytest.mark.parametrize("bad", ["ftp://host/file", "hf://a/b/c", "builtin://gpt5", "s3://bucket",
                                 "pvc://claim", "https://host/dir/", "hf://org/../etc", "/models/x"])
def test_bad_sources_exit_non_zero(bad: str, tmp_path: Path, capsys: Capsys) -> None:
    code, out, err = run_fetch(capsys, "--source", bad, "--cache-root", str(tmp_path))
    assert code == 1 and out == ""
    assert "pagoda-fetch: error:" in err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------- hf://


def test_hf_fetch_downloads_serving_files_once(
        hub: FakeHub, tmp_path: Path, capsys: Capsys) -> None:
    code, out, _ = run_fetch(capsys, "--source", f"hf://{REPO}", "--cache-root", str(tmp_path),
                             "--endpoint", hub.endpoint)
    assert code == 0
    model_dir = tmp_path / "hf" / REPO / "main"
    assert out == str(model_dir)
    assert {p.name for p in model_dir.iterdir()} == EXPECTED_SERVING_FILES | {COMPLETE_MARKER}
    for name in EXPECTED_SERVING_FILES:
        assert (model_dir / name).read_bytes() == REPO_FILES[name], name
    # Weights were pinned to the commit the branch named, and came from the CDN after the redirect.
    resolves = hub.requests_to(f"/{REPO}/resolve/")
    assert {r.path.split("/")[4] for r in resolves} == {COMMIT}
    assert len(hub.requests_to("/cdn/")) == 2

    seen_before = len(hub.requests)
    code, out_again, _ = run_fetch(capsys, "--source", f"hf://{REPO}", "--cache-root", str(tmp_path),
                                   "--endpoint", hub.endpoint)
    assert (code, out_again) == (0, out)
    assert len(hub.requests) == seen_before, "the second run must not touch the network"


def test_hub_emulation_serves_huggingface_hub(
        hub: FakeHub, tmp_path: Path, monkeypatch: MonkeyPatch, capsys: Capsys) -> None:
    """The official client downloads the same bytes from the emulated Hub as pagoda-fetch does."""
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    from huggingface_hub import snapshot_download

    reference_dir = Path(snapshot_download(REPO, revision="main", endpoint=hub.endpoint,
                                           cache_dir=tmp_path / "hf-cache",
                                           allow_patterns=sorted(EXPECTED_SERVING_FILES)))
    code, out, _ = run_fetch(capsys, "--source", f"hf://{REPO}", "--cache-root", str(tmp_path / "ours"),
                             "--endpoint", hub.endpoint)
    assert code == 0
    for name in EXPECTED_SERVING_FILES:
        assert (Path(out) / name).read_bytes() == (reference_dir / name).read_bytes(), name


def test_hf_token_goes_to_the_hub_only(
        hub: FakeHub, tmp_path: Path, monkeypatch: MonkeyPatch, capsys: Capsys) -> None:
    hub.require_token = True
    code, _, err = run_fetch(capsys, "--source", f"hf://{REPO}", "--cache-root", str(tmp_path),
                             "--endpoint", hub.endpoint)
    assert code == 1 and "401" in err and "HF_TOKEN" in err

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    code, _, _ = run_fetch(capsys, "--source", f"hf://{REPO}", "--revision", COMMIT,
                           "--cache-root", str(tmp_path))
    assert code == 0
    assert (tmp_path / "hf" / REPO / COMMIT / "config.json").read_bytes() == REPO_FILES["config.json"]
    hub_requests = [r for r in hub.requests if not r.path.startswith("/cdn/")]
    assert all(r.headers.get("Authorization") == f"Bearer {TOKEN}" for r in hub_requests[1:])
    cdn_requests = hub.requests_to("/cdn/")
    assert cdn_requests and all(r.host.startswith("localhost") for r in cdn_requests)
    assert all("Authorization" not in r.headers for r in cdn_requests), "token leaked to the CDN host"


def test_hf_fetch_resumes_a_partial_download(
        hub: FakeHub, tmp_path: Path, capsys: Capsys) -> None:
    shard = "model-00001-of-00002.safetensors"
    model_dir = tmp_path / "hf" / REPO / "main"
    model_dir.mkdir(parents=True)
    (model_dir / f"{shard}.part").write_bytes(REPO_FILES[shard][:123_456])

    code, _, _ = run_fetch(capsys, "--source", f"hf://{REPO}", "--cache-root", str(tmp_path),
                           "--endpoint", hub.endpoint)
    assert code == 0
    assert (model_dir / shard).read_bytes() == REPO_FILES[shard]
    ranges = [r.headers.get("Range") for r in hub.requests_to("/cdn/")]
    assert "bytes=123456-" in ranges
    assert not list(model_dir.glob("*.part"))


def test_hf_corrupt_weights_are_rejected(hub: FakeHub, tmp_path: Path, capsys: Capsys) -> None:
    hub.corrupt_blobs = True
    code, out, err = run_fetch(capsys, "--source", f"hf://{REPO}", "--cache-root", str(tmp_path),
                               "--endpoint", hub.endpoint)
    assert code == 1 and out == ""
    assert "sha256 mismatch" in err
    model_dir = tmp_path / "hf" / REPO / "main"
    assert not (model_dir / COMPLETE_MARKER).exists()
    assert not list(model_dir.glob("*.safetensors")) and not list(model_dir.glob("*.part"))


@pytest.mark.parametrize(("source", "revision", "expected"), [
    ("hf://pagoda-test/does-not-exist", None, "/api/models/pagoda-test/does-not-exist/revision/main"),
    (f"hf://{REPO}", "no-such-branch", "no-such-branch"),
])
def test_hf_missing_repo_or_revision_is_a_clear_error(
        hub: FakeHub, tmp_path: Path, capsys: Capsys,
        source: str, revision: str | None, expected: str) -> None:
    args = ["--source", source, "--cache-root", str(tmp_path), "--endpoint", hub.endpoint]
    code, out, err = run_fetch(capsys, *args, *(["--revision", revision] if revision else []))
    assert code == 1 and out == ""
    assert "HTTP 404" in err and expected in err
    assert not any(p.is_file() and not p.name.endswith(".lock") for p in tmp_path.rglob("*"))


# ------------------------------------------------------------------------------ https:// (gguf)


def test_gguf_url_downloads_once(hub: FakeHub, tmp_path: Path, capsys: Capsys) -> None:
    url = f"http://127.0.0.1:{hub.port}/files/tiny.Q4_1.gguf"
    code, out, err = run_fetch(capsys, "--source", url, "--cache-root", str(tmp_path))
    assert code == 1 and "http://" in err and not hub.requests, "plain http needs --allow-http"

    code, out, _ = run_fetch(capsys, "--source", url, "--cache-root", str(tmp_path), "--allow-http")
    assert code == 0
    assert out == str(tmp_path / "http" / hashlib.sha256(url.encode()).hexdigest()[:16] / "tiny.Q4_1.gguf")
    assert Path(out).read_bytes() == GGUF_BYTES
    assert len(hub.requests) == 1

    code, out_again, _ = run_fetch(capsys, "--source", url, "--cache-root", str(tmp_path), "--allow-http")
    assert (code, out_again) == (0, out) and len(hub.requests) == 1


def test_gguf_url_404(hub: FakeHub, tmp_path: Path, capsys: Capsys) -> None:
    url = f"http://127.0.0.1:{hub.port}/files/missing.gguf"
    code, out, err = run_fetch(capsys, "--source", url, "--cache-root", str(tmp_path), "--allow-http")
    assert code == 1 and out == ""
    assert f"GET {url}: HTTP 404" in err


# ----------------------------------------------------------------------------------- pvc, builtin


def test_pvc_source_is_the_mounted_path(tmp_path: Path, capsys: Capsys) -> None:
    code, _, err = run_fetch(capsys, "--source", "pvc://weights/llama", "--cache-root", str(tmp_path))
    assert code == 1 and "mounted" in err
    (tmp_path / "pvc" / "llama").mkdir(parents=True)
    code, out, _ = run_fetch(capsys, "--source", "pvc://weights/llama", "--cache-root", str(tmp_path))
    assert (code, out) == (0, str(tmp_path / "pvc" / "llama"))


def test_builtin_source_fetches_nothing(tmp_path: Path, capsys: Capsys) -> None:
    code, out, _ = run_fetch(capsys, "--source", "builtin://smollm2-135m-instruct",
                             "--cache-root", str(tmp_path))
    assert (code, out) == (0, "")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- s3://


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    from moto.server import ThreadedMotoServer  # moto[s3] + flask + flask-cors, from requirements-test.txt

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def test_s3_object_and_prefix(s3_endpoint: str, tmp_path: Path, capsys: Capsys) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="models")
    s3.put_object(Bucket="models", Key="gguf/tiny.Q4_1.gguf", Body=GGUF_BYTES)
    for name in ("config.json", "tokenizer.json", "model-00001-of-00002.safetensors"):
        s3.put_object(Bucket="models", Key=f"llama/{name}", Body=REPO_FILES[name])

    code, out, _ = run_fetch(capsys, "--source", "s3://models/gguf/tiny.Q4_1.gguf",
                             "--cache-root", str(tmp_path), "--endpoint", s3_endpoint)
    assert code == 0 and out == str(tmp_path / "s3" / "models" / "gguf" / "tiny.Q4_1.gguf")
    assert Path(out).read_bytes() == GGUF_BYTES

    code, out, _ = run_fetch(capsys, "--source", "s3://models/llama/", "--cache-root", str(tmp_path),
                             "--endpoint", s3_endpoint)
    assert code == 0 and out == str(tmp_path / "s3" / "models" / "llama")
    for name in ("config.json", "tokenizer.json", "model-00001-of-00002.safetensors"):
        assert (Path(out) / name).read_bytes() == REPO_FILES[name]
    assert (Path(out) / COMPLETE_MARKER).exists()

    code, _, err = run_fetch(capsys, "--source", "s3://models/nothing-here", "--cache-root", str(tmp_path),
                             "--endpoint", s3_endpoint)
    assert code == 1 and "s3://models/nothing-here" in err and "404" in err
    assert not os.path.exists(tmp_path / "s3" / "models" / "nothing-here")
