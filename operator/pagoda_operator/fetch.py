"""Model fetcher run by the engine pod's init container: `pagoda-fetch --source URI`.

It downloads a model once into the shared model cache and prints the path that `pagoda serve` loads.
Cache layout under the cache root (default `/models`, the cache volume the operator mounts):

    hf://org/name  (+ revision)        -> <root>/hf/org/name/<revision or "main">/   (a Hugging Face dir)
    https://host/dir/model.gguf         -> <root>/https/<sha256(url)[:16]>/model.gguf
    s3://bucket/key                     -> <root>/s3/bucket/key   (one object, or every object under key/)
    pvc://claim/path                    -> <root>/pvc/path        (the operator mounts `claim` at <root>/pvc)
    builtin://smollm2-135m-instruct     -> None: `pagoda serve` with no model argument

`local_model_path` is pure, so the operator computes the same path for the serving container's argument.
The operator passes the commit an hf:// branch named when it was resolved (revision.py), so every pod of
one LLMDeployment fetches and serves one commit, from a cache directory of its own.

Downloads are crash-safe and resumable: bytes go to `<name>.part` (continued with an HTTP Range request
after a restart), the finished file is renamed into place atomically, and a directory is only marked
complete (`.pagoda-complete`) after its last file landed. A failed fetch exits non-zero; Kubernetes
restarts the init container with back-off and the next attempt resumes, so there is no retry loop here.
A lock file serialises pods that share one ReadWriteMany cache volume.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import fnmatch
import functools
import hashlib
import http.client
import json
import os
import posixpath
import re
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

DEFAULT_CACHE_ROOT = "/models"
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
COMPLETE_MARKER = ".pagoda-complete"
BUILTIN_MODELS = frozenset({"smollm2-135m-instruct"})
# What `pagoda serve` reads from a Hugging Face directory; everything else (README, other framework
# weights, ONNX/GGUF variants in sub-folders) is skipped. Only top-level files are considered.
SERVING_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "*.jinja",
    "*.safetensors",
    "*.safetensors.index.json",
)
CHUNK_BYTES = 1 << 20
HTTP_TIMEOUT_S = 60.0
USER_AGENT = "pagoda-fetch/0.1"


class FetchError(Exception):
    """A fetch that cannot succeed as asked: bad URI, missing repository, file or object."""


@dataclass(frozen=True)
class ModelSource:
    """A parsed model URI: `scheme://netloc/path`."""

    scheme: str
    netloc: str
    path: str  # without the leading "/"
    uri: str

    @classmethod
    def parse(cls, uri: str) -> ModelSource:
        try:
            parts = urllib.parse.urlsplit(uri)
            parts.port  # noqa: B018 - range-checks the port
        except ValueError as error:  # "Invalid IPv6 URL" (https://[host/...), a port out of range
            raise FetchError(f"model source {uri!r} is not a valid URL: {error}") from None
        if parts.scheme not in ("hf", "https", "http", "s3", "pvc", "builtin") or not parts.netloc:
            raise FetchError(f"unsupported model source {uri!r}: expected hf://, https://, s3://, pvc:// or builtin://")
        path = parts.path.lstrip("/")
        if ".." in path.split("/"):
            raise FetchError(f"model source {uri!r} must not contain '..'")
        return cls(parts.scheme, parts.netloc, path, uri)


def local_model_path(source: str, revision: str | None, cache_root: str = DEFAULT_CACHE_ROOT) -> str | None:
    """The path `pagoda serve` loads for `source` (see the module docstring); None for builtin models."""
    parsed = ModelSource.parse(source)
    root = Path(cache_root)
    match parsed.scheme:
        case "builtin":
            if parsed.netloc not in BUILTIN_MODELS:
                raise FetchError(f"unknown builtin model {parsed.netloc!r}: known: {sorted(BUILTIN_MODELS)}")
            return None
        case "hf":
            # A branch like "refs/pr/1" must stay one directory level.
            return str(root / "hf" / hf_repo_id(parsed) / (revision or "main").replace("/", "--"))
        case "https" | "http":
            file_name = posixpath.basename(urllib.parse.unquote(parsed.path))
            if not file_name or "\x00" in file_name:  # %00: no file can be called that
                raise FetchError(f"{source!r} does not name a file")
            url_digest = hashlib.sha256(source.encode()).hexdigest()[:16]
            return str(root / parsed.scheme / url_digest / file_name)
        case "s3":
            if not parsed.path.strip("/"):
                raise FetchError(f"{source!r} needs a key: s3://bucket/key")
            return str(root / "s3" / parsed.netloc / parsed.path.strip("/"))
        case _:  # pvc
            if not parsed.path:
                raise FetchError(f"{source!r} needs a path inside the claim: pvc://claim/path")
            return str(root / "pvc" / parsed.path)


def hf_repo_id(source: ModelSource) -> str:
    repo_id = f"{source.netloc}/{source.path}".rstrip("/")
    if repo_id.count("/") > 1:
        raise FetchError(f"{source.uri!r}: a Hugging Face repository id is 'org/name'")
    return repo_id


def is_serving_file(repo_file: str) -> bool:
    return "/" not in repo_file and any(fnmatch.fnmatch(repo_file, p) for p in SERVING_FILE_PATTERNS)


# ---------------------------------------------------------------------------------------------- HTTP


class _SameHostAuthRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but send the Authorization header only to the host it was meant for.

    The Hub answers `resolve` with a redirect to a CDN holding pre-signed URLs; a token sent there would
    leak and can make the CDN reject the request (the same rule as `requests` and `huggingface_hub`).
    """

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
                         headers: http.client.HTTPMessage, newurl: str) -> urllib.request.Request | None:
        new_req = super().redirect_request(req, fp, code, msg, headers, newurl)
        same_host = urllib.parse.urlsplit(newurl).netloc == urllib.parse.urlsplit(req.full_url).netloc
        if new_req is not None and not same_host:
            new_req.remove_header("Authorization")
        return new_req


@functools.cache
def opener() -> urllib.request.OpenerDirector:
    """Built on first use: building reads the proxy settings from the environment, never at import."""
    return urllib.request.build_opener(_SameHostAuthRedirectHandler)


def http_get(url: str, headers: Mapping[str, str], timeout: float = HTTP_TIMEOUT_S) -> Any:
    """Open `url` (redirects followed); HTTP errors become a FetchError that names the URL and status."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **headers})
    try:
        return opener().open(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        hint = " (a private or gated repository needs HF_TOKEN)" if err.code in (401, 403) else ""
        raise FetchError(f"GET {url}: HTTP {err.code} {err.reason}{hint}") from None
    except urllib.error.URLError as err:
        raise FetchError(f"GET {url}: {err.reason}") from None
    except (TimeoutError, ConnectionError) as err:  # raised past urllib's wrapping, e.g. a read timeout
        raise FetchError(f"GET {url}: {err}") from None


def download_file(url: str, dest: Path, headers: Mapping[str, str], expected_size: int | None = None,
                  expected_sha256: str | None = None) -> None:
    """Stream `url` into `dest` via `dest.part`, resuming a partial download left by an earlier attempt."""
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset > expected_size:
        offset = 0
    range_header = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = http_get(url, {**headers, **range_header})
    except FetchError:
        if not offset:
            raise
        part.unlink()  # e.g. 416: the partial file does not fit the remote one any more; start over
        response = http_get(url, headers)
        offset = 0
    with response, open(part, "ab" if response.status == 206 else "wb") as out:
        shutil.copyfileobj(response, out, CHUNK_BYTES)
        out.flush()
        os.fsync(out.fileno())
    verify_download(part, url, expected_size, expected_sha256)
    os.replace(part, dest)


def verify_download(part: Path, url: str, expected_size: int | None, expected_sha256: str | None) -> None:
    size = part.stat().st_size
    if expected_size is not None and size != expected_size:
        part.unlink()
        raise FetchError(f"{url}: got {size} bytes, expected {expected_size}")
    if expected_sha256 is not None and file_sha256(part) != expected_sha256:
        part.unlink()
        raise FetchError(f"{url}: sha256 mismatch, the download is corrupt")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ fetchers


@dataclass(frozen=True)
class HubFile:
    """One file of a Hub repository listing, with the integrity data the Hub publishes for it."""

    name: str
    size: int | None
    sha256: str | None  # only LFS files (weights) carry one

    @classmethod
    def from_sibling(cls, sibling: Mapping[str, Any]) -> HubFile:
        lfs = sibling.get("lfs") or {}
        return cls(sibling["rfilename"], lfs.get("size", sibling.get("size")), lfs.get("sha256"))


COMMIT_RE = re.compile(r"[0-9a-f]{40}")


def is_commit(revision: str | None) -> bool:
    """A full commit id names one tree for good; a branch or tag may move."""
    return revision is not None and COMMIT_RE.fullmatch(revision) is not None


def resolve_hf_revision(repo_id: str, revision: str, endpoint: str, token: str | None,
                        timeout: float = HTTP_TIMEOUT_S) -> str:
    """The commit a branch or tag of `repo_id` names now, from the Hub's model-info API."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    quoted_revision = urllib.parse.quote(revision, safe="")
    url = f"{endpoint}/api/models/{repo_id}/revision/{quoted_revision}"
    with http_get(url, headers, timeout) as response:
        try:
            commit = json.load(response).get("sha")
        except (ValueError, AttributeError):
            commit = None
    if not is_commit(commit):
        raise FetchError(f"{endpoint}: the answer for hf://{repo_id}@{revision} names no commit")
    return str(commit)


def fetch_hf(repo_id: str, revision: str, dest_dir: Path, endpoint: str, token: str | None) -> None:
    """Download the serving files of `repo_id` at `revision`, pinned to the commit the revision names now."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    quoted_revision = urllib.parse.quote(revision, safe="")
    info_url = f"{endpoint}/api/models/{repo_id}/revision/{quoted_revision}?blobs=true"
    with http_get(info_url, headers) as response:
        info = json.load(response)
    # Every file comes from the same commit even if the branch moves during a long download.
    commit = info.get("sha") or revision
    files = [HubFile.from_sibling(s) for s in info.get("siblings", []) if is_serving_file(s["rfilename"])]
    if not any(f.name.endswith(".safetensors") for f in files):
        raise FetchError(f"hf://{repo_id}@{revision} has no top-level *.safetensors weights to serve")
    dest_dir.mkdir(parents=True, exist_ok=True)
    for hub_file in files:
        target = dest_dir / hub_file.name
        if target.exists():
            continue
        file_url = f"{endpoint}/{repo_id}/resolve/{commit}/{urllib.parse.quote(hub_file.name)}"
        download_file(file_url, target, headers, hub_file.size, hub_file.sha256)
    (dest_dir / COMPLETE_MARKER).write_text(f"hf://{repo_id}@{commit}\n")


def fetch_s3(bucket: str, key: str, dest: Path, endpoint: str | None) -> None:
    """Download one object, or every object under `key/` into a directory, via boto3 (extra `s3`)."""
    try:
        import boto3
        from botocore.exceptions import ClientError
    except ImportError:
        raise FetchError("s3:// sources need boto3: pip install 'pagoda-operator[s3]'") from None
    s3 = boto3.client("s3", endpoint_url=endpoint)
    prefix = key.rstrip("/") + "/"
    try:
        listing = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        keys = [obj["Key"] for page in listing for obj in page.get("Contents", [])]
        if not keys:
            download_s3_object(s3, bucket, key.rstrip("/"), dest)
            return
        for object_key in keys:
            relative = object_key[len(prefix):]
            target = dest / relative
            if relative and not object_key.endswith("/") and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                download_s3_object(s3, bucket, object_key, target)
    except ClientError as err:
        raise FetchError(f"s3://{bucket}/{key}: {err}") from None
    (dest / COMPLETE_MARKER).write_text(f"s3://{bucket}/{key}\n")


def download_s3_object(s3: Any, bucket: str, key: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    s3.download_file(bucket, key, str(part))
    os.replace(part, dest)


def is_complete(path: Path) -> bool:
    """A file is only ever renamed into place when whole; a directory carries a completion marker."""
    return path.is_file() or (path / COMPLETE_MARKER).is_file()


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an advisory lock on `<path>.lock`, so pods sharing one cache volume fetch a model once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield


@dataclass(frozen=True)
class FetchOptions:
    cache_root: str = DEFAULT_CACHE_ROOT
    hf_endpoint: str = DEFAULT_HF_ENDPOINT
    s3_endpoint: str | None = None
    hf_token: str | None = None
    allow_http: bool = False


def fetch(source: str, revision: str | None, options: FetchOptions) -> str | None:
    """Make `source` available locally and return the path to serve (None for a builtin model)."""
    path_str = local_model_path(source, revision, options.cache_root)
    if path_str is None:
        return None
    path = Path(path_str)
    parsed = ModelSource.parse(source)
    if parsed.scheme == "pvc":
        if not path.exists():
            raise FetchError(f"{path} does not exist: is claim {parsed.netloc!r} mounted at "
                             f"{Path(options.cache_root) / 'pvc'} and does it hold {parsed.path!r}?")
        return path_str
    if parsed.scheme == "http" and not options.allow_http:
        raise FetchError(f"{source!r}: plain http:// is refused (use https://, or --allow-http for tests)")
    if is_complete(path):
        return path_str
    with exclusive_lock(path):
        if is_complete(path):  # another pod finished it while we waited for the lock
            return path_str
        if parsed.scheme == "hf":
            fetch_hf(hf_repo_id(parsed), revision or "main", path, options.hf_endpoint, options.hf_token)
        elif parsed.scheme == "s3":
            fetch_s3(parsed.netloc, parsed.path, path, options.s3_endpoint)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            download_file(source, path, {})
    return path_str


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pagoda-fetch", description="Download a model into the Pagoda model cache and print its path.")
    parser.add_argument("--source", required=True,
                        help="hf://org/name, https://host/file.gguf, s3://bucket/key, pvc://claim/path, builtin://NAME")
    parser.add_argument("--revision", default=None, help="branch, tag or commit for hf:// (default: main)")
    parser.add_argument("--cache-root", default=DEFAULT_CACHE_ROOT, help="model cache (default: /models)")
    parser.add_argument("--endpoint", default=None,
                        help="Hub endpoint for hf:// (default: $HF_ENDPOINT or https://huggingface.co) "
                             "or S3 endpoint URL for s3:// (default: boto3's, e.g. $AWS_ENDPOINT_URL)")
    parser.add_argument("--allow-http", action="store_true",
                        help="accept plain http:// file URLs (tests and trusted in-cluster mirrors)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    options = FetchOptions(
        cache_root=args.cache_root,
        hf_endpoint=(args.endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/"),
        s3_endpoint=args.endpoint,
        hf_token=os.environ.get("HF_TOKEN") or None,
        allow_http=args.allow_http,
    )
    try:
        path = fetch(args.source, args.revision, options)
    except (FetchError, OSError) as err:
        print(f"pagoda-fetch: error: {err}", file=sys.stderr)
        return 1
    print(path if path is not None else "", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
