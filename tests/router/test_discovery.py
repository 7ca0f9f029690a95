"""Replicas discovered from EndpointSlices, watched through the kmock Kubernetes API emulator."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx
import kmock
import openai
import pytest
from router_testkit import MODEL_NAME, LiveServer, free_port

from pagoda.router.discovery import EndpointSliceWatcher, KubeAPI, slice_backends

NAMESPACE = "llm"
SLICES = f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices"


def endpoint_slice(name: str, service: str, port: int, endpoints: dict[str, bool]) -> dict[str, object]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name, "namespace": NAMESPACE, "uid": f"uid-{name}",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": [ip], "conditions": {"ready": ready, "serving": ready, "terminating": not ready}}
            for ip, ready in endpoints.items()
        ],
    }


async def until(condition: Callable[[], Awaitable[bool] | bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if await result if asyncio.iscoroutine(result) else result:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


@pytest.fixture()
def kube(kmock: kmock.KubernetesEmulator) -> kmock.KubernetesEmulator:
    kmock.resources.load_bundled()
    return kmock


def test_only_ready_endpoints_count() -> None:
    item = endpoint_slice("s", "engines", 8000, {"10.0.0.1": True, "10.0.0.2": False})
    item["endpoints"].append({"addresses": ["fd00::3"]})  # no conditions: ready, per the API
    assert slice_backends(item) == ["http://10.0.0.1:8000", "http://[fd00::3]:8000"]
    assert slice_backends(item, port_name="metrics") == []


@pytest.mark.asyncio
async def test_the_watch_follows_slices_of_its_service_only(kube: kmock.KubernetesEmulator) -> None:
    seen: list[list[str]] = []
    api = KubeAPI(str(kube.url).rstrip("/"), NAMESPACE)
    watcher = EndpointSliceWatcher(api, "engines", lambda urls: seen.append(list(urls)))
    async with aiohttp.ClientSession(base_url=str(kube.url)) as kube_api, aiohttp.ClientSession() as session:
        async def create(obj: dict[str, object]) -> None:
            async with kube_api.post(SLICES, json=obj) as response:
                assert response.status < 300, await response.text()

        await create(endpoint_slice("engines-1", "engines", 8000, {"10.0.0.1": True}))
        task = asyncio.create_task(watcher.run(session))
        try:
            await until(lambda: seen and seen[-1] == ["http://10.0.0.1:8000"])
            await create(endpoint_slice("other-1", "other", 8000, {"10.0.0.9": True}))
            await create(endpoint_slice("engines-2", "engines", 8000, {"10.0.0.2": True, "10.0.0.3": False}))
            await until(lambda: seen[-1] == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"])
            # a pod turning unready (draining) leaves at once
            patch = endpoint_slice("engines-2", "engines", 8000, {"10.0.0.2": False, "10.0.0.3": False})
            async with kube_api.patch(
                f"{SLICES}/engines-2", json=patch, headers={"Content-Type": "application/merge-patch+json"}
            ) as response:
                assert response.status < 300, await response.text()
            await until(lambda: seen[-1] == ["http://10.0.0.1:8000"])
            async with kube_api.delete(f"{SLICES}/engines-1") as response:
                assert response.status < 300
            await until(lambda: seen[-1] == [])
            assert all("10.0.0.9" not in url for urls in seen for url in urls)
        finally:
            task.cancel()


@pytest.mark.asyncio
async def test_a_request_waits_until_discovery_brings_a_replica(
    kube: kmock.KubernetesEmulator, engines: dict[str, LiveServer], tmp_path: Path
) -> None:
    """Scale from zero: the router holds the request until the engines' Service gets a ready endpoint."""
    engine = engines["a"]
    engine_port = int(engine.base_url.rsplit(":", 1)[1])
    port = free_port()
    command = [
        sys.executable, "-m", "pagoda", "router", "--host", "127.0.0.1", "--port", str(port),
        "--discovery-service", "engines", "--discovery-namespace", NAMESPACE,
        "--kube-api-server", str(kube.url), "--hold-timeout", "60", "--health-interval", "0.2",
    ]
    log = tmp_path / "router.log"
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ})
    router = LiveServer(process, f"http://127.0.0.1:{port}", log, None)
    try:
        async with httpx.AsyncClient(base_url=router.base_url) as http:
            async def metric(name: str) -> float:
                text = (await http.get("/metrics")).text
                lines = text.splitlines()
                return sum(float(line.split()[-1]) for line in lines if line.startswith(name + " "))

            async def up() -> bool:
                try:
                    return (await http.get("/health")).status_code == 200
                except httpx.TransportError:
                    return False

            await until(up, timeout=60)
            client = openai.AsyncOpenAI(base_url=f"{router.base_url}/v1", api_key="none", max_retries=0)
            pending = asyncio.create_task(
                client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=4, temperature=0)
            )
            async def one_pending() -> bool:
                return await metric("pagoda_router_pending_requests") == 1

            await until(one_pending)
            async with httpx.AsyncClient(base_url=str(kube.url)) as kube_api:
                obj = endpoint_slice("engines-a", "engines", engine_port, {"127.0.0.1": True})
                assert (await kube_api.post(SLICES, json=obj)).status_code < 300
            reply = await asyncio.wait_for(pending, 60)
            assert reply.choices[0].text
            assert await metric("pagoda_router_pending_requests") == 0
            assert await metric("pagoda_router_queue_time_seconds_count") == 1
    finally:
        await asyncio.to_thread(router.stop)
    assert process.returncode == 0, router.log()[-3000:]
