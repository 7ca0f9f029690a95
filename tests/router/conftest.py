"""Real `pagoda serve` processes of a tiny random model on 127.0.0.1 behind real `pagoda router` processes.

The engines start in parallel (their start-up dominates these tests); each test builds its own routers,
which start in well under a second.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from router_testkit import LiveServer, Router, free_port, launch_engine, server_fixtures, wait_ready

tiny_model = server_fixtures.tiny_model  # the server tests' session fixture: a tiny random Llama


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
def long_tiny_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a 4,096-token context: streams that outlast a few polls of the metrics (it
    decodes 200 tokens in well under a second)."""
    model = shutil.copytree(tiny_model, tmp_path_factory.mktemp("long") / "tiny-llama-long")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    return model


@pytest.fixture(scope="session")
def engines(
    long_tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, LiveServer]]:
    """Four engines started together: a lives all session, b is drained and c killed by the last tests, d
    leaves the engines Service and drains in the scale-down test."""
    log_dir = tmp_path_factory.mktemp("engines")
    live = {name: launch_engine(log_dir, long_tiny_model) for name in "abcd"}
    try:
        for server in live.values():
            wait_ready(server)
        yield live
    finally:
        for server in live.values():
            server.stop(signal.SIGKILL)
