"""Router benchmark: `python -m bench.router [--quick]`.

Three `pagoda serve` replicas of the embedded model, each with a KV pool too small for the whole working
set of prefixes (the fleet's is not), behind one `pagoda router` per policy, on the same workloads:

- multi-turn chat: concurrent sessions, every turn resending the growing conversation;
- tenants: each tenant's users share its long system prompt;
- ShareGPT-shaped: no shared prefixes (prefix routing must cost nothing here);
- overhead: latency and requests/s with `max_tokens: 1` through the router against a direct connection,
  and /v1/models requests/s (what the router forwards when the engine costs nothing);
- scale-down: one replica gets SIGTERM mid-run (it drains); client errors are counted;
- scale from zero: first request at zero ready replicas to its first token, cold (the engine starts) and
  warm (a loaded engine turns reachable: SIGSTOP/SIGCONT stands in for a warm-pool promotion).

Every run tags its prompts, so no run reuses the KV cache of another. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.env import cpu_model, num_cores
from bench.metrics import percentile
from bench.servers import ServerProcess, free_port, pagoda_serve_command

POLICIES = ["round-robin", "least-load", "prefix"]
MODEL = "smollm2"


@dataclass(frozen=True)
class Sizes:
    sessions: int = 12  # multi-turn: concurrent sessions
    turns: int = 3
    opening_chars: int = 1200  # ~300 tokens
    followup_chars: int = 200
    tenants: int = 6
    tenant_system_chars: int = 1600  # ~400 tokens
    tenant_requests: int = 24
    sharegpt_requests: int = 24
    concurrency: int = 6
    max_tokens: int = 16
    kv_blocks: int = 256  # x16 tokens per replica: ~4k tokens, under the multi-turn working set
    overhead_requests: int = 60


QUICK = Sizes(
    sessions=4,
    turns=3,
    opening_chars=800,
    followup_chars=150,
    tenants=3,
    tenant_system_chars=1200,
    tenant_requests=9,
    sharegpt_requests=8,
    concurrency=4,
    max_tokens=8,
    kv_blocks=96,
    overhead_requests=20,
)


def corpus() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


def window(text: str, length: int, rng: random.Random) -> str:
    start = rng.randrange(0, len(text) - length)
    return text[start : start + length]


@dataclass
class Result:
    ttfts: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0
    wall: float = 0.0

    def row(self) -> dict[str, float | int | None]:
        return {
            "ttft_p50_ms": _ms(percentile(self.ttfts, 50)),
            "ttft_p99_ms": _ms(percentile(self.ttfts, 99)),
            "tok_s": round(self.tokens / self.wall, 1) if self.wall else None,
            "errors": self.errors,
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


async def chat(
    client: httpx.AsyncClient, url: str, messages: list[dict[str, str]], max_tokens: int, result: Result
) -> str:
    """One streaming chat completion; records TTFT and tokens; returns the reply (or '' on an error)."""
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    start = time.perf_counter()
    text, first = [], None
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                result.errors += 1
                await response.aread()
                return ""
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line.endswith("[DONE]"):
                    continue
                event = json.loads(line[5:])
                if event.get("choices"):
                    first = first or time.perf_counter() - start
                    text.append(event["choices"][0]["delta"].get("content") or "")
                    result.tokens += 1
    except (httpx.HTTPError, json.JSONDecodeError):
        result.errors += 1
        return ""
    if first is not None:
        result.ttfts.append(first)
    return "".join(text)


async def bounded(jobs: list, concurrency: int) -> None:  # type: ignore[type-arg]
    gate = asyncio.Semaphore(concurrency)

    async def run(job) -> None:  # type: ignore[no-untyped-def]
        async with gate:
            await job()

    await asyncio.gather(*(run(j) for j in jobs))


async def multi_turn(url: str, sizes: Sizes, tag: str, text: str, on_start=None) -> Result:  # type: ignore[no-untyped-def]
    rng, result = random.Random(1), Result()
    openings = [window(text, sizes.opening_chars, rng) for _ in range(sizes.sessions)]
    followups = [[window(text, sizes.followup_chars, rng) for _ in range(sizes.turns)] for _ in openings]

    async def session(client: httpx.AsyncClient, i: int) -> None:
        messages = [
            {"role": "system", "content": f"[{tag}] You are a helpful assistant."},
            {"role": "user", "content": openings[i]},
        ]
        for turn in range(sizes.turns):
            reply = await chat(client, url, messages, sizes.max_tokens, result)
            messages += [
                {"role": "assistant", "content": reply},
                {"role": "user", "content": followups[i][turn]},
            ]

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=256)) as client:
        start = time.perf_counter()
        tasks = [asyncio.create_task(session(client, i)) for i in range(sizes.sessions)]
        if on_start is not None:
            await on_start()
        await asyncio.gather(*tasks)
        result.wall = time.perf_counter() - start
    return result


async def tenants(url: str, sizes: Sizes, tag: str, text: str) -> Result:
    rng, result = random.Random(2), Result()
    systems = [
        f"[{tag}] tenant {t}: " + window(text, sizes.tenant_system_chars, rng) for t in range(sizes.tenants)
    ]
    requests = [
        [
            {"role": "system", "content": systems[i % sizes.tenants]},
            {"role": "user", "content": window(text, 200, rng)},
        ]
        for i in range(sizes.tenant_requests)
    ]
    rng.shuffle(requests)
    return await _single_turns(url, requests, sizes, result)


async def sharegpt(url: str, sizes: Sizes, tag: str, text: str) -> Result:
    rng, result = random.Random(3), Result()
    requests = [
        [{"role": "user", "content": f"[{tag}] " + window(text, rng.randrange(400, 2400), rng)}]
        for _ in range(sizes.sharegpt_requests)
    ]
    return await _single_turns(url, requests, sizes, result)


async def _single_turns(url: str, requests: list, sizes: Sizes, result: Result) -> Result:  # type: ignore[type-arg]
    async with httpx.AsyncClient(timeout=300) as client:
        start = time.perf_counter()
        await bounded(
            [lambda m=m: chat(client, url, m, sizes.max_tokens, result) for m in requests], sizes.concurrency
        )
        result.wall = time.perf_counter() - start
    return result


def cache_counters(engines: list[ServerProcess]) -> tuple[float, float]:
    hits = queries = 0.0
    for engine in engines:
        for family in text_string_to_metric_families(httpx.get(f"{engine.base_url}/metrics").text):
            for sample in family.samples:
                if sample.name == "vllm:prefix_cache_hits_total":
                    hits += sample.value
                elif sample.name == "vllm:prefix_cache_queries_total":
                    queries += sample.value
    return hits, queries


def start_engines(count: int, sizes: Sizes) -> list[ServerProcess]:
    env = {"OMP_NUM_THREADS": "1"}  # three replicas share the cores: no oversubscription
    engines = []
    for i in range(count):
        port = free_port()
        args = [
            "--served-model-name",
            MODEL,
            "--num-gpu-blocks-override",
            str(sizes.kv_blocks),
            "--max-model-len",
            "2048",
            "--max-num-seqs",
            "16",
            "--shutdown-timeout",
            "60",
        ]
        engines.append(
            ServerProcess(f"router-engine-{i}", pagoda_serve_command(port, args), port, "/ready", env)
        )
    for engine in engines:  # start together (loading overlaps), then wait for each
        launch(engine)
    for engine in engines:
        engine.ready_seconds = engine._wait_ready(900)
    return engines


def launch(engine: ServerProcess) -> None:
    engine.log_path.parent.mkdir(parents=True, exist_ok=True)
    with engine.log_path.open("wb") as log:
        engine.started_at = time.perf_counter()
        engine.process = subprocess.Popen(
            engine.command, stdout=log, stderr=subprocess.STDOUT, env=engine.env
        )


def start_router(backends: list[str], policy: str, *extra: str, wait: bool = True) -> ServerProcess:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "pagoda",
        "router",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--policy",
        policy,
        "--health-interval",
        "0.5",
        "--log-level",
        "warning",
        *extra,
    ]
    for backend in backends:
        command += ["--backend", backend]
    router = ServerProcess(f"router-{policy}", command, port, "/health")
    router.start(60)
    deadline = time.monotonic() + 30
    while wait and time.monotonic() < deadline:  # until it has polled the backends
        if all(f'backend="{b}"}} 1.0' in httpx.get(f"{router.base_url}/metrics").text for b in backends):
            break
        time.sleep(0.1)
    return router


async def overhead(direct: str, routed: str, sizes: Sizes) -> dict[str, float | None]:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 1, "temperature": 0}

    async def paired(n: int) -> tuple[list[float], list[float]]:
        """Direct and routed requests alternate, so load from other processes hits both alike."""
        times: dict[str, list[float]] = {direct: [], routed: []}
        async with httpx.AsyncClient(timeout=60) as client:
            for _ in range(n):
                for url in (direct, routed):
                    start = time.perf_counter()
                    (await client.post(f"{url}/v1/completions", json=body)).raise_for_status()
                    times[url].append(time.perf_counter() - start)
        return times[direct], times[routed]

    async def rate(url: str, path: str, n: int, concurrency: int) -> float:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:

            async def one() -> None:
                if path == "/v1/models":
                    (await client.get(f"{url}{path}")).raise_for_status()
                else:
                    (await client.post(f"{url}{path}", json=body)).raise_for_status()

            start = time.perf_counter()
            await bounded([one for _ in range(n)], concurrency)
            return n / (time.perf_counter() - start)

    direct_lat, routed_lat = await paired(2 * sizes.overhead_requests)
    d50, r50 = percentile(direct_lat, 50), percentile(routed_lat, 50)
    added = percentile([r - d for d, r in zip(direct_lat, routed_lat)], 50)
    return {
        "direct_p50_ms": _ms(d50),
        "routed_p50_ms": _ms(r50),
        "added_p50_ms": _ms(added),
        "direct_rps_max_tokens_1": round(
            await rate(direct, "/v1/completions", 4 * sizes.overhead_requests, 16), 1
        ),
        "routed_rps_max_tokens_1": round(
            await rate(routed, "/v1/completions", 4 * sizes.overhead_requests, 16), 1
        ),
        "direct_rps_models": round(await rate(direct, "/v1/models", 2000, 32), 1),
        "routed_rps_models": round(await rate(routed, "/v1/models", 2000, 32), 1),
    }


async def first_token_after(router: str, make_ready, timeout: float = 600) -> float:  # type: ignore[no-untyped-def]
    """Seconds from a request sent at zero ready replicas to its first token; `make_ready` runs meanwhile."""
    result = Result()
    async with httpx.AsyncClient(timeout=timeout) as client:
        task = asyncio.create_task(chat(client, router, [{"role": "user", "content": "Hi!"}], 4, result))
        await asyncio.sleep(0.2)
        make_ready()
        await task
    if not result.ttfts:
        raise RuntimeError("the held request failed")
    return result.ttfts[0]  # measured from the request's start, which was at zero ready replicas


def print_overhead(engine: str, sizes: Sizes) -> None:
    router = start_router([engine], "prefix")
    try:
        cost = asyncio.run(overhead(engine, router.base_url, sizes))
        text = httpx.get(f"{router.base_url}/metrics").text
    finally:
        router.stop()
    values = {
        s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels
    }
    own = (
        values["pagoda_router_routing_overhead_seconds_sum"]
        / values["pagoda_router_routing_overhead_seconds_count"]
    )
    cost["router_own_mean_ms"] = _ms(own)  # arrival to dispatch, inside the router
    print(
        f"\noverhead (one engine; paired sequential max_tokens 1; rates at 16 and 32 clients): {cost}",
        flush=True,
    )


def decisions(router: ServerProcess) -> dict[str, int]:
    """The router's requests by policy decision (prefix-hit, prefix-hash, prefix-spill, ...)."""
    counts: dict[str, int] = {}
    for family in text_string_to_metric_families(httpx.get(f"{router.base_url}/metrics").text):
        for sample in family.samples:
            if sample.name == "pagoda_router_requests_total":
                reason = sample.labels["decision"]
                counts[reason] = counts.get(reason, 0) + int(sample.value)
    return counts


def table(rows: list[dict[str, object]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join("" if r.get(k) is None else str(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Fewer sessions and requests.")
    parser.add_argument("--only-overhead", action="store_true", help="Just the overhead measurement.")
    parser.add_argument(
        "--router-arg", action="append", default=[], metavar="ARG",
        help="A flag for the workloads' and the scale-down run's routers (repeatable), written with '=': "
        "--router-arg=--kv-cache-threshold=2.",
    )
    args = parser.parse_args()
    sizes = QUICK if args.quick else Sizes()
    text = corpus()
    print(f"CPU: {cpu_model()}, {num_cores()} cores; sizes: {sizes}", flush=True)
    if args.only_overhead:
        engines = start_engines(1, sizes)
        try:
            print_overhead(engines[0].base_url, sizes)
        finally:
            engines[0].stop()
        return
    engines = start_engines(3, sizes)
    urls = [e.base_url for e in engines]
    rows: list[dict[str, object]] = []
    try:
        for workload in (multi_turn, tenants, sharegpt):
            for policy in POLICIES:
                router = start_router(urls, policy, *args.router_arg)
                try:
                    hits0, queries0 = cache_counters(engines)
                    result = asyncio.run(
                        workload(router.base_url, sizes, f"{workload.__name__}-{policy}", text)
                    )
                    hits, queries = cache_counters(engines)
                    routed = decisions(router)
                finally:
                    router.stop()
                hit_rate = (hits - hits0) / (queries - queries0) if queries > queries0 else None
                row = {
                    "workload": workload.__name__,
                    "policy": policy,
                    **result.row(),
                    "prefix_hit_rate": None if hit_rate is None else round(hit_rate, 3),
                }
                rows.append(row)
                print(row, routed, flush=True)
        print("\n" + table(rows), flush=True)

        print_overhead(urls[0], sizes)

        router = start_router(urls, "prefix", *args.router_arg)
        try:

            async def drain_one() -> None:
                await asyncio.sleep(2.0)
                engines[2].process.send_signal(signal.SIGTERM)

            result = asyncio.run(multi_turn(router.base_url, sizes, "scale-down", text, on_start=drain_one))
            print(f"\nscale-down (SIGTERM one of 3 replicas 2 s into multi-turn): {result.row()}", flush=True)
        finally:
            router.stop()
            engines[2].stop(90)

        # warm: a loaded engine that is unreachable (stopped) turns reachable
        os.kill(engines[1].process.pid, signal.SIGSTOP)
        router = start_router([urls[1]], "prefix", "--hold-timeout", "600", wait=False)
        try:
            resume = engines[1].process.pid
            warm = asyncio.run(first_token_after(router.base_url, lambda: os.kill(resume, signal.SIGCONT)))
        finally:
            router.stop()
        port = free_port()
        cold_engine = ServerProcess(
            "router-engine-cold",
            pagoda_serve_command(port, ["--served-model-name", MODEL]),
            port,
            "/ready",
            {"OMP_NUM_THREADS": "1"},
        )
        router = start_router([cold_engine.base_url], "prefix", "--hold-timeout", "600", wait=False)
        try:
            cold = asyncio.run(first_token_after(router.base_url, lambda: launch(cold_engine)))
        finally:
            router.stop()
            cold_engine.stop()
        print(f"\nscale from zero, first token: warm {warm:.2f} s, cold {cold:.2f} s", flush=True)
    finally:
        for engine in engines:
            if engine.process and engine.process.poll() is None:
                os.kill(engine.process.pid, signal.SIGCONT)
            engine.stop()


if __name__ == "__main__":
    main()
