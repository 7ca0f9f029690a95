"""Scale from zero and back, end to end: the operator on the kmock emulator reads the held requests of a
real `pagoda router` process on 127.0.0.1 (standing in for the router pod), promotes the warm pod at
once, and scales back to zero only after a quiet stabilization window."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import AsyncIterator

import aiohttp
import kmock
import pytest
import pytest_asyncio
from aiohttp import web
from llmd_testkit import (
    BUILTIN,
    LLMD_RESOURCE,
    api_call,
    api_path,
    condition,
    create_llmd,
    fake_pod,
    obj,
    posted_events,
    router_pod,
    serving_pods,
    status,
    wait_for,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest_asyncio.fixture()
async def router_port() -> AsyncIterator[int]:
    """`pagoda router` whose only backend is down: every request is held (scale from zero)."""
    port = free_port()
    dead = f"http://127.0.0.1:{free_port()}"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pagoda", "router", "--host", "127.0.0.1", "--port", str(port),
        "--backend", dead, "--hold-timeout", "50", "--health-interval", "0.2",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip

    async def healthy() -> bool:
        url = f"http://127.0.0.1:{port}/health"
        try:
            async with aiohttp.ClientSession() as session, session.get(url) as response:
                return response.status == 200
        except aiohttp.ClientError:
            assert process.returncode is None, "the router exited"
            return False

    await wait_for(healthy, timeout=30)
    yield port
    process.terminate()
    await process.wait()


@pytest_asyncio.fixture()
async def idle_engine_port() -> AsyncIterator[int]:
    """An idle engine's /metrics (nothing queued or running)."""

    async def handle(request: web.Request) -> web.Response:
        return web.Response(
            text="vllm:num_requests_waiting 0\nvllm:num_requests_running 0\nvllm:kv_cache_usage_perc 0\n"
        )

    app = web.Application()
    app.router.add_get("/metrics", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    await runner.cleanup()


async def held_request(port: int) -> None:
    async with aiohttp.ClientSession() as session:
        body = {"model": "zero", "prompt": "hello", "max_tokens": 1}
        async with session.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as response:
            await response.read()


async def test_scales_from_zero_on_held_requests_and_back_after_a_quiet_window(
    operator: kmock.KubernetesEmulator, router_port: int, idle_engine_port: int
) -> None:
    kube = operator
    await create_llmd(
        kube,
        "zero",
        {
            "model": BUILTIN,
            "replicas": 0,
            "warmPool": {"size": 1},
            "autoscaling": {
                "enabled": True,
                "minReplicas": 0,
                "maxReplicas": 2,
                "scaleDownStabilizationSeconds": 2,
            },
        },
    )
    warm = "zero-pod-0"
    pod = fake_pod("zero", warm, ready=True, created="2026-01-01T00:00:00Z", ip="127.0.0.1")
    pod["metadata"]["annotations"]["prometheus.io/port"] = str(idle_engine_port)
    await api_call(kube, "POST", api_path("pods"), pod)
    # Zero serving replicas are all there should be, but the Service has no router to hold requests yet.
    await wait_for(lambda: condition(kube, "zero", "Ready").get("reason") == "WaitingForRouter")
    await api_call(kube, "POST", api_path("pods"), router_pod("zero", router_port))
    await wait_for(lambda: condition(kube, "zero", "Ready").get("status") == "True")
    # At zero replicas the ready pod waits in the warm pool, and the quiet router keeps it there.
    await wait_for(lambda: not serving_pods(kube, [warm]))
    await wait_for(lambda: (status(kube, "zero").get("autoscaler") or {}).get("recommendedReplicas") == 0)

    request = asyncio.create_task(held_request(router_port))
    await wait_for(lambda: obj(kube, LLMD_RESOURCE, "zero")["spec"]["replicas"] == 1)
    await wait_for(lambda: serving_pods(kube, [warm]) == {warm})  # promoted: no cold start
    await wait_for(lambda: posted_events(kube, "ScaledUp"))

    request.cancel()  # the client goes away: the router holds nothing any more
    quiet = time.monotonic()
    await wait_for(lambda: obj(kube, LLMD_RESOURCE, "zero")["spec"]["replicas"] == 0, timeout=20)
    assert time.monotonic() - quiet >= 2.0
    await wait_for(lambda: not serving_pods(kube, [warm]))
