"""Streaming OpenAI clients: N concurrent clients, or Poisson arrivals at a given rate.

Each request goes to `/v1/completions` with token-id prompts (so every server sees the same
tokens), greedy sampling, `ignore_eos` and `max_tokens` = the requested output length, and
`stream: true` with `stream_options.include_usage` for the exact token count.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx

from bench.metrics import RequestRecord, summarize
from bench.workloads import BenchRequest, Workload


def completion_body(model: str, request: BenchRequest) -> dict[str, object]:
    return {
        "model": model,
        "prompt": request.prompt_token_ids,
        "max_tokens": request.output_len,
        "temperature": 0.0,
        "ignore_eos": True,  # vLLM's and llama.cpp's extension: produce exactly max_tokens tokens
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def stream_one(client: httpx.AsyncClient, url: str, model: str, request: BenchRequest) -> RequestRecord:
    """Send one streaming completion and time every chunk that carries a token."""
    record = RequestRecord(request.prompt_len, request.output_len)
    start = time.perf_counter()
    usage_tokens: int | None = None
    chunks = 0
    try:
        async with client.stream("POST", url, json=completion_body(model, request)) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                raise RuntimeError(f"HTTP {response.status_code}: {body[:200]}")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, keep-alives
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                event = json.loads(payload)
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens")
                if event.get("choices"):
                    now = time.perf_counter() - start
                    if record.ttft is None:
                        record.ttft = now
                    record.token_times.append(now)
                    chunks += 1
        record.e2e = time.perf_counter() - start
        record.num_output_tokens = usage_tokens if usage_tokens is not None else chunks
    except (httpx.HTTPError, RuntimeError, json.JSONDecodeError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"[:300]
    return record


async def run_concurrent(
    base_url: str, model: str, workload: Workload, concurrency: int
) -> dict[str, object]:
    """`concurrency` clients each send their next request as soon as the previous one ends."""
    queue: asyncio.Queue[BenchRequest] = asyncio.Queue()
    for request in workload.requests:
        queue.put_nowait(request)
    records: list[RequestRecord] = []
    url = f"{base_url}/v1/completions"

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            records.append(await stream_one(client, url, model, queue.get_nowait()))

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"mode": "concurrency", "concurrency": concurrency, **summarize(records, wall), "records": records}


async def run_poisson(
    base_url: str, model: str, workload: Workload, rate: float, seed: int = 0
) -> dict[str, object]:
    """Requests arrive as a Poisson process of `rate` requests/s, whatever the server's pace."""
    rng = random.Random(seed)
    url = f"{base_url}/v1/completions"
    limits = httpx.Limits(max_connections=len(workload.requests) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        start = time.perf_counter()
        tasks = []
        for request in workload.requests:
            tasks.append(asyncio.create_task(stream_one(client, url, model, request)))
            await asyncio.sleep(rng.expovariate(rate))
        records = list(await asyncio.gather(*tasks))
        wall = time.perf_counter() - start
    return {"mode": "poisson", "rate": rate, **summarize(records, wall), "records": records}
