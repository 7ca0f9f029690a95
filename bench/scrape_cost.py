"""What one `GET /metrics` costs a `pagoda serve` engine: `python -m bench.scrape_cost [--requests N]`.

The router scrapes each engine's /metrics (queue length, KV-cache usage) once per `--scrape-interval`
(5 s) per router replica. The engine renders the text on its event loop, under the GIL its engine thread
needs too, so what a scrape costs is the engine process's CPU time. Measured on one engine of the
embedded model with the router bench's flags:

- idle: N sequential `GET /metrics` and N `GET /health` (the same HTTP path without the rendering), the
  latency of each and the engine process's CPU time per request (/proc/PID/stat, minus its idle rate);
- decoding: the engine's output tok/s under a steady streaming load, with no scrapes against scrapes at
  20/s (the refresh rate of the Gateway API Inference Extension's endpoint picker), alternated.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

import httpx

from bench.env import cpu_model, num_cores
from bench.metrics import percentile
from bench.router import MODEL, QUICK, start_engines
from bench.servers import _descendants

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children (threads included)."""
    total = 0
    for p in [pid, *_descendants(pid)]:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total / TICK


def sequential(url: str, path: str, n: int, pid: int, idle_rate: float) -> dict[str, float | None]:
    times = []
    with httpx.Client(timeout=10) as client:
        client.get(url + path)  # a warm connection, as the router keeps one
        cpu0, start = cpu_seconds(pid), time.perf_counter()
        for _ in range(n):
            t = time.perf_counter()
            body = client.get(url + path).content
            times.append(time.perf_counter() - t)
        wall, cpu = time.perf_counter() - start, cpu_seconds(pid) - cpu0
    return {
        "path": path,
        "bytes": len(body),
        "p50 ms": round(1000 * (percentile(times, 50) or 0), 2),
        "p99 ms": round(1000 * (percentile(times, 99) or 0), 2),
        "engine CPU ms/request": round(1000 * (cpu - idle_rate * wall) / n, 2),
    }


async def decode_rate(url: str, seconds: float, scrape_hz: float, streams: int = 4) -> float:
    """Output tokens/s of `streams` looping streaming completions while /metrics is scraped at scrape_hz."""
    tokens = 0
    stop = time.perf_counter() + seconds
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 64, "ignore_eos": True}
    body["stream"] = True

    async def load(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        while time.perf_counter() < stop:
            async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    token = line.startswith("data:") and not line.endswith("[DONE]")
                    tokens += token and time.perf_counter() < stop

    async def scrape(client: httpx.AsyncClient) -> None:
        while scrape_hz and time.perf_counter() < stop:
            await client.get(f"{url}/metrics")
            await asyncio.sleep(1 / scrape_hz)

    async with httpx.AsyncClient(timeout=60) as client:
        start = time.perf_counter()
        await asyncio.gather(*(load(client) for _ in range(streams)), scrape(client))
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="Sequential requests per path, idle.")
    parser.add_argument("--seconds", type=float, default=8.0, help="Length of each decoding window.")
    parser.add_argument("--rounds", type=int, default=2, help="Decoding windows per setting, alternated.")
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}, {num_cores()} cores", flush=True)
    (engine,) = start_engines(1, QUICK)
    try:
        assert engine.process is not None
        pid = engine.process.pid
        cpu0, start = cpu_seconds(pid), time.perf_counter()
        time.sleep(5)
        idle_rate = (cpu_seconds(pid) - cpu0) / (time.perf_counter() - start)
        print(f"engine idle CPU: {1000 * idle_rate:.1f} ms/s", flush=True)
        for path in ("/health", "/metrics", "/health", "/metrics"):
            print(sequential(engine.base_url, path, args.requests, pid, idle_rate), flush=True)
        rates: dict[float, list[float]] = {0.0: [], 20.0: []}
        for _ in range(args.rounds):
            for hz in rates:
                rates[hz].append(asyncio.run(decode_rate(engine.base_url, args.seconds, hz)))
        for hz, values in rates.items():
            listed = ", ".join(f"{v:.1f}" for v in values)
            print(f"decoding, /metrics at {hz:g}/s: {listed} tok/s", flush=True)
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
