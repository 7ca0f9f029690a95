"""An operator restart (a crash, a `helm upgrade`, a node drain) on the emulator: the new instance picks up
the world as it finds it, repairs what changed while nobody watched, and rolls nothing.

kopf resumes every LLMDeployment on start (on.resume): the reconcile it runs must find the pinned engine
image and the pinned commit on the object, not re-derive them from the new operator's environment or from
where a branch points now, or every restart would roll every model in the cluster.
"""

from __future__ import annotations

import copy
from typing import Any

import kmock
import pytest
from hub_testkit import REPO, FakeHub
from llmd_testkit import (
    DEPLOYMENTS,
    LLMD_RESOURCE,
    NAMESPACE,
    PODS,
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
    running_operator,
    serving_pods,
    status,
    wait_for,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(90)]

MODEL_API = f"/api/models/{REPO}/revision/"
NEXT_COMMIT = "9" * 40
SPEC = {
    "model": {"source": f"hf://{REPO}"},  # the branch `main`, on the Hub emulation
    "replicas": 1,
    "warmPool": {"size": 1},
    "router": {"enabled": False},  # the Service selects the serving engine pods itself
}


def pod_from_template(kube: kmock.KubernetesEmulator, deployment: str, name: str) -> dict[str, Any]:
    """A pod as the Deployment's replica set creates it from the pod template (kmock runs no controllers),
    already ready: it fetched the model and loaded."""
    template = copy.deepcopy(obj(kube, DEPLOYMENTS, deployment)["spec"]["template"])
    metadata = {
        **template["metadata"],
        "name": name,
        "namespace": NAMESPACE,
        "uid": f"uid-{name}",
        "creationTimestamp": "2026-01-01T00:10:00Z",
    }
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"],
            "status": pod_status(ready=True, ip="10.0.0.9")}


def selects(service: dict[str, Any], pod: dict[str, Any]) -> bool:
    """What the endpoints controller computes: every selector label matches the pod's labels."""
    pod_labels = pod["metadata"].get("labels") or {}
    return all(pod_labels.get(key) == value for key, value in service["spec"]["selector"].items())


def is_serving(kube: kmock.KubernetesEmulator, pod: str) -> bool:
    return obj(kube, PODS, pod)["metadata"]["labels"][SERVING] == "true"


PEERINGS = "kopf.dev/v1/clusterkopfpeerings"


def add_peering_object(kube: kmock.KubernetesEmulator, name: str) -> None:
    """kopf's cluster-wide peering resource and the object the chart creates (charts/pagoda/crds)."""
    kube.resources[PEERINGS] = kmock.ResourceInfo(
        kind="ClusterKopfPeering",
        singular="clusterkopfpeering",
        namespaced=False,
        verbs={"get", "list", "watch", "create", "patch", "delete"},
    )
    kube.objects[PEERINGS, None, name] = {
        "apiVersion": "kopf.dev/v1",
        "kind": "ClusterKopfPeering",
        "metadata": {"name": name, "uid": "uid-peering"},
    }


def peers(kube: kmock.KubernetesEmulator, name: str) -> dict[str, Any]:
    return kube.objects[PEERINGS, None, name].raw.get("status") or {}


@pytest.mark.parametrize("peering", [None, "pagoda"], ids=["standalone", "peering"])
async def test_a_restarted_operator_repairs_what_changed_and_rolls_nothing(
    kube: kmock.KubernetesEmulator, hub: FakeHub, monkeypatch: pytest.MonkeyPatch, peering: str | None
) -> None:
    """`peering`: as the chart runs it (`--peering`); the stopped instance must not hold the new one off."""
    if peering:
        add_peering_object(kube, peering)
    monkeypatch.setenv("PAGODA_ENGINE_IMAGE", "registry/pagoda-server:1.0")
    old = ["r-pod-0", "r-pod-1"]
    async with running_operator(peering):
        await create_llmd(kube, "r", SPEC)
        await wait_for(lambda: obj(kube, DEPLOYMENTS, "r") and obj(kube, SERVICES, "r"))
        for i, pod in enumerate(old):
            body = fake_pod("r", pod, ready=True, created=f"2026-01-01T00:00:0{i}Z")
            await api_call(kube, "POST", api_path("pods"), body)
        # Settled: the older pod serves, the other waits warm, the status says so.
        await wait_for(lambda: serving_pods(kube, old) == {old[0]} and not is_serving(kube, old[1]))
        await wait_for(lambda: status(kube, "r").get("warmReplicas") == 1)
        await wait_for(lambda: condition(kube, "r", "Ready").get("status") == "True")
        await wait_for(lambda: posted_events(kube, "RevisionPinned"))
        if peering:
            (first,) = await wait_for(lambda: peers(kube, peering))
    if peering:
        assert first not in peers(kube, peering), "a stopped instance leaves the peering object"
    before = copy.deepcopy(obj(kube, DEPLOYMENTS, "r"))
    pins = {k: v for k, v in obj(kube, LLMD_RESOURCE, "r")["metadata"]["annotations"].items()
            if k in ("pagoda.dev/model-revision", "pagoda.dev/operator-defaults")}
    assert len(pins) == 2, obj(kube, LLMD_RESOURCE, "r")["metadata"]["annotations"]
    service = copy.deepcopy(obj(kube, SERVICES, "r"))
    hub_calls = len(hub.requests_to(MODEL_API))
    updated = len(posted_events(kube, "Updated"))
    assert hub_calls == 1

    # While the operator is down: the API server stamps the Deployment (kmock assigns no uid; a re-created
    # Deployment would lose it), the chart upgrades the engine image, `main` moves on, someone deletes the
    # Service, and a node loss takes the warm pod; its replica set replaces it from the template.
    await api_call(kube, "PATCH", api_path("deployments", "r"), {"metadata": {"uid": "uid-deployment-r"}})
    monkeypatch.setenv("PAGODA_ENGINE_IMAGE", "registry/pagoda-server:2.0")
    hub.refs["main"] = NEXT_COMMIT
    await api_call(kube, "DELETE", f"/api/v1/namespaces/{NAMESPACE}/services/r")
    await api_call(kube, "DELETE", api_path("pods", old[1]))
    replacement = pod_from_template(kube, "r", "r-pod-2")
    await api_call(kube, "POST", api_path("pods"), replacement)
    # Fails open: the replacement is born in the serving Service with no operator to label it, so the
    # capacity never waits for the operator (here it is one pod too many until the operator is back).
    assert selects(service, replacement)
    assert serving_pods(kube, [old[0], "r-pod-2"]) == {old[0], "r-pod-2"}

    async with running_operator(peering):
        await wait_for(lambda: obj(kube, SERVICES, "r"), timeout=15)  # repaired
        # Converged: the surplus serving pod is demoted to the warm pool, the older one keeps serving.
        await wait_for(lambda: not is_serving(kube, "r-pod-2"), timeout=15)
        assert serving_pods(kube, [old[0], "r-pod-2"]) == {old[0]}
        await wait_for(lambda: status(kube, "r").get("warmReplicas") == 1)
        assert condition(kube, "r", "Ready")["status"] == "True"

        # Nothing rolled: the same Deployment object, the same pod template (image, commit), the pins kept,
        # and the branch was not resolved again.
        after = obj(kube, DEPLOYMENTS, "r")
        assert after["metadata"]["uid"] == "uid-deployment-r"
        assert after["spec"]["template"] == before["spec"]["template"]
        assert after["spec"]["replicas"] == before["spec"]["replicas"] == 2
        annotations = obj(kube, LLMD_RESOURCE, "r")["metadata"]["annotations"]
        assert {k: annotations[k] for k in pins} == pins
        assert len(hub.requests_to(MODEL_API)) == hub_calls
        assert len(posted_events(kube, "Updated")) == updated
        assert status(kube, "r")["model"]["resolvedRevision"] != NEXT_COMMIT

        # The finalizer the first instance put on holds nothing up: the new one releases it on deletion.
        await api_call(kube, "DELETE", api_path("llmdeployments", "r"))
        await wait_for(lambda: obj(kube, LLMD_RESOURCE, "r") is None, timeout=15)
