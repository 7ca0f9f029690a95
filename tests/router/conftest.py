"""Real `pagoda serve` processes of a tiny random model on 127.0.0.1 behind real `pagoda router` processes.

The engines start in parallel (their start-up dominates these tests); each test builds its own routers,
which start in well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

_SERVER_CONFTEST = Path(__file__).resolve().parents[1] / "server" / "conftest.py"
_spec = importlib.util.spec_from_file_location("server_fixtures", _SERVER_CONFTEST)
server_fixtures = importlib.util.module_from_spec(_spec)
sys.modules["server_fixtures"] = server_fixtures  # dataclasses look their module up there
_spec.loader.exec_module(server_fixtures)  # type: ignore[union-attr]
LiveServer = server_fixtures.LiveServer
free_port = server_fixtures.free_port
tiny_model = server_fixtures.tiny_model  # the session fixture: a tiny random Llama

MODEL_NAME = "tiny"
READY_TIMEOUT_S = 180


def launch_engine(log_dir: Path, model: Path, port: int | None = None, *extra: str) -> LiveServer:
    """Start `pagoda serve` without waiting for it (see wait_ready)."""
    port = port or free_port()
    log_path = log_dir / f"engine-{port}.log"
    command = [
        sys.executable, "-m", "pagoda", "serve", str(model), "--served-model-name", MODEL_NAME,
        "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", "16", *extra,
    ]
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    return LiveServer(process, f"http://127.0.0.1:{port}", log_path, None)


def wait_ready(server: LiveServer, path: str = "/ready", timeout: float = READY_TIMEOUT_S) -> LiveServer:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"exited with {server.process.returncode}:\n{server.log()[-4000:]}")
        try:
            if httpx.get(f"{server.base_url}{path}", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"not ready within {timeout} s:\n{server.log()[-4000:]}")


@dataclass
class Router:
    live: LiveServer

    @property
    def base_url(self) -> str:
        return self.live.base_url

    def client(self, **options: object) -> openai.OpenAI:
        return self.live.client(**options)

    def metric(self, name: str, **labels: str) -> float:
        return self.live.metric(name, **labels)

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        return [
            (sample.labels, sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name
        ]

    def wait_for(self, condition: object, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():  # type: ignore[operator]
                return
            time.sleep(0.02)
        raise AssertionError(f"condition not met within {timeout} s:\n{self.live.log()[-3000:]}")

    def ready_backends(self) -> int:
        return int(self.metric("pagoda_router_backend_ready"))


@pytest.fixture()
def start_router(tmp_path: Path) -> Iterator[object]:
    routers: list[LiveServer] = []

    def start(*backends: str, wait_backends: int | None = None, **flags: object) -> Router:
        port = free_port()
        command = [sys.executable, "-m", "pagoda", "router", "--host", "127.0.0.1", "--port", str(port)]
        for backend in backends:
            command += ["--backend", backend]
        flags.setdefault("health_interval", 0.2)
        for name, value in flags.items():
            command += [f"--{name.replace('_', '-')}", str(value)]
        log_path = tmp_path / f"router-{port}.log"
        with log_path.open("w") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            )
        router = Router(LiveServer(process, f"http://127.0.0.1:{port}", log_path, None))
        routers.append(router.live)
        wait_ready(router.live, "/health", timeout=60)
        expected = len(backends) if wait_backends is None else wait_backends
        router.wait_for(lambda: router.ready_backends() >= expected)
        return router

    yield start
    for live in routers:
        assert live.stop() == 0, live.log()[-3000:]


@pytest.fixture(scope="session")
def engines(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LiveServer]]:
    """Three engines started together: a lives all session, b is drained and c killed by the last tests."""
    log_dir = tmp_path_factory.mktemp("engines")
    live = {name: launch_engine(log_dir, tiny_model) for name in "abc"}
    try:
        for server in live.values():
            wait_ready(server)
        yield live
    finally:
        for server in live.values():
            server.stop(signal.SIGKILL)
