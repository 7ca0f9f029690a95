"""kopf + pagoda_operator against the kmock Kubernetes API emulator, end to end.

Changes go through the emulator's HTTP API (as kubectl would), so the operator sees them on its watches.
kmock runs no controllers: the tests create the pods a Deployment would create and flip their readiness.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import kmock
import kubernetes_validate
import pytest
import pytest_asyncio
from aiohttp import web
from llmd_testkit import (
    BUILTIN,
    DEPLOYMENTS,
    LLMD_RESOURCE,
    NAMESPACE,
    PDBS,
    PODS,
    PVCS,
    SERVICES,
    SERVING,
    api_call,
    api_path,
    condition,
    create_llmd,
    fake_pod,
    obj,
    pod_status,
    posted_events,
    router_pod,
    schema_errors,
    serving_pods,
    status,
    wait_for,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

HPAS = "autoscaling/v2/horizontalpodautoscalers"


async def create_pods(kube: kmock.KubernetesEmulator, instance: str, count: int, **kwargs: Any) -> list[str]:
    names = []
    for i in range(count):
        name = f"{instance}-pod-{i}"
        await api_call(
            kube,
            "POST",
            api_path("pods"),
            fake_pod(instance, name, created=f"2026-01-01T00:00:{i:02d}Z", **kwargs),
        )
        names.append(name)
    return names


async def test_creates_owned_children_and_reports_status(operator: kmock.KubernetesEmulator) -> None:
    kube = operator
    await create_llmd(kube, "demo", {"model": BUILTIN, "warmPool": {"size": 1}, "cache": {"enabled": True}})
    deployment = await wait_for(lambda: obj(kube, DEPLOYMENTS, "demo"))
    service = await wait_for(lambda: obj(kube, SERVICES, "demo"))
    pdb = await wait_for(lambda: obj(kube, PDBS, "demo"))
    pvc = await wait_for(lambda: obj(kube, PVCS, "demo-model-cache"))
    for child in (deployment, service, pdb, pvc):
        (owner,) = child["metadata"]["ownerReferences"]
        assert owner == {
            "apiVersion": "pagoda.dev/v1alpha1",
            "kind": "LLMDeployment",
            "name": "demo",
            "uid": "uid-demo",
            "controller": True,
            "blockOwnerDeletion": True,
        }
        kubernetes_validate.validate(child, "1.32.0", strict=True)  # what was applied, after adoption
    assert deployment["spec"]["replicas"] == 2  # 1 serving + 1 warm
    # The router is on by default: the Service selects its pods, the headless one the serving engines.
    assert service["spec"]["selector"]["app.kubernetes.io/name"] == "pagoda-router"
    engines = await wait_for(lambda: obj(kube, SERVICES, "demo-engines"))
    assert engines["spec"]["selector"][SERVING] == "true"
    assert obj(kube, HPAS, "demo") is None
    current = await wait_for(lambda: status(kube, "demo").get("endpoint") and status(kube, "demo"))
    assert current["endpoint"] == "http://demo.ml.svc.cluster.local:8000/v1"
    assert (
        current["selector"]
        == "app.kubernetes.io/instance=demo,app.kubernetes.io/name=pagoda,pagoda.dev/serving=true"
    )
    assert current["observedGeneration"] == 1
    assert condition(kube, "demo", "Ready")["status"] == "False"  # no pod is ready yet
    assert condition(kube, "demo", "Degraded")["status"] == "False"
    assert condition(kube, "demo", "ScalingActive")["reason"] == "AutoscalingDisabled"
    await wait_for(lambda: posted_events(kube, "Created"))


async def test_spec_change_rolls_out_and_the_scale_subresource_drives_the_deployment(
    operator: kmock.KubernetesEmulator,
) -> None:
    kube = operator
    await create_llmd(kube, "roll", {"model": BUILTIN, "warmPool": {"size": 1}})
    await wait_for(lambda: obj(kube, DEPLOYMENTS, "roll"))

    await api_call(
        kube, "PATCH", api_path("llmdeployments", "roll"), {"spec": {"engine": {"maxModelLen": 4096}}}
    )

    def engine_args() -> list[str]:
        return obj(kube, DEPLOYMENTS, "roll")["spec"]["template"]["spec"]["containers"][0]["args"]

    await wait_for(lambda: "--max-model-len" in engine_args())
    assert engine_args()[engine_args().index("--max-model-len") + 1] == "4096"
    await wait_for(lambda: posted_events(kube, "Updated"))

    # `kubectl scale llmd roll --replicas=3` / an HPA write the scale subresource.
    await api_call(kube, "PATCH", api_path("llmdeployments", "roll", "scale"), {"spec": {"replicas": 3}})
    await wait_for(lambda: obj(kube, DEPLOYMENTS, "roll")["spec"]["replicas"] == 4)  # 3 serving + 1 warm


async def test_drifted_or_deleted_children_are_repaired(operator: kmock.KubernetesEmulator) -> None:
    kube = operator
    await create_llmd(kube, "drift", {"model": BUILTIN})
    await wait_for(lambda: obj(kube, SERVICES, "drift"))
    await api_call(kube, "PATCH", api_path("deployments", "drift"), {"spec": {"replicas": 7}})
    await api_call(kube, "DELETE", f"/api/v1/namespaces/{NAMESPACE}/services/drift")
    # The periodic reconcile (2 s in tests) puts both back.
    await wait_for(lambda: obj(kube, DEPLOYMENTS, "drift")["spec"]["replicas"] == 1, timeout=10)
    await wait_for(lambda: obj(kube, SERVICES, "drift"), timeout=10)


async def test_invalid_spec_sets_degraded_once_and_recovers(operator: kmock.KubernetesEmulator) -> None:
    kube = operator
    # tensorParallelSize 2 without GPUs: the schema cannot see it, the operator can.
    await create_llmd(kube, "bad", {"model": BUILTIN, "engine": {"tensorParallelSize": 2}})
    degraded = await wait_for(
        lambda: (
            condition(kube, "bad", "Degraded").get("status") == "True" and condition(kube, "bad", "Degraded")
        )
    )
    assert degraded["reason"] == "InvalidSpec"
    assert "tensorParallelSize is 2, but each pod gets 0 GPU(s)" in degraded["message"]
    assert obj(kube, DEPLOYMENTS, "bad") is None
    await asyncio.sleep(4.5)  # two periodic reconciles later: no retry storm, no duplicate warnings
    assert len(posted_events(kube, "InvalidSpec")) == 1
    assert obj(kube, DEPLOYMENTS, "bad") is None

    await api_call(
        kube, "PATCH", api_path("llmdeployments", "bad"), {"spec": {"engine": {"tensorParallelSize": 1}}}
    )
    await wait_for(lambda: obj(kube, DEPLOYMENTS, "bad"))
    await wait_for(lambda: condition(kube, "bad", "Degraded").get("status") == "False")


async def test_hpa_follows_the_autoscaling_mode(operator: kmock.KubernetesEmulator) -> None:
    kube = operator
    await create_llmd(
        kube, "auto", {"model": BUILTIN, "autoscaling": {"enabled": True, "mode": "hpa", "maxReplicas": 6}}
    )
    hpa = await wait_for(lambda: obj(kube, HPAS, "auto"))
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "LLMDeployment" and hpa["spec"]["maxReplicas"] == 6
    assert hpa["metadata"]["ownerReferences"][0]["uid"] == "uid-auto"
    # No blanket True: the HPA's own conditions are copied once it reports.
    await wait_for(lambda: condition(kube, "auto", "ScalingActive").get("reason") == "WaitingForHPA")
    failing = {
        "type": "ScalingActive",
        "status": "False",
        "reason": "FailedGetPodsMetric",
        "message": "unable to get metric vllm_num_requests_waiting: no metrics returned",
    }
    await api_call(
        kube,
        "PATCH",
        f"/apis/autoscaling/v2/namespaces/{NAMESPACE}/horizontalpodautoscalers/auto/status",
        {"status": {"conditions": [{"type": "AbleToScale", "status": "True"}, failing]}},
    )
    found = await wait_for(
        lambda: (
            condition(kube, "auto", "ScalingActive").get("reason") == "FailedGetPodsMetric"
            and condition(kube, "auto", "ScalingActive")
        ),
        timeout=10,
    )
    assert found["status"] == "False" and "no metrics returned" in found["message"]

    await api_call(
        kube, "PATCH", api_path("llmdeployments", "auto"), {"spec": {"autoscaling": {"mode": "builtin"}}}
    )
    await wait_for(lambda: obj(kube, HPAS, "auto") is None)
    await wait_for(lambda: posted_events(kube, "Deleted"))


async def test_warm_pool_promotion_and_demotion(operator: kmock.KubernetesEmulator) -> None:
    kube = operator
    await create_llmd(kube, "pool", {"model": BUILTIN, "replicas": 1, "warmPool": {"size": 1}})
    await wait_for(lambda: obj(kube, DEPLOYMENTS, "pool"))
    pods = await create_pods(kube, "pool", 2, ready=True)
    # The older ready pod serves, the other waits warm outside the Service.
    await wait_for(lambda: serving_pods(kube, pods) == {pods[0]})
    await wait_for(lambda: status(kube, "pool").get("warmReplicas") == 1)
    assert status(kube, "pool")["readySummary"] == "1/1"
    # The Service's endpoints are the router pods (on by default): none ready, not Ready.
    await wait_for(lambda: condition(kube, "pool", "Ready").get("reason") == "WaitingForRouter")
    await api_call(kube, "POST", api_path("pods"), router_pod("pool"))
    await wait_for(lambda: condition(kube, "pool", "Ready").get("status") == "True")
    assert status(kube, "pool")["routerReadyReplicas"] == 1
    costs = {
        n: obj(kube, PODS, n)["metadata"]["annotations"]["controller.kubernetes.io/pod-deletion-cost"]
        for n in pods
    }
    assert int(costs[pods[0]]) > int(costs[pods[1]])

    # Scale up: the warm pod joins the Service by a label flip, and the pool is refilled behind it.
    started = time.perf_counter()
    await api_call(kube, "PATCH", api_path("llmdeployments", "pool", "scale"), {"spec": {"replicas": 2}})
    await wait_for(lambda: serving_pods(kube, pods) == set(pods), interval=0.01)
    promotion_seconds = time.perf_counter() - started
    print(f"\nwarm-pool promotion took {promotion_seconds * 1000:.0f} ms")
    assert promotion_seconds < 5.0  # a label flip, not a cold start (which takes minutes)
    await wait_for(lambda: obj(kube, DEPLOYMENTS, "pool")["spec"]["replicas"] == 3)
    await wait_for(lambda: posted_events(kube, "Promoted"))

    # A serving pod turns unready: it leaves the Service, a freshly loaded warm pod takes its place.
    (spare,) = await create_pods_named(kube, "pool", ["pool-pod-9"])
    await api_call(kube, "PATCH", api_path("pods", pods[1], "status"), {"status": pod_status(ready=False)})

    def cost(pod: str) -> int:
        annotations = obj(kube, PODS, pod)["metadata"]["annotations"]
        return int(annotations["controller.kubernetes.io/pod-deletion-cost"])

    await wait_for(lambda: cost(pods[1]) < 0)  # the replica set removes it first
    await wait_for(lambda: cost(spare) > 0 and serving_pods(kube, pods + [spare]) == {pods[0], spare})

    # Scale down: serving pods are demoted (they drain) before the Deployment shrinks.
    await api_call(kube, "PATCH", api_path("llmdeployments", "pool", "scale"), {"spec": {"replicas": 1}})
    await wait_for(lambda: len(serving_pods(kube, pods + [spare])) == 1)
    await wait_for(lambda: obj(kube, DEPLOYMENTS, "pool")["spec"]["replicas"] == 2)
    await wait_for(lambda: posted_events(kube, "Demoted"))


async def create_pods_named(kube: kmock.KubernetesEmulator, instance: str, names: list[str]) -> list[str]:
    for name in names:
        await api_call(
            kube,
            "POST",
            api_path("pods"),
            fake_pod(instance, name, ready=True, created="2026-01-01T00:01:00Z"),
        )
    return names


class FakeEngineMetrics:
    """A /metrics endpoint in vLLM's format on 127.0.0.1, standing in for the engine pods."""

    def __init__(self) -> None:
        self.waiting = 0.0
        self.kv_cache_usage = 0.0
        self.scrapes = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.scrapes += 1
        return web.Response(
            text=(
                "# TYPE vllm:num_requests_waiting gauge\n"
                f'vllm:num_requests_waiting{{model_name="auto"}} {self.waiting}\n'
                "# TYPE vllm:kv_cache_usage_perc gauge\n"
                f'vllm:kv_cache_usage_perc{{model_name="auto"}} {self.kv_cache_usage}\n'
            )
        )


@pytest_asyncio.fixture()
async def engine_metrics() -> AsyncIterator[tuple[FakeEngineMetrics, int]]:
    metrics = FakeEngineMetrics()
    app = web.Application()
    app.router.add_get("/metrics", metrics.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield metrics, port
    await runner.cleanup()


async def test_builtin_autoscaler_scales_on_scraped_metrics(
    operator: kmock.KubernetesEmulator, engine_metrics: tuple[FakeEngineMetrics, int]
) -> None:
    kube = operator
    metrics, port = engine_metrics
    await create_llmd(
        kube,
        "auto",
        {
            "model": BUILTIN,
            "replicas": 1,
            "autoscaling": {
                "enabled": True,
                "mode": "builtin",
                "minReplicas": 1,
                "maxReplicas": 4,
                "targetWaitingRequests": 4,
                "targetKVCacheUsage": 0.8,
                "scaleDownStabilizationSeconds": 2,
            },
        },
    )
    pods = await create_pods(kube, "auto", 1, ready=True, ip="127.0.0.1", metrics_port=port)
    await wait_for(lambda: serving_pods(kube, pods) == set(pods))

    # 10 queued requests on one pod: ceil(10 / 4) = 3 replicas.
    metrics.waiting = 10
    await wait_for(lambda: obj(kube, LLMD_RESOURCE, "auto")["spec"]["replicas"] == 3)
    await wait_for(lambda: obj(kube, DEPLOYMENTS, "auto")["spec"]["replicas"] == 3)
    await wait_for(lambda: posted_events(kube, "ScaledUp"))

    # More load, but the two new pods are not ready: no second scale-up on top of pending pods.
    metrics.waiting = 20
    await wait_for(lambda: condition(kube, "auto", "ScalingActive").get("reason") == "WaitingForPods")
    scrapes = metrics.scrapes
    await wait_for(lambda: metrics.scrapes >= scrapes + 2)
    assert obj(kube, LLMD_RESOURCE, "auto")["spec"]["replicas"] == 3
    assert status(kube, "auto")["autoscaler"]["recommendedReplicas"] == 4

    # The new pods turn ready and are promoted; now the queue (3 x 20 waiting) asks for the maximum.
    pods += await create_pods_named(kube, "auto", ["auto-pod-7", "auto-pod-8"])
    for name in pods[1:]:
        await api_call(
            kube,
            "PATCH",
            api_path("pods", name),
            {
                "metadata": {"annotations": {"prometheus.io/port": str(port)}},
                "status": pod_status(True, "127.0.0.1"),
            },
        )
    await wait_for(lambda: obj(kube, LLMD_RESOURCE, "auto")["spec"]["replicas"] == 4)

    # The queue drains: it scales down to the minimum, but only after the 2 s window.
    metrics.waiting = 0
    drained = time.monotonic()
    await wait_for(lambda: obj(kube, LLMD_RESOURCE, "auto")["spec"]["replicas"] == 1, timeout=15)
    assert time.monotonic() - drained >= 2.0
    await wait_for(lambda: len(serving_pods(kube, pods)) == 1)
    await wait_for(lambda: posted_events(kube, "ScaledDown"))
    # Everything the operator wrote into the status is declared in the CRD (a real server would prune it).
    assert status(kube, "auto")["autoscaler"]["lastScaleTime"]
    assert schema_errors(obj(kube, LLMD_RESOURCE, "auto")) == []


async def test_kopf_run_cli_serves_the_package(kube: kmock.KubernetesEmulator) -> None:
    """What the chart's container runs: `kopf run -m pagoda_operator.handlers --all-namespaces ...`."""
    await create_llmd(kube, "cli", {"model": BUILTIN})
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kopf",
        "run",
        "-m",
        "pagoda_operator.handlers",
        "--all-namespaces",
        "--standalone",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        deployment = await wait_for(lambda: obj(kube, DEPLOYMENTS, "cli"), timeout=30)
        assert deployment["metadata"]["ownerReferences"][0]["uid"] == "uid-cli"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=15)
        except asyncio.TimeoutError:
            process.kill()
            await process.wait()
    stderr = (await process.stderr.read()).decode() if process.stderr else ""
    assert "[ERROR" not in stderr and "[CRITICAL" not in stderr, stderr[-3000:]


ROUTER_CHILDREN = [
    ("v1/serviceaccounts", "flip-router"),
    ("rbac.authorization.k8s.io/v1/roles", "flip-router"),
    ("rbac.authorization.k8s.io/v1/rolebindings", "flip-router"),
    (SERVICES, "flip-engines"),
    (DEPLOYMENTS, "flip-router"),
    (PDBS, "flip-router"),
]
GATEWAY_CHILDREN = [(SERVICES, "flip-epp"), ("inference.networking.k8s.io/v1/inferencepools", "flip")]


async def test_router_children_follow_spec_router(operator: kmock.KubernetesEmulator) -> None:
    """Gateway mode adds the picker's Service and the InferencePool; service mode drops them; disabling
    the router deletes its children and points the Service at the serving engines; enabling brings
    them back."""
    kube = operator
    kube.resources["inference.networking.k8s.io/v1/inferencepools"] = kmock.ResourceInfo(
        kind="InferencePool", singular="inferencepool", namespaced=True,
        verbs={"get", "list", "watch", "create", "patch", "delete"},
    )  # fmt: skip
    await create_llmd(kube, "flip", {"model": BUILTIN, "router": {"mode": "gateway"}})
    for resource, name in ROUTER_CHILDREN + GATEWAY_CHILDREN:
        child = await wait_for(lambda r=resource, n=name: obj(kube, r, n))
        assert child["metadata"]["ownerReferences"][0]["name"] == "flip"
    service = obj(kube, SERVICES, "flip")
    assert service["spec"]["selector"]["app.kubernetes.io/name"] == "pagoda-router"

    def present(children: list[tuple[str, str]]) -> list[str]:
        return [name for resource, name in children if obj(kube, resource, name) is not None]

    patch = api_path("llmdeployments", "flip")
    await api_call(kube, "PATCH", patch, {"spec": {"router": {"mode": "service"}}})
    await wait_for(lambda: not present(GATEWAY_CHILDREN))
    assert len(present(ROUTER_CHILDREN)) == len(ROUTER_CHILDREN)

    await api_call(kube, "PATCH", patch, {"spec": {"router": {"enabled": False}}})
    await wait_for(lambda: not present(ROUTER_CHILDREN))
    selector = obj(kube, SERVICES, "flip")["spec"]["selector"]
    assert selector == {
        "app.kubernetes.io/name": "pagoda",
        "app.kubernetes.io/instance": "flip",
        SERVING: "true",
    }
    assert obj(kube, DEPLOYMENTS, "flip") is not None  # the engines stay
    await wait_for(lambda: posted_events(kube, "Deleted"))

    await api_call(kube, "PATCH", patch, {"spec": {"router": {"enabled": True}}})
    await wait_for(lambda: len(present(ROUTER_CHILDREN)) == len(ROUTER_CHILDREN))
    await wait_for(
        lambda: obj(kube, SERVICES, "flip")["spec"]["selector"]["app.kubernetes.io/name"] == "pagoda-router"
    )
