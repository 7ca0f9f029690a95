"""`pagoda-fetch` against local servers: the Hugging Face Hub emulation (hub_testkit.py), a plain file
server, moto's S3. The gguf case uses plain http:// on 127.0.0.1 through the fetcher's explicit
`--allow-http` flag.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hub_testkit import COMMIT, GGUF_BYTES, REPO, REPO_FILES, TOKEN, FakeHub

from pagoda_operator.fetch import COMPLETE_MARKER, local_model_path, main

Capsys = pytest.CaptureFixture[str]
MonkeyPatch = pytest.MonkeyPatch
# Written out by hand: what `pagoda serve` needs from this repository.
EXPECTED_SERVING_FILES = {
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "model.safetensors.index.json",
    "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
}


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
