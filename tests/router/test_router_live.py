"""`pagoda router` in front of real engines, driven by the official openai client."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from router_testkit import MODEL_NAME, LiveServer, free_port, wait_until

from pagoda.router.policies import Ring, render_prompt, stable_hash

GREEDY = {"model": MODEL_NAME, "temperature": 0, "max_tokens": 24, "extra_body": {"ignore_eos": True}}


def served_by(engines: dict[str, LiveServer], call: Callable[[], object]) -> dict[str, float]:
    """Run `call`; how many requests each engine finished meanwhile (the engines' own word)."""
    before = {n: e.metric("vllm:request_success_total") for n, e in engines.items()}
    call()
    after = {n: e.metric("vllm:request_success_total") - before[n] for n, e in engines.items()}
    return {n: count for n, count in after.items() if count}


def test_responses_and_streams_pass_through_unchanged(engines: dict[str, LiveServer], start_router) -> None:
    a = engines["a"]
    router = start_router(a.base_url)
    via, direct = router.client(), a.client()
    messages = [{"role": "user", "content": "tell me a story"}]
    streamed = [c.model_dump(exclude={"id", "created"}) for c in via.chat.completions.create(
        messages=messages, stream=True, stream_options={"include_usage": True}, **GREEDY
    )]
    expected = [c.model_dump(exclude={"id", "created"}) for c in direct.chat.completions.create(
        messages=messages, stream=True, stream_options={"include_usage": True}, **GREEDY
    )]
    assert len(streamed) > 3 and streamed == expected
    assert via.completions.create(prompt="abc", **GREEDY).choices[0].text == (
        direct.completions.create(prompt="abc", **GREEDY).choices[0].text
    )
    assert [m.id for m in via.models.list()] == [MODEL_NAME]
    # the engine's errors come back with its status and body
    bad = {"model": MODEL_NAME, "prompt": "x", "max_tokens": -1}
    routed, straight = (httpx.post(f"{u}/v1/completions", json=bad) for u in (router.base_url, a.base_url))
    assert routed.status_code == straight.status_code == 400 and routed.json() == straight.json()
    unknown = httpx.post(f"{router.base_url}/v1/completions", json={**bad, "model": "nope", "max_tokens": 1})
    assert unknown.status_code == 404 and unknown.json()["error"]["message"]
    assert router.metric("pagoda_router_requests_total", backend=a.base_url) == 5
    assert router.metric("pagoda_router_routing_overhead_seconds_count") == 5


def test_a_client_disconnect_aborts_the_engine_request(engines: dict[str, LiveServer], start_router) -> None:
    a = engines["a"]
    router = start_router(a.base_url)
    aborted = a.metric("vllm:request_success_total", finished_reason="abort")
    body = {"model": MODEL_NAME, "prompt": "long", "max_tokens": 3000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{router.base_url}/v1/completions", json=body) as response:
        assert next(line for line in response.iter_lines() if line.startswith("data:"))  # running: hang up
    a.wait_idle(timeout=10)
    assert a.metric("vllm:request_success_total", finished_reason="abort") == aborted + 1
    # the same for a request that has not answered a byte yet
    body = {**body, "stream": False, "n": 8, "max_tokens": 2000}
    with contextlib.suppress(httpx.ReadTimeout):
        httpx.post(f"{router.base_url}/v1/completions", json=body, timeout=httpx.Timeout(5.0, read=0.2))
    a.wait_idle(timeout=10)
    assert a.metric("vllm:request_success_total", finished_reason="abort") == aborted + 2


@pytest.mark.parametrize("policy", ["prefix", "round-robin"])
def test_prefix_routing_keeps_each_conversation_on_one_engine(
    engines: dict[str, LiveServer], start_router, policy: str
) -> None:
    pair = {n: engines[n] for n in "ab"}
    router = start_router(*(e.base_url for e in pair.values()), policy=policy)
    client = router.client()

    def ask(messages: list[dict[str, str]]) -> None:
        reply = client.chat.completions.create(messages=messages, **{**GREEDY, "max_tokens": 4})
        messages += [
            {"role": "assistant", "content": reply.choices[0].message.content or ""},
            {"role": "user", "content": f"and turn {len(messages)}?"},
        ]

    def converse(opening: str) -> None:
        messages = [{"role": "user", "content": opening}]
        for _ in range(3):
            ask(messages)

    homes: list[dict[str, float]] = []
    for conversation in range(12 if policy == "prefix" else 3):
        opening = f"conversation {conversation}: hello there, how are you doing today, my friend?"
        homes.append(served_by(pair, lambda o=opening: converse(o)))
    assert all(sum(used.values()) == 3 for used in homes), homes
    if policy == "prefix":
        assert all(len(used) == 1 for used in homes), homes
        assert {n for used in homes for n in used} == {"a", "b"}, "every conversation went to one engine"
        # the second and third turns extend a prefix this router sent before
        assert router.metric("pagoda_router_requests_total", decision="prefix-hit") == 24
    else:  # the baseline a Service gives: conversations hop between engines
        assert all(len(used) == 2 for used in homes), homes


def test_an_engine_with_a_full_kv_cache_gets_no_prefix_traffic(
    engines: dict[str, LiveServer], start_router
) -> None:
    """The router scrapes vllm:kv_cache_usage_perc and passes over a replica at or above the threshold (any
    use at all, here): conversations whose home is engine a go to b while a's cache is busy."""
    a, b = engines["a"], engines["b"]
    ring = Ring.build(sorted([a.base_url, b.base_url]))

    def home(body: dict[str, object]) -> str:
        return ring.walk(stable_hash(f"{MODEL_NAME}\0{render_prompt(body)[1]}".encode()))[0]

    bodies = [{"messages": [{"role": "user", "content": f"question {i}: what is the capital of France?"}]}
              for i in range(40)]
    homed_on_a = [body for body in bodies if home(body) == a.base_url][:3]
    stop = threading.Event()

    def keep_busy() -> None:  # a's KV cache in use all the time: two streams, one after the other
        client = a.client(timeout=60)
        # long streams: two short ones ending in step could both be between streams at the router's scrape
        while not stop.is_set():
            for _ in client.completions.create(prompt="busy", stream=True, **{**GREEDY, "max_tokens": 3000}):
                pass

    def ask_all() -> None:
        client = router.client()
        for body in homed_on_a:
            client.chat.completions.create(messages=body["messages"], **{**GREEDY, "max_tokens": 4})

    with ThreadPoolExecutor(2) as pool:
        busy = [pool.submit(keep_busy) for _ in range(2)]
        try:
            wait_until(lambda: a.metric("vllm:num_requests_running") > 0)
            # one scrape per engine, at the router's start: a busy, b idle, for the rest of the test
            router = start_router(a.base_url, b.base_url, scrape_interval=3600, kv_cache_threshold=1e-9)
            usage = {e.base_url: router.metric("pagoda_router_backend_kv_cache_usage", backend=e.base_url)
                     for e in (a, b)}
            assert usage[a.base_url] > 0 and usage[b.base_url] == 0, usage
            assert served_by({"b": b}, ask_all) == {"b": 3}  # b's own count: all three went there
        finally:
            stop.set()
        for future in busy:
            future.result()
    assert router.metric("pagoda_router_requests_total", backend=a.base_url) == 0
    assert router.metric("pagoda_router_requests_total", decision="prefix-spill") == 3


def test_a_backend_killed_mid_run_costs_no_request(engines: dict[str, LiveServer], start_router) -> None:
    survivor, victim = engines["a"], engines["c"]
    router = start_router(survivor.base_url, victim.base_url, policy="round-robin")
    client = router.client(timeout=60)
    started = threading.Event()

    def ask(i: int) -> str:
        started.set()
        # long enough that the victim is still decoding when it is killed (60 tokens could all end first)
        reply = client.completions.create(prompt=f"request {i}", **{**GREEDY, "max_tokens": 1000})
        return reply.choices[0].text

    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(ask, i) for i in range(24)]
        started.wait()
        router.wait_for(lambda: victim.metric("vllm:num_requests_running") > 0)
        victim.stop(signal.SIGKILL)
        texts = [f.result() for f in futures]  # raises if any request failed
    assert all(texts)
    assert router.metric("pagoda_router_ejections_total", backend=victim.base_url) >= 1
    assert router.metric("pagoda_router_retries_total") >= 1
    assert client.completions.create(prompt="after", **GREEDY).choices[0].text


def test_a_draining_backend_finishes_its_streams_and_gets_nothing_new(
    engines: dict[str, LiveServer], start_router
) -> None:
    survivor, leaving = engines["a"], engines["b"]  # b's last use: this runs after the prefix tests
    router = start_router(survivor.base_url, leaving.base_url, policy="round-robin")
    client = router.client(timeout=60)

    def stream(i: int) -> str:
        chunks = client.completions.create(prompt=f"s{i}", stream=True, **{**GREEDY, "max_tokens": 80})
        return "".join(c.choices[0].text for c in chunks)

    with ThreadPoolExecutor(12) as pool:
        first = [pool.submit(stream, i) for i in range(8)]
        router.wait_for(lambda: leaving.metric("vllm:num_requests_running") > 0)
        leaving.process.send_signal(signal.SIGTERM)
        router.wait_for(lambda: router.ready_backends() == 1)
        later = [pool.submit(stream, i) for i in range(8, 16)]
        texts = [f.result() for f in first + later]  # raises on any client error
    assert all(texts)
    assert leaving.process.wait(60) == 0, leaving.log()[-3000:]


def test_no_backend_within_the_hold_timeout_is_a_503_with_retry_after(start_router) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    router = start_router(dead, wait_backends=0, hold_timeout=0.3)
    response = httpx.post(f"{router.base_url}/v1/completions", json={"model": MODEL_NAME, "prompt": "x"})
    assert response.status_code == 503 and int(response.headers["Retry-After"]) >= 1
    assert "no ready backend" in response.json()["error"]["message"]
    with pytest.raises(openai.InternalServerError):
        router.client().completions.create(prompt="x", **GREEDY)
    assert router.metric("pagoda_router_rejected_total", reason="hold-timeout") == 2
    no_hold = start_router(dead, wait_backends=0, hold_timeout=0)
    assert httpx.get(f"{no_hold.base_url}/ready").status_code == 503
    assert httpx.post(f"{no_hold.base_url}/v1/models").status_code == 503
