"""Replicas discovered from EndpointSlices, watched through the kmock Kubernetes API emulator."""

from __future__ import annotations

import asyncio
import os
import signal
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
from prometheus_client.parser import text_string_to_metric_families
from router_testkit import MODEL_NAME, LiveServer, free_port

from pagoda.router.discovery import (
    LIST_TIMEOUT_S,
    RELIST_DELAY_S,
    EndpointSliceWatcher,
    KubeAPI,
    slice_backends,
)

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


def test_an_engine_pod_serves_until_the_routers_have_dropped_it() -> None:
    """A deleted pod leaves its EndpointSlice as its preStop sleep starts; SIGTERM (the drain: 503 to new
    requests) comes after the sleep, which must outlast the router's worst lag behind the API server, and
    the grace period must hold the sleep and the drain."""
    from pagoda_operator import builders
    from pagoda_operator.spec import parse_spec

    spec = parse_spec({"model": {"source": "builtin://smollm2-135m-instruct"}})
    pod = builders.build_deployment("m", NAMESPACE, spec)["spec"]["template"]["spec"]
    (engine,) = pod["containers"]
    pre_stop = engine["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop >= RELIST_DELAY_S + LIST_TIMEOUT_S
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + spec.engine.shutdown_timeout_seconds


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
    router = start_discovery_router(kube, tmp_path, "--hold-timeout", "60")
    try:
        async with httpx.AsyncClient(base_url=router.base_url) as http:
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
                return await metric(router.base_url, "pagoda_router_pending_requests") == 1

            await until(one_pending)
            async with httpx.AsyncClient(base_url=str(kube.url)) as kube_api:
                obj = endpoint_slice("engines-a", "engines", engine_port, {"127.0.0.1": True})
                assert (await kube_api.post(SLICES, json=obj)).status_code < 300
            reply = await asyncio.wait_for(pending, 60)
            assert reply.choices[0].text
            assert await metric(router.base_url, "pagoda_router_pending_requests") == 0
            assert await metric(router.base_url, "pagoda_router_queue_time_seconds_count") == 1
    finally:
        await asyncio.to_thread(router.stop)
    assert router.process.returncode == 0, router.log()[-3000:]


def start_discovery_router(kube: kmock.KubernetesEmulator, tmp_path: Path, *flags: str) -> LiveServer:
    port = free_port()
    command = [
        sys.executable, "-m", "pagoda", "router", "--host", "127.0.0.1", "--port", str(port),
        "--discovery-service", "engines", "--discovery-namespace", NAMESPACE,
        "--kube-api-server", str(kube.url), "--health-interval", "0.2", *flags,
    ]
    log = tmp_path / f"router-{port}.log"
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ})
    return LiveServer(process, f"http://127.0.0.1:{port}", log, None)


async def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels` (0 when there is none)."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{url}/metrics", timeout=10)).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


@pytest.mark.asyncio
async def test_a_pod_leaving_the_engines_service_gets_nothing_new_and_finishes_its_streams(
    kube: kmock.KubernetesEmulator, engines: dict[str, LiveServer], tmp_path: Path
) -> None:
    """Scale-down and rollouts lose no request. Engine d leaves the router's set as the endpoints controller
    writes it, twice, each time while streams run on it: dropped from its slice (a demotion relabels the
    pod out of the engines Service), then, back again, `ready: false, terminating: true` (the pod was
    deleted; its preStop sleep keeps it serving), after which it gets SIGTERM and drains at once (a preStop
    sleep no longer than the router's lag). From the slice change on, the router sends d nothing, not even
    a try that it retries elsewhere; d's streams run to their last token; no client sees an error."""
    leave = engines["d"]

    def endpoints(name: str, **conditions: bool) -> dict[str, object]:
        """Engine `name`'s slice (one per engine: they share an address and differ in port)."""
        port = int(engines[name].base_url.rsplit(":", 1)[1])
        return endpoint_slice(f"engines-{name}", "engines", port, {"127.0.0.1": True}) | (
            {"endpoints": [{"addresses": ["127.0.0.1"], "conditions": conditions}]} if conditions else {}
        )

    async with httpx.AsyncClient(base_url=str(kube.url)) as kube_api:
        for name in "ad":
            assert (await kube_api.post(SLICES, json=endpoints(name))).status_code < 300

        async def patch_d(change: dict[str, object]) -> None:
            headers = {"Content-Type": "application/merge-patch+json"}
            response = await kube_api.patch(f"{SLICES}/engines-d", json=change, headers=headers)
            assert response.status_code < 300, response.text

        router = start_discovery_router(kube, tmp_path, "--policy", "round-robin")
        client = openai.AsyncOpenAI(base_url=f"{router.base_url}/v1", api_key="none", max_retries=0)

        async def ready_backends() -> float:
            try:
                return await metric(router.base_url, "pagoda_router_backend_ready")
            except httpx.TransportError:
                return 0

        async def in_set(engine: LiveServer) -> bool:
            return bool(await metric(router.base_url, "pagoda_router_backend_ready", backend=engine.base_url))

        async def sent_to(engine: LiveServer) -> float:
            return await metric(router.base_url, "pagoda_router_requests_total", backend=engine.base_url)

        async def stream(i: int) -> str | None:
            chunks = await client.completions.create(
                model=MODEL_NAME, prompt=f"stream {i}", max_tokens=1500, temperature=0, stream=True,
                extra_body={"ignore_eos": True},
            )
            finish = None
            async for chunk in chunks:
                finish = chunk.choices[0].finish_reason or finish
            return finish  # "length": every token arrived

        async def ask(i: int) -> str | None:
            reply = await client.completions.create(model=MODEL_NAME, prompt=f"new {i}", max_tokens=4)
            return reply.choices[0].finish_reason

        async def leaves(change: dict[str, object], sigterm: bool) -> None:
            finished = await metric(leave.base_url, "vllm:request_success_total")
            before = await sent_to(leave)
            streams = [asyncio.create_task(stream(i)) for i in range(4)]  # round-robin: two on d

            async def both_running() -> bool:
                return await sent_to(leave) - before == 2 and (
                    await metric(leave.base_url, "vllm:num_requests_running") > 0
                )

            async def gone() -> bool:
                return not await in_set(leave)

            async def finished_its_own() -> bool:  # d's own count
                return await metric(leave.base_url, "vllm:request_success_total") == finished + 2

            await until(both_running)
            await patch_d(change)
            await until(gone)
            if sigterm:
                leave.process.send_signal(signal.SIGTERM)
            replies = await asyncio.gather(*(ask(i) for i in range(6)))  # raises on any client error
            assert await asyncio.gather(*streams) == ["length"] * 4 and all(replies)
            assert await sent_to(leave) - before == 2  # nothing new since it left
            if not sigterm:
                await until(finished_its_own)

        async def two_ready() -> bool:
            return await ready_backends() == 2

        try:
            await until(two_ready, timeout=60)
            await leaves({"endpoints": []}, sigterm=False)  # demoted: relabelled out of the Service
            await patch_d(endpoints("d"))  # promoted again
            await until(two_ready)
            terminating = {"ready": False, "serving": True, "terminating": True}
            await leaves(endpoints("d", **terminating), sigterm=True)  # deleted
            assert await asyncio.to_thread(leave.process.wait, 60) == 0, leave.log()[-3000:]
            assert await metric(router.base_url, "pagoda_router_retries_total") == 0
            assert await ask(99)  # and the router carries on with a alone
        finally:
            await asyncio.to_thread(router.stop)
    assert router.process.returncode == 0, router.log()[-3000:]
