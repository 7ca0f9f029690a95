"""Issue 11 on the emulator: what the operator leaves behind in real clusters when a spec changes.

The emulator (applying_emulator.py) answers server-side apply as a real API server does for one field
manager; with the merge patches the operator used before, every removed field stayed in the children.
"""

from __future__ import annotations

from typing import Any

import kmock
import pytest
from hub_testkit import REPO
from llmd_testkit import (
    BUILTIN,
    DEPLOYMENTS,
    LLMD_RESOURCE,
    NAMESPACE,
    PDBS,
    PVCS,
    SERVICES,
    api_call,
    api_path,
    condition,
    create_llmd,
    fake_pod,
    obj,
    pod_status,
    posted_events,
    router_pod,
    wait_for,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]


FULL = {
    "model": {"source": f"hf://{REPO}", "revision": "main"},  # on the Hub emulation (conftest)
    "engine": {"maxModelLen": 4096},
    "nodeSelector": {"gpu": "a100", "zone": "eu-1"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}]
            }
        }
    },
    "priorityClassName": "llm-high",
}


def pod_spec(kube: kmock.KubernetesEmulator, name: str) -> dict[str, Any]:
    return obj(kube, DEPLOYMENTS, name)["spec"]["template"]["spec"]


async def test_removed_fields_leave_every_child(operator: Any) -> None:
    kube = operator
    await create_llmd(kube, "shrink", FULL)
    await wait_for(lambda: pod_spec(kube, "shrink").get("initContainers"))
    assert pod_spec(kube, "shrink")["tolerations"] and pod_spec(kube, "shrink")["affinity"]

    # hf:// -> pvc:// (no download: no fetch-model), tolerations, affinity, a nodeSelector key, the
    # priority class and an engine flag dropped.
    await api_call(
        kube,
        "PATCH",
        api_path("llmdeployments", "shrink"),
        {
            "spec": {
                "model": {"source": "pvc://weights/qwen", "revision": None},
                "engine": {"maxModelLen": None},
                "nodeSelector": {"zone": None},
                "tolerations": None,
                "affinity": None,
                "priorityClassName": None,
            }
        },
    )
    await wait_for(lambda: "initContainers" not in pod_spec(kube, "shrink"))
    spec = pod_spec(kube, "shrink")
    assert "tolerations" not in spec and "affinity" not in spec and "priorityClassName" not in spec
    assert spec["nodeSelector"] == {"gpu": "a100"}
    assert "--max-model-len" not in spec["containers"][0]["args"]
    assert {v["name"] for v in spec["volumes"]} == {"model-cache", "tmp", "model-source"}
    await wait_for(lambda: posted_events(kube, "Updated"))

    # Every child holds exactly what the operator applied last: nothing stale survives anywhere.
    for resource in (DEPLOYMENTS, SERVICES, PDBS):
        stored = obj(kube, resource, "shrink")
        (applied,) = [
            config
            for (res, namespace, name, manager), config in kube.applied.items()
            if res.plural == resource.rsplit("/", 1)[1]
            and (namespace, name, manager) == (NAMESPACE, "shrink", "pagoda-operator")
        ]
        assert stored["spec"] == applied["spec"], resource
        assert stored["metadata"]["labels"] == applied["metadata"]["labels"], resource


def degraded(kube: kmock.KubernetesEmulator, name: str) -> dict[str, Any]:
    found = condition(kube, name, "Degraded")
    return found if found.get("status") == "True" else {}


async def test_a_pending_pod_with_no_gpu_is_reported_not_progressing_forever(operator: Any) -> None:
    kube = operator
    await create_llmd(kube, "full", {"model": BUILTIN, "replicas": 1})
    await wait_for(lambda: obj(kube, DEPLOYMENTS, "full"))
    pod = fake_pod("full", "full-pod-0", ready=False, created="2026-01-01T00:00:00Z")
    message = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    pod["status"] = {
        "phase": "Pending",
        "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
        ],
    }
    await api_call(kube, "POST", api_path("pods"), pod)
    found = await wait_for(lambda: degraded(kube, "full"))
    assert found["reason"] == "PodsUnschedulable" and message in found["message"]
    assert condition(kube, "full", "Progressing")["status"] == "False"

    # The pod gets a node and turns ready: the problem clears.
    await api_call(kube, "PATCH", api_path("pods", "full-pod-0"), {"status": pod_status(ready=True)})
    await api_call(kube, "POST", api_path("pods"), router_pod("full"))
    await wait_for(lambda: condition(kube, "full", "Degraded").get("status") == "False")
    await wait_for(lambda: condition(kube, "full", "Ready").get("status") == "True")


async def test_a_stalled_rollout_is_copied_into_the_status(operator: Any) -> None:
    kube = operator
    await create_llmd(kube, "stall", {"model": BUILTIN})
    await wait_for(lambda: obj(kube, DEPLOYMENTS, "stall"))
    # What the Deployment controller writes once progressDeadlineSeconds passes without progress.
    stalled = {
        "type": "Progressing",
        "status": "False",
        "reason": "ProgressDeadlineExceeded",
        "message": 'ReplicaSet "stall-5d8f" has timed out progressing.',
    }
    await api_call(
        kube, "PATCH", api_path("deployments", "stall", "status"), {"status": {"conditions": [stalled]}}
    )
    found = await wait_for(lambda: degraded(kube, "stall"), timeout=15)  # the periodic reconcile sees it
    assert found["reason"] == "ProgressDeadlineExceeded" and "timed out progressing" in found["message"]
    assert condition(kube, "stall", "Progressing")["reason"] == "ProgressDeadlineExceeded"


async def test_an_unbound_cache_claim_is_reported(operator: Any) -> None:
    kube = operator
    spec = {"model": {"source": f"hf://{REPO}"}, "cache": {"enabled": True}}
    await create_llmd(kube, "nocls", spec)
    await wait_for(lambda: obj(kube, PVCS, "nocls-model-cache"))
    assert condition(kube, "nocls", "Degraded").get("status") != "True"  # a fresh claim may still bind
    # Minutes later the claim is still Pending: no class provisions ReadWriteMany.
    await api_call(
        kube,
        "PATCH",
        f"/api/v1/namespaces/{NAMESPACE}/persistentvolumeclaims/nocls-model-cache",
        {"metadata": {"creationTimestamp": "2026-01-01T00:00:00Z"}, "status": {"phase": "Pending"}},
    )
    found = await wait_for(lambda: degraded(kube, "nocls"), timeout=15)
    assert found["reason"] == "CacheClaimUnbound" and "ReadWriteMany" in found["message"]


async def test_upgrading_the_operator_does_not_roll_existing_models(
    operator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chart's engine image is pinned per spec generation: a `helm upgrade` rolls nothing; the next
    spec change (which rolls the pods anyway) picks the new image up."""
    kube = operator

    def image() -> str:
        return obj(kube, DEPLOYMENTS, "pinned")["spec"]["template"]["spec"]["containers"][0]["image"]

    monkeypatch.setenv("PAGODA_ENGINE_IMAGE", "registry/pagoda-server:1.0")
    await create_llmd(kube, "pinned", {"model": BUILTIN})
    await wait_for(lambda: obj(kube, DEPLOYMENTS, "pinned") and obj(kube, SERVICES, "pinned"))
    assert image() == "registry/pagoda-server:1.0"

    monkeypatch.setenv("PAGODA_ENGINE_IMAGE", "registry/pagoda-server:2.0")  # the upgraded chart
    # Prove a reconcile ran after the upgrade: it repairs a deleted Service.
    await api_call(kube, "DELETE", f"/api/v1/namespaces/{NAMESPACE}/services/pinned")
    await wait_for(lambda: obj(kube, SERVICES, "pinned"), timeout=10)
    assert image() == "registry/pagoda-server:1.0"

    # A spec change (the API server bumps the generation; the emulator needs telling).
    await api_call(
        kube,
        "PATCH",
        api_path("llmdeployments", "pinned"),
        {"metadata": {"generation": 2}, "spec": {"engine": {"maxModelLen": 2048}}},
    )
    await wait_for(lambda: image() == "registry/pagoda-server:2.0")


async def test_pod_events_are_filtered_on_the_api_server(operator: Any) -> None:
    """The operator watches only its engine pods, not every pod event in the cluster."""
    kube = operator

    def pod_watches() -> list[Any]:
        return [
            r
            for r in list(kube)
            if r.method == kmock.method.GET
            and r.url.path.endswith("/pods")
            and r.params.get("watch") == "true"
        ]

    watches = await wait_for(pod_watches)
    assert {w.params.get("labelSelector") for w in watches} == {
        "app.kubernetes.io/managed-by=pagoda-operator"
    }


async def test_a_volume_that_will_not_attach_is_reported(operator: Any) -> None:
    """A ReadWriteOnce claim attached on another node: the pod hangs in ContainerCreating, and only the
    attach-detach controller's event says why."""
    kube = operator
    await create_llmd(kube, "attach", {"model": BUILTIN})
    await wait_for(lambda: obj(kube, DEPLOYMENTS, "attach"))
    pod = fake_pod("attach", "attach-pod-1", ready=False, created="2026-01-01T00:00:00Z")
    pod["status"] = {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}]}
    await api_call(kube, "POST", api_path("pods"), pod)
    message = (
        'Multi-Attach error for volume "pvc-1" Volume is already used by pod(s) other-pod-0 on another node'
    )
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": "attach-pod-1.17a", "namespace": NAMESPACE},
        "involvedObject": {
            "kind": "Pod",
            "name": "attach-pod-1",
            "namespace": NAMESPACE,
            "uid": "uid-attach-pod-1",
        },
        "reason": "FailedAttachVolume",
        "message": message,
        "type": "Warning",
    }
    await api_call(kube, "POST", f"/api/v1/namespaces/{NAMESPACE}/events", event)
    found = await wait_for(lambda: degraded(kube, "attach"), timeout=15)  # the periodic reconcile sees it
    assert found["reason"] == "VolumeAttachFailed" and "Multi-Attach error" in found["message"]


async def test_deleting_an_llmdeployment_releases_the_finalizer(operator: Any) -> None:
    """With the operator running, deletion completes: kopf's finalizer (its timers need one) goes away.
    Without the operator it would hang: docs/operator-in-production.md says to delete LLMDeployments
    before `helm uninstall`, and how to release one by hand."""
    kube = operator
    await create_llmd(kube, "gone", {"model": BUILTIN})
    finalizers = await wait_for(lambda: obj(kube, LLMD_RESOURCE, "gone")["metadata"].get("finalizers"))
    assert finalizers == ["pagoda.dev/finalizer"]
    await api_call(kube, "DELETE", api_path("llmdeployments", "gone"))
    await wait_for(lambda: obj(kube, LLMD_RESOURCE, "gone") is None, timeout=15)
