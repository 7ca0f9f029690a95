"""The builtin autoscaler end to end, with real `pagoda serve` processes on 127.0.0.1 standing in for pods.

kopf runs against the kmock emulator as in test_operator_e2e.py, and the fake pods point at the engines
through their IP and `prometheus.io/port` annotation, which is where the operator scrapes a real pod.
Each engine runs a tiny random Llama one sequence at a time, so concurrent completions queue up and
`vllm:num_requests_waiting` rises: the replica counts below follow from the engines' own gauges.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import kmock
import pytest
from llmd_testkit import (
    LLMD_RESOURCE,
    api_call,
    api_path,
    condition,
    create_llmd,
    fake_pod,
    obj,
    posted_events,
    schema_errors,
    serving_pods,
    status,
    wait_for,
)
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]

NAME = "live"
MODEL_NAME = "tiny"
READY_TIMEOUT_S = 120
# One sequence at a time, so that concurrent requests queue.
ENGINE_FLAGS = ("--host", "127.0.0.1", "--served-model-name", MODEL_NAME, "--max-num-seqs", "1")
CLIENTS = 6  # per engine: one request runs, five wait
TARGET_WAITING = 2
SCALE_DOWN_WINDOW_S = 2
AUTOSCALED_SPEC = {
    "model": {"source": "builtin://smollm2-135m-instruct"},  # the operator never loads it here
    "replicas": 1,
    "autoscaling": {
        "enabled": True,
        "mode": "builtin",
        "minReplicas": 1,
        "maxReplicas": 2,
        "targetWaitingRequests": TARGET_WAITING,
        # A running sequence of the tiny model fills at most 5 of the 16 KV blocks: only the queue scales.
        "targetKVCacheUsage": 0.8,
        "scaleDownStabilizationSeconds": SCALE_DOWN_WINDOW_S,
    },
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Engine:
    """One `pagoda serve` process on 127.0.0.1."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @classmethod
    def start(cls, model: Path, log_dir: Path) -> Engine:
        port = free_port()
        log_path = log_dir / f"engine-{port}.log"
        command = [sys.executable, "-m", "pagoda", "serve", str(model), "--port", str(port), *ENGINE_FLAGS]
        # One thread each: two engines and the operator share a small machine.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        with log_path.open("w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        return cls(process, port, log_path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pagoda serve exited with {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"pagoda serve was not ready within {READY_TIMEOUT_S} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    async def waiting(self) -> float:
        """The engine's own `vllm:num_requests_waiting`, read directly (not through the operator)."""
        async with httpx.AsyncClient(base_url=self.url, timeout=5) as client:
            text = (await client.get("/metrics")).text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "vllm:num_requests_waiting"
        )


@dataclass
class EngineLoad:
    """`clients` clients sending one long completion after another to an engine until stopped. Stopping
    closes their connections, and the engine aborts their requests, queued and running, at once."""

    engine: Engine
    clients: int
    _client: httpx.AsyncClient | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def __aenter__(self) -> EngineLoad:
        self._client = httpx.AsyncClient(base_url=self.engine.url, timeout=60)
        self._tasks = [asyncio.create_task(self._send_forever()) for _ in range(self.clients)]
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def _send_forever(self) -> None:
        assert self._client is not None
        body = {"model": MODEL_NAME, "prompt": "scale me", "max_tokens": 64, "ignore_eos": True}
        while True:
            (await self._client.post("/v1/completions", json=body)).raise_for_status()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        failures = [r for r in results if not isinstance(r, asyncio.CancelledError)]
        assert not failures, f"the load's requests failed: {failures}\n{self.engine.log()}"


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Engine, Engine]]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))  # tiny_models lives there
    from tiny_models import make_tiny_model

    model = make_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "tiny-llama")
    log_dir = tmp_path_factory.mktemp("engines")
    started = [Engine.start(model, log_dir) for _ in range(2)]  # both load at the same time
    try:
        for engine in started:
            engine.wait_ready()
        yield started[0], started[1]
    finally:
        for engine in started:
            engine.stop()


async def has_queue(engine: Engine) -> bool:
    return await engine.waiting() > TARGET_WAITING


async def is_idle(engine: Engine) -> bool:
    return await engine.waiting() == 0


def replicas(kube: kmock.KubernetesEmulator) -> int:
    return obj(kube, LLMD_RESOURCE, NAME)["spec"]["replicas"]  # type: ignore[index]


def autoscaler_status(kube: kmock.KubernetesEmulator) -> dict[str, Any]:
    return status(kube, NAME).get("autoscaler") or {}


async def add_ready_pod(kube: kmock.KubernetesEmulator, name: str, engine: Engine, created: str) -> str:
    """The pod the Deployment would have created, its IP and metrics port those of a real engine."""
    pod = fake_pod(NAME, name, ready=True, created=created, ip="127.0.0.1", metrics_port=engine.port)
    await api_call(kube, "POST", api_path("pods"), pod)
    return name


async def test_scales_on_the_queue_of_real_engines(
    operator: kmock.KubernetesEmulator, engines: tuple[Engine, Engine]
) -> None:
    kube = operator
    first, second = engines
    await create_llmd(kube, NAME, AUTOSCALED_SPEC)
    pods = [await add_ready_pod(kube, f"{NAME}-pod-0", first, created="2026-01-01T00:00:00Z")]
    await wait_for(lambda: serving_pods(kube, pods) == set(pods))

    # Idle: the tick reads the engine's real /metrics page (AtTarget, not NoMetrics) and holds.
    await wait_for(lambda: condition(kube, NAME, "ScalingActive").get("reason") == "AtTarget")
    assert replicas(kube) == 1
    assert autoscaler_status(kube)["waitingRequests"] == 0

    async with contextlib.AsyncExitStack() as loads:
        first_load = await loads.enter_async_context(EngineLoad(first, CLIENTS))
        # One sequence at a time: five requests wait, ceil(5 / 2) = 3, capped at maxReplicas 2.
        await wait_for(lambda: replicas(kube) == 2, timeout=20)
        assert autoscaler_status(kube)["waitingRequests"] > TARGET_WAITING
        await wait_for(lambda: obj(kube, "apps/v1/deployments", NAME)["spec"]["replicas"] == 2)
        await wait_for(lambda: posted_events(kube, "ScaledUp"))

        # The new pod, the second engine, turns ready and joins the Service.
        pods.append(await add_ready_pod(kube, f"{NAME}-pod-1", second, created="2026-01-01T00:01:00Z"))
        await wait_for(lambda: serving_pods(kube, pods) == set(pods))

        # The queue moves to the second engine: scraped on its own port, it alone keeps both replicas
        # for longer than the scale-down window.
        await loads.enter_async_context(EngineLoad(second, CLIENTS))
        await wait_for(lambda: has_queue(second), timeout=15)
        await first_load.stop()
        await wait_for(lambda: is_idle(first))  # the engine aborts the requests of closed connections
        await asyncio.sleep(SCALE_DOWN_WINDOW_S + 1.5)
        assert replicas(kube) == 2
        assert autoscaler_status(kube)["waitingRequests"] > TARGET_WAITING
    drained = time.monotonic()

    # The load is gone: back to minReplicas, but only after the stabilization window.
    await wait_for(lambda: replicas(kube) == 1, timeout=15)
    assert time.monotonic() - drained >= SCALE_DOWN_WINDOW_S
    await wait_for(lambda: len(serving_pods(kube, pods)) == 1)
    await wait_for(lambda: posted_events(kube, "ScaledDown"))
    assert autoscaler_status(kube)["waitingRequests"] == 0
    assert schema_errors(obj(kube, LLMD_RESOURCE, NAME)) == []  # type: ignore[arg-type]
