"""Helpers for the router tests (a uniquely named module: every test folder has its own `conftest`)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

_SERVER_CONFTEST = Path(__file__).resolve().parents[1] / "server" / "conftest.py"
_spec = importlib.util.spec_from_file_location("server_fixtures", _SERVER_CONFTEST)
server_fixtures = importlib.util.module_from_spec(_spec)
sys.modules["server_fixtures"] = server_fixtures  # dataclasses look their module up there
_spec.loader.exec_module(server_fixtures)  # type: ignore[union-attr]
LiveServer = server_fixtures.LiveServer
free_port = server_fixtures.free_port

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


def wait_until(
    condition: Callable[[], object], timeout: float = 30.0, log: Callable[[], str] = lambda: ""
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout} s\n{log()}")


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

    def wait_for(self, condition: Callable[[], object], timeout: float = 30.0) -> None:
        wait_until(condition, timeout, lambda: self.live.log()[-3000:])

    def ready_backends(self) -> int:
        return int(self.metric("pagoda_router_backend_ready"))
