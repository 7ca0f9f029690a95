"""The reconciler's pure helpers: drift detection against what an API server returns, and the
status bookkeeping the builtin autoscaler keeps between ticks."""

from __future__ import annotations

import copy
from typing import Any

from pagoda_operator import builders
from pagoda_operator.autoscaler import ScalingWindow, from_rfc3339, to_rfc3339, window_from_status
from pagoda_operator.spec import parse_spec
from pagoda_operator.status import Condition, contains, merge_conditions

SPEC = parse_spec(
    {
        "model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
        "resources": {"requests": {"cpu": "0.5", "memory": "1.5Gi"}, "limits": {"nvidia.com/gpu": 1}},
    }
)


def as_served(deployment: dict[str, Any]) -> dict[str, Any]:
    """What `kubectl get deploy -o json` shows for it: server defaults added, quantities canonical."""
    live = copy.deepcopy(deployment)
    live["metadata"].update({"uid": "d1", "resourceVersion": "42", "generation": 1})
    live["spec"]["template"]["metadata"]["creationTimestamp"] = None
    pod = live["spec"]["template"]["spec"]
    pod.update({"dnsPolicy": "ClusterFirst", "restartPolicy": "Always", "schedulerName": "default-scheduler"})
    for container in pod["containers"] + pod.get("initContainers", []):
        container.update(
            {"terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File"}
        )
    engine = pod["containers"][0]
    engine["resources"] = {"requests": {"cpu": "500m", "memory": "1536Mi"}, "limits": {"nvidia.com/gpu": "1"}}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        engine[probe]["successThreshold"] = 1
        engine[probe]["httpGet"]["scheme"] = "HTTP"
    live["status"] = {"replicas": 1}
    return live


def test_server_defaults_and_canonical_quantities_are_not_drift() -> None:
    desired = builders.build_deployment("m", "ml", SPEC)
    assert contains(as_served(desired), desired)


def test_a_hand_edit_is_drift() -> None:
    desired = builders.build_deployment("m", "ml", SPEC)
    live = as_served(desired)
    live["spec"]["template"]["spec"]["containers"][0]["args"].append("--enforce-eager")
    assert not contains(live, desired)
    live = as_served(desired)
    live["spec"]["replicas"] = 5
    assert not contains(live, desired)
    live = as_served(desired)
    live["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = "2"
    assert not contains(live, desired)


def test_condition_transition_time_moves_only_when_the_status_flips() -> None:
    first = merge_conditions([], [Condition("Ready", False, "WaitingForReplicas", "0/1")], "t1", 1)
    same = merge_conditions(first, [Condition("Ready", False, "WaitingForReplicas", "0/1, loading")], "t2", 1)
    flipped = merge_conditions(same, [Condition("Ready", True, "ReplicasReady", "1/1")], "t3", 2)
    assert first[0]["lastTransitionTime"] == same[0]["lastTransitionTime"] == "t1"
    assert same[0]["message"] == "0/1, loading"
    assert flipped[0] == {
        "type": "Ready",
        "status": "True",
        "reason": "ReplicasReady",
        "message": "1/1",
        "lastTransitionTime": "t3",
        "observedGeneration": 2,
    }


def test_the_autoscaler_window_survives_a_round_trip_through_the_status() -> None:
    epoch = 1_767_225_600.25  # 2026-01-01T00:00:00.25Z
    assert to_rfc3339(epoch) == "2026-01-01T00:00:00.250000Z"
    assert from_rfc3339(to_rfc3339(epoch)) == epoch
    status = {"aboveSince": None, "belowSince": to_rfc3339(epoch), "windowPeak": 3}
    assert window_from_status(status) == ScalingWindow(above_since=None, below_since=epoch, window_peak=3)
