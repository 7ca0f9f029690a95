"""Liveness with tensor parallelism: a worker that dies while the server is idle turns /health to 503 at
once, and the requests that come after it fail fast instead of waiting on an engine that cannot step."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
from conftest import start_server

DEADLINE_S = 3.0  # from the kill to each probe's 503


def spawned_children(pid: int) -> list[int]:
    """The multiprocessing-spawned children of `pid` (its tensor-parallel workers), leaving out
    multiprocessing's resource tracker, which is spawned too."""
    children = [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]
    return [child for child in children if b"spawn_main" in _cmdline(child)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""


def wait_for_503(url: str) -> httpx.Response:
    deadline = time.monotonic() + DEADLINE_S
    while (response := httpx.get(url, timeout=5)).status_code == 200:
        assert time.monotonic() < deadline, f"{url} still answers 200 {DEADLINE_S} s after the kill"
        time.sleep(0.05)
    assert response.status_code == 503
    return response


def test_a_worker_killed_while_idle_fails_health_and_later_requests(tiny_model: Path, tmp_path: Path) -> None:
    server = start_server(tmp_path, str(tiny_model), "--tensor-parallel-size", "2", "--max-model-len", "64")
    try:
        completions = f"{server.base_url}/v1/completions"
        body = {"prompt": "hi", "max_tokens": 2}
        assert httpx.post(completions, json=body, timeout=30).status_code == 200  # healthy first
        (worker,) = spawned_children(server.process.pid)
        assert httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200

        os.kill(worker, signal.SIGKILL)
        health = wait_for_503(f"{server.base_url}/health")
        assert health.json()["error"]["code"] == "engine_dead"
        # no request has come: only the engine loop's own watch can have failed the engine
        wait_for_503(f"{server.base_url}/ready")
        assert "killed by SIGKILL" in server.log()  # it says which worker died, and how
        health = httpx.get(f"{server.base_url}/health", timeout=5)
        assert "killed by SIGKILL" in health.json()["error"]["message"]

        response = httpx.post(completions, json=body, timeout=10)  # fails at once rather than hanging
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "engine_dead"
        assert server.stop(timeout=20) == 0, server.log()[-4000:]
    finally:
        server.stop(signal.SIGKILL)
