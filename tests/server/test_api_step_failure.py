"""An engine step that raises for one request aborts that request (its client gets an error, its KV blocks go
back), not the engine loop: /health stays 200 and later requests are served. The server runs in this
process so that the model runner can be made to fail the way a bad token id once made the sampler fail."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from conftest import free_port

POISON = [7, 7, 7]  # a prompt starting with these makes the step that runs it raise


@pytest.fixture(scope="module")
def base_url(tiny_model: Path) -> Iterator[str]:
    from pagoda.config import EngineConfig
    from pagoda.engine.llm_engine import LLMEngine
    from pagoda.entrypoints.api_server import ServerSettings, build_app

    def failing_engine(config: EngineConfig) -> LLMEngine:
        engine = LLMEngine(config)
        execute = engine.runner.execute

        def execute_or_fail(batch):  # noqa: ANN001, ANN202 - the runner's own signature
            if any(item.seq.prompt_token_ids[:3] == POISON for item in batch):
                raise IndexError("index 384 is out of bounds for dimension 1 with size 384")
            return execute(batch)

        engine.runner.execute = execute_or_fail
        return engine

    app = build_app(EngineConfig(model=str(tiny_model), max_num_seqs=8), ServerSettings(), failing_engine)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    yield url
    server.should_exit = True
    thread.join(30)


def kv_cache_usage(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("vllm:kv_cache_usage_perc{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no vllm:kv_cache_usage_perc")


def test_a_failing_step_aborts_its_request_and_the_engine_serves_on(base_url: str) -> None:
    body = {"prompt": [*POISON, 1, 2], "max_tokens": 4}
    for _ in range(4):  # more failures in a row than any "give up" threshold would allow
        failed = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60)
        assert failed.status_code == 500 and failed.json()["error"]["code"] == "request_failed", failed.text
        assert "IndexError" in failed.json()["error"]["message"]
        assert httpx.get(f"{base_url}/health", timeout=5).status_code == 200

    with httpx.stream("POST", f"{base_url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "request_failed"

    served = httpx.post(f"{base_url}/v1/completions", json={"prompt": "fine", "max_tokens": 3}, timeout=60)
    assert served.status_code == 200 and served.json()["usage"]["completion_tokens"] == 3
    deadline = time.monotonic() + 20
    while kv_cache_usage(base_url) > 0:  # the failed requests' blocks went back to the pool
        assert time.monotonic() < deadline, "KV blocks leaked"
        time.sleep(0.05)
