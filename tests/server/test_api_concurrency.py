"""Concurrent streams share batches and match one-at-a-time runs; disconnects free the engine."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
from conftest import MODEL_NAME, LiveServer

GREEDY = {"model": MODEL_NAME, "max_tokens": 40, "temperature": 0, "extra_body": {"ignore_eos": True}}
PROMPTS = [f"prompt number {i}: " + "ab" * i for i in range(16)]


def stream_text(client: openai.OpenAI, prompt: str) -> str:
    return "".join(
        chunk.choices[0].text for chunk in client.completions.create(prompt=prompt, stream=True, **GREEDY)
    )


class RunningSampler(threading.Thread):
    """Polls vllm:num_requests_running while the load runs."""

    def __init__(self, server: LiveServer) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.highest = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.highest = max(self.highest, self.server.metric("vllm:num_requests_running"))
            time.sleep(0.02)


def test_sixteen_concurrent_streams_are_batched_and_match_sequential_runs(
    server: LiveServer, client: openai.OpenAI
) -> None:
    sampler = RunningSampler(server)
    sampler.start()
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(lambda p: stream_text(client, p), PROMPTS))
    sampler.done.set()
    sampler.join()
    assert sampler.highest > 1, "the streams never shared a batch"
    sequential = [client.completions.create(prompt=p, **GREEDY).choices[0].text for p in PROMPTS]
    assert concurrent == sequential
    server.wait_idle()


def test_a_disconnected_stream_is_aborted(server: LiveServer) -> None:
    aborted_before = server.metric("vllm:request_success_total", finished_reason="abort")
    body = {"model": MODEL_NAME, "prompt": "long", "max_tokens": 250, "stream": True, "ignore_eos": True}
    with httpx.stream(
        "POST", f"{server.base_url}/v1/completions", json=body, headers=server.headers
    ) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))  # it is running; now hang up
    server.wait_idle(timeout=10)
    assert server.metric("vllm:request_success_total", finished_reason="abort") == aborted_before + 1


def test_a_disconnected_non_streaming_request_is_aborted(server: LiveServer) -> None:
    aborted_before = server.metric("vllm:request_success_total", finished_reason="abort")
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 220,
        "n": 8,  # enough work that it cannot finish before the client hangs up, even on a fast machine
        "ignore_eos": True,
    }
    # the request is sent, then the client gives up waiting: the server must notice and abort
    hang_up = httpx.Timeout(5.0, read=0.1)
    with contextlib.suppress(httpx.ReadTimeout):
        url = f"{server.base_url}/v1/chat/completions"
        httpx.post(url, json=body, headers=server.headers, timeout=hang_up)
    server.wait_idle(timeout=10)
    assert server.metric("vllm:request_success_total", finished_reason="abort") == aborted_before + 1
