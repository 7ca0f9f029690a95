"""Hostile requests and broken backends: the router answers what the engine answers, or a clean OpenAI error;
never a 500 of its own, a dead poller or a stream cut without a word."""

from __future__ import annotations

import http.client
import http.server
import json
import socketserver
import threading
from collections.abc import Iterator

import httpx
import openai
import pytest
from router_testkit import MODEL_NAME, LiveServer

from pagoda.router.backends import _KV_USAGE, _WAITING, gauge_values
from pagoda.router.policies import POLICIES
from pagoda.router.proxy import parse_body


def text_part(text: object) -> bytes:
    message = {"role": "user", "content": [{"type": "text", "text": text}]}
    return json.dumps({"model": MODEL_NAME, "messages": [message]}).encode()


# bodies the engine rejects with a 400 that once made the router's own routing raise (a 500)
HOSTILE = [
    b"[" * 100_000,  # nesting deeper than the JSON parser's recursion limit
    b'{"a":' * 100_000,
    text_part(5),
    text_part(None),
    b'{"model": "tiny", "prompt": "\\ud800 a lone surrogate", "max_tokens": 2}',
    b'{"model": "\\udfff", "messages": [{"role": "user", "content": "hi \\ud800"}]}',
]


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_routing_never_fails_on_what_a_client_sends(policy: str) -> None:
    choose = POLICIES[policy]().choose
    loads = {"http://a": 0.0, "http://b": 0.0}
    deep = json.loads("[" * 900 + "]" * 900)  # parses; its rendering can exceed the recursion limit
    bodies = [parse_body(raw) for raw in HOSTILE] + [
        {"messages": [{"role": "user", "content": deep}]},
        {"messages": [{"role": ["x"], "content": {"a": deep}}, 5, None]},
        {"prompt": [deep]},
        {"prompt": {"a": deep}, "model": 3},
    ]
    for body in bodies:
        assert choose(body, loads).backend in loads


def test_gauges_that_are_no_count_are_ignored() -> None:
    text = (
        b'vllm:num_requests_waiting{model_name="a"} +Inf\nvllm:num_requests_waiting{model_name="b"} 2\n'
        b"vllm:num_requests_waiting NaN\nvllm:num_requests_waiting -3\nvllm:kv_cache_usage_perc 1.2.3\n"
    )
    assert gauge_values(_WAITING, text) == [2.0]
    assert gauge_values(_KV_USAGE, text) == []


def test_hostile_bodies_get_the_engines_answer(engines: dict[str, LiveServer], start_router) -> None:
    a = engines["a"]
    router = start_router(a.base_url)
    for raw in HOSTILE:
        for path in ("/v1/completions", "/v1/chat/completions"):
            routed, straight = (
                httpx.post(f"{base}{path}", content=raw, headers={"Content-Type": "application/json"})
                for base in (router.base_url, a.base_url)
            )
            assert routed.status_code == straight.status_code == 400, (raw[:60], routed.text[:200])
            assert routed.json() == straight.json()
    # a gzip body the engine cannot read goes upstream as sent, as the engine's own 400
    gzip = {"Content-Encoding": "gzip"}
    routed = httpx.post(f"{router.base_url}/v1/completions", content=b"x", headers=gzip)
    assert routed.status_code == 400 and routed.json()["error"]["message"]
    # the router's own refusals are OpenAI errors too
    too_large = httpx.post(f"{router.base_url}/v1/completions", content=b" " * (64 * 2**20 + 1), timeout=60)
    assert too_large.status_code == 413 and too_large.json()["error"]["type"] == "invalid_request_error"
    nowhere = httpx.get(f"{router.base_url}/nowhere")
    assert nowhere.status_code == 404 and nowhere.json()["error"]["type"] == "not_found_error"
    for path in ("/v1/../metrics", "/v1/%2e%2e/version", "/v1/models/../../tokenize"):  # sent as is
        connection = http.client.HTTPConnection(router.base_url.removeprefix("http://"), timeout=10)
        connection.request("GET", path)
        climbed = connection.getresponse()
        assert climbed.status == 404, (path, climbed.read()[:100])
        assert json.loads(climbed.read())["error"]["type"] == "not_found_error"
        connection.close()
    assert router.metric("pagoda_router_requests_total") == 2 * len(HOSTILE) + 1
    assert httpx.get(f"{router.base_url}/health").status_code == 200


class _Breaking(http.server.BaseHTTPRequestHandler):
    """An engine that answers /ready, exports garbage metrics, and dies one event into every answer."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/metrics":  # once killed the router's poller: the backend never turned ready
            self._send(b"vllm:num_requests_waiting +Inf\nvllm:kv_cache_usage_perc 1.2.3\n", "text/plain")
        else:
            self._send(b'{"status": "ready"}')

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        event = b'data: {"id": "x", "object": "text_completion", "created": 0, "model": "tiny", ' \
            b'"choices": [{"index": 0, "text": "a", "finish_reason": null}]}\n\n'
        self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
        self.wfile.flush()
        self.close_connection = True  # dies mid-answer: no terminating chunk


class _Garbage(_Breaking):
    """Ready, but what it answers on /v1 is not HTTP (a backend URL with the wrong port, say)."""

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self.wfile.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        self.close_connection = True


def serve(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture()
def breaking_backend() -> Iterator[str]:
    yield from serve(_Breaking)


@pytest.fixture()
def garbage_backend() -> Iterator[str]:
    yield from serve(_Garbage)


def test_a_stream_the_engine_breaks_off_ends_with_an_error_event(breaking_backend: str, start_router) -> None:
    router = start_router(breaking_backend, policy="round-robin")  # waits for the backend to turn ready
    stream = router.client().completions.create(model=MODEL_NAME, prompt="x", stream=True)
    texts = []
    with pytest.raises(openai.APIError, match="broke off its answer"):
        for chunk in stream:
            texts.append(chunk.choices[0].text)
    assert texts == ["a"]
    assert router.metric("pagoda_router_ejections_total", backend=breaking_backend) == 1
    assert httpx.get(f"{router.base_url}/health").status_code == 200


def test_an_answer_that_is_not_http_is_retried_on_another_backend(
    garbage_backend: str, engines: dict[str, LiveServer], start_router
) -> None:
    router = start_router(garbage_backend, engines["a"].base_url, policy="round-robin")
    client = router.client()
    for i in range(4):  # once a 500 from the router for every request sent to the garbage backend
        assert client.completions.create(model=MODEL_NAME, prompt=f"x{i}", max_tokens=2).choices
    assert router.metric("pagoda_router_retries_total", reason="bad-response") >= 1
