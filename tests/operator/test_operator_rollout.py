"""Issue 11 on the emulator: what the operator leaves behind in real clusters when a spec changes.

The emulator (applying_emulator.py) answers server-side apply as a real API server does for one field
manager; with the merge patches the operator used before, every removed field stayed in the children.
"""

from __future__ import annotations

from typing import Any

import kmock
import pytest
from llmd_testkit import NAMESPACE, api_call, api_path, create_llmd, obj, posted_events, wait_for

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

DEPLOYMENTS = "apps/v1/deployments"
SERVICES = "v1/services"
PDBS = "policy/v1/poddisruptionbudgets"

FULL = {
    "model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct", "revision": "main"},
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
