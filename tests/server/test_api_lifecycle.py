"""Readiness, the queue limit, and the SIGTERM drain, each on a server of its own."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import LiveServer, start_server

LONG = {"prompt": "go", "max_tokens": 240, "stream": True, "ignore_eos": True}


class StreamReader(threading.Thread):
    """Reads one SSE stream to its end; `started` is set at the first data line."""

    def __init__(self, server: LiveServer, body: dict) -> None:
        super().__init__(daemon=True)
        self.server, self.body = server, body
        self.started = threading.Event()
        self.events: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream(
                "POST", f"{self.server.base_url}/v1/completions", json=self.body, timeout=120
            ) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[len("data: ") :])
                        self.started.set()
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.error = error
        finally:
            self.started.set()

    @property
    def payloads(self) -> list[dict]:
        return [json.loads(e) for e in self.events if e != "[DONE]"]


def start_streams(server: LiveServer, count: int, body: dict) -> list[StreamReader]:
    readers = [StreamReader(server, body) for _ in range(count)]
    for reader in readers:
        reader.start()
    for reader in readers:
        assert reader.started.wait(60)
    return readers


# Streams that run long enough for the queue to be seen full (the tiny model decodes 240 tokens in well under
# a second): the tiny model with a longer context.
DRAINED = {**LONG, "max_tokens": 1200}


@pytest.fixture
def drain_server(tiny_model: Path, tmp_path: Path) -> LiveServer:
    model = shutil.copytree(tiny_model, tmp_path / "tiny-llama-long")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1280}))
    server = start_server(tmp_path, str(model), "--max-num-seqs", "2", "--max-queue-len", "1")
    yield server
    server.stop(signal.SIGKILL)


def test_queue_limit_then_sigterm_lets_streams_finish(drain_server: LiveServer) -> None:
    server = drain_server
    # two running (--max-num-seqs 2) and one waiting fill the queue (--max-queue-len 1)
    readers = start_streams(server, 2, DRAINED)
    readers.append(StreamReader(server, DRAINED))
    readers[-1].start()
    deadline = time.monotonic() + 60
    while server.metric("vllm:num_requests_waiting") < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    response = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert response.status_code == 429 and response.json()["error"]["code"] == "queue_full"
    assert int(response.headers["Retry-After"]) >= 1

    server.process.send_signal(signal.SIGTERM)
    assert httpx.get(f"{server.base_url}/ready").status_code == 503  # at once, while streams still run
    refused = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_shutting_down"
    assert int(refused.headers["Retry-After"]) >= 1
    assert server.process.wait(60) == 0
    for reader in readers:
        reader.join(10)
        assert reader.error is None and reader.events[-1] == "[DONE]"
        assert reader.payloads[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(len(p["choices"][0]["text"]) > 0 for p in reader.payloads) > 0


def test_sigterm_aborts_what_outlives_the_shutdown_timeout(tiny_model: Path, tmp_path: Path) -> None:
    server = start_server(tmp_path, str(tiny_model), "--shutdown-timeout", "0")
    try:
        readers = start_streams(server, 2, LONG)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(60) == 0
        for reader in readers:
            reader.join(10)
            assert reader.events[-1] == "[DONE]"
            assert reader.payloads[-1]["error"]["code"] is None or reader.payloads[-1]["error"]
            assert "shutting down" in reader.payloads[-1]["error"]["message"]
    finally:
        server.stop(signal.SIGKILL)


def test_second_signal_exits_at_once(tiny_model: Path, tmp_path: Path) -> None:
    server = start_server(tmp_path, str(tiny_model), "--shutdown-timeout", "60")
    try:
        start_streams(server, 1, {**LONG, "max_tokens": 250})
        server.process.send_signal(signal.SIGTERM)
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(10) != 0
    finally:
        server.stop(signal.SIGKILL)


def test_a_model_that_cannot_load_exits_non_zero(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="exited with 1"):
        start_server(tmp_path, str(tmp_path / "missing.gguf"))
