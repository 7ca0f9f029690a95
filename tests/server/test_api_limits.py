"""Limits that keep one client from holding the server: fair admission, a queue that counts sequences,
bounded request sizes, template render time, and read timeouts for half-open connections. One server with
small limits: 2 batch slots, 16 queued sequences, a 2 s read timeout, request chat templates allowed."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import LiveServer, start_server

# 8 rounds of 2 sequences: the small request must only arrive before the last round for the test to hold
BIG = {"prompt": "go", "n": 16, "max_tokens": 160, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def limited(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server(
        tmp_path_factory.mktemp("limited"),
        str(tiny_model),
        "--max-num-seqs", "2",
        "--max-queue-len", "16",
        "--http-read-timeout", "2",
        "--trust-request-chat-template",
    )  # fmt: skip
    yield server
    server.stop(signal.SIGKILL)


class Stream(threading.Thread):
    def __init__(self, base_url: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.base_url, self.body = base_url, body
        self.first = threading.Event()
        self.done = threading.Event()
        self.finished_choices = 0

    def run(self) -> None:
        try:
            with httpx.stream("POST", f"{self.base_url}/v1/completions", json=self.body, timeout=300) as r:
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        break
                    if line.startswith("data: "):
                        choices = json.loads(line[6:])["choices"]
                        self.finished_choices += sum(c["finish_reason"] is not None for c in choices)
                        self.first.set()
        finally:
            self.first.set()
            self.done.set()


def completions(server: LiveServer, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=120)


def test_a_big_request_neither_starves_a_small_one_nor_overflows_the_queue(limited: LiveServer) -> None:
    big = Stream(limited.base_url, BIG)
    big.start()
    assert big.first.wait(120)
    # 2 of its sequences run, up to 14 wait: 16 more overflow the 16-sequence queue, 1 more does not
    full = completions(limited, {"prompt": "x", "n": 16, "max_tokens": 2})
    assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full", full.text
    assert int(full.headers["Retry-After"]) >= 1
    small = completions(limited, {"prompt": "x", "max_tokens": 4, "ignore_eos": True})
    assert small.status_code == 200 and small.json()["usage"]["completion_tokens"] == 4
    # FIFO admission would have run the small request only after all 16 of the big one's sequences
    assert not big.done.is_set() and big.finished_choices < 16
    assert big.done.wait(300) and big.finished_choices == 16
    limited.wait_idle()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "n": 17, "max_tokens": 1}, "n"),  # can never fit the 16-sequence queue
        ({"prompt": ["x"] * 20, "n": 10, "max_tokens": 1}, "n"),  # 200 sequences in one request
    ],
)
def test_oversized_requests_are_400(limited: LiveServer, body: dict, param: str) -> None:
    response = completions(limited, body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def chat(server: LiveServer, body: dict) -> httpx.Response:
    messages = [{"role": "user", "content": "hello"}]
    return httpx.post(
        f"{server.base_url}/v1/chat/completions", json={"messages": messages, **body}, timeout=60
    )


def test_a_trusted_request_template_is_used_and_its_render_time_is_bounded(limited: LiveServer) -> None:
    plain = chat(
        limited, {"chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}", "max_tokens": 1}
    )
    assert plain.status_code == 200 and plain.json()["usage"]["prompt_tokens"] == len("hello")
    loop = "{% for i in range(n) %}{% for j in range(n) %}{% endfor %}{% endfor %}"
    start = time.monotonic()
    slow = chat(limited, {"chat_template": loop, "chat_template_kwargs": {"n": 100000}, "max_tokens": 1})
    assert slow.status_code == 400 and slow.json()["error"]["code"] == "template_timeout", slow.text
    assert time.monotonic() - start < 30  # the loop would run for hours
    assert httpx.get(f"{limited.base_url}/health", timeout=5).status_code == 200


def read_until_closed(sock: socket.socket, timeout: float = 20) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.mark.parametrize(
    ("sent", "answer"),
    [
        (b"", b""),  # connects and says nothing
        (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n", b""),  # headers never finish
        (
            b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"prompt": ',
            b"HTTP/1.1 408",  # the body never finishes
        ),
    ],
)
def test_half_open_connections_are_dropped(limited: LiveServer, sent: bytes, answer: bytes) -> None:
    port = int(limited.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(sent)
        start = time.monotonic()
        received = read_until_closed(sock)  # raises TimeoutError if the server holds the connection
        assert received.startswith(answer) and time.monotonic() - start < 20
