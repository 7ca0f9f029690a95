"""plan_pod_roles: exactly `replicas` ready pods serve, the rest wait warm, deletion cost steers shrinking."""

from __future__ import annotations

from typing import Any

from pagoda_operator import labels
from pagoda_operator.warmpool import plan_pod_roles, summarize_pool


def pod(
    name: str,
    ready: bool = True,
    serving: bool = False,
    created: str = "2026-01-01T00:00:00Z",
    terminating: bool = False,
    cost: int | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "creationTimestamp": created,
        "labels": {labels.SERVING: "true" if serving else "false"},
    }
    if cost is not None:
        meta["annotations"] = {labels.DELETION_COST: str(cost)}
    if terminating:
        meta["deletionTimestamp"] = "2026-01-01T01:00:00Z"
    return {
        "metadata": meta,
        "status": {
            "phase": "Running" if ready else "Pending",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def roles_after(pods: list[dict[str, Any]], desired: int) -> dict[str, tuple[bool, int]]:
    """Each pod's (serving, deletion cost) once the planned patches are applied."""
    result = {
        p["metadata"]["name"]: (
            p["metadata"]["labels"][labels.SERVING] == "true",
            int((p["metadata"].get("annotations") or {}).get(labels.DELETION_COST, 0)),
        )
        for p in pods
    }
    for patch in plan_pod_roles(pods, desired):
        result[patch.name] = (patch.serving, patch.deletion_cost)
    return result


def test_new_ready_pods_fill_the_serving_slots_oldest_first() -> None:
    pods = [
        pod("b", created="2026-01-01T00:00:02Z"),
        pod("a", created="2026-01-01T00:00:01Z"),
        pod("c", created="2026-01-01T00:00:03Z"),
    ]
    roles = roles_after(pods, desired=2)
    assert [name for name, (serving, _) in sorted(roles.items()) if serving] == ["a", "b"]
    assert roles["a"][1] > roles["c"][1]  # warm pod goes first when the Deployment shrinks


def test_unready_pods_do_not_count_as_serving_and_are_deleted_first() -> None:
    pods = [pod("ready"), pod("loading", ready=False)]
    roles = roles_after(pods, desired=2)
    assert roles["ready"][0] is True
    assert roles["loading"][1] < roles["ready"][1]
    summary = summarize_pool(pods, 2)
    assert (summary.ready_serving, summary.loading) == (1, 1)  # labelled, but not in the endpoints


def test_scale_up_promotes_a_warm_pod_and_keeps_the_serving_ones() -> None:
    pods = [
        pod("s1", serving=True, cost=1000, created="2026-01-01T00:00:05Z"),
        pod("w1", cost=0, created="2026-01-01T00:00:01Z"),
    ]
    patches = plan_pod_roles(pods, desired_serving=2)
    assert [(p.name, p.promotes) for p in patches] == [("w1", True)]
    assert patches[0].body == {
        "metadata": {"labels": {labels.SERVING: "true"}, "annotations": {labels.DELETION_COST: "1000"}}
    }


def test_scale_down_demotes_serving_pods_before_anything_is_deleted() -> None:
    pods = [pod(f"s{i}", serving=True, cost=1000, created=f"2026-01-01T00:00:0{i}Z") for i in range(3)]
    patches = plan_pod_roles(pods, desired_serving=1)
    assert sorted(p.name for p in patches if p.demotes) == ["s1", "s2"]  # the longest-serving pod stays
    roles = roles_after(pods, 1)
    assert roles["s0"] == (True, 1000) and roles["s1"] == (False, 0) and roles["s2"] == (False, 0)


def test_a_serving_pod_that_turns_unready_is_replaced_by_a_warm_one() -> None:
    pods = [pod("s1", serving=True, ready=False, cost=1000), pod("w1", cost=0)]
    roles = roles_after(pods, desired=1)
    # s1 keeps its label (unready, it is out of the endpoints) and goes first if the Deployment shrinks.
    assert roles == {"s1": (True, -1000), "w1": (True, 1000)}
    assert [p.name for p in plan_pod_roles(pods, 1) if p.promotes] == ["w1"]


def test_unready_pods_are_labelled_to_serve_on_readiness_without_the_operator() -> None:
    """A warm pod that restarts, or a pod the operator never saw, joins the Service once ready."""
    pods = [pod("s1", serving=True, cost=1000), pod("w1", serving=False, ready=False, cost=0)]
    (patch,) = plan_pod_roles(pods, desired_serving=1)
    assert (patch.name, patch.serving, patch.deletion_cost) == ("w1", True, -1000)
    assert not patch.promotes  # not an event: it joins nothing until it is ready
    # Once ready it is surplus: demoted into the warm pool.
    ready = [pod("s1", serving=True, cost=1000), pod("w1", serving=True, cost=-1000)]
    assert roles_after(ready, desired=1) == {"s1": (True, 1000), "w1": (False, 0)}


def test_terminating_pods_are_left_alone_and_do_not_count() -> None:
    pods = [pod("old", serving=True, terminating=True, cost=1000), pod("w1", cost=0)]
    patches = plan_pod_roles(pods, desired_serving=1)
    assert [(p.name, p.serving) for p in patches] == [("w1", True)]
    summary = summarize_pool(pods, 1)
    assert (summary.replicas, summary.ready_serving, summary.warm) == (1, 1, 0)


def test_a_settled_pool_needs_no_patches() -> None:
    pods = [
        pod("s1", serving=True, cost=1000),
        pod("w1", cost=0),
        pod("l1", serving=True, ready=False, cost=-1000),
    ]
    assert plan_pod_roles(pods, desired_serving=1) == []


def test_summary_counts_serving_warm_and_loading() -> None:
    pods = [pod("a"), pod("b"), pod("c"), pod("d", ready=False)]
    summary = summarize_pool(pods, 2)
    assert (summary.replicas, summary.ready_serving, summary.warm, summary.loading) == (2, 2, 1, 1)
    summary = summarize_pool(pods, 5)
    assert (summary.replicas, summary.ready_serving, summary.warm, summary.loading) == (4, 3, 0, 1)
