"""The warm pool: which engine pods serve, decided by labels, never by restarts.

The Deployment runs `replicas + warmPool.size` pods, all born with `pagoda.dev/serving: "true"`: a pod
joins the Service the moment it is ready, with or without the operator, so while the operator is down
(one pod, being rescheduled) evicted, drained or rolled pods still come back as capacity: the pool fails
open. Of the ready pods the operator keeps exactly `replicas` serving and demotes the surplus to "false",
where they stay loaded and warm. Scaling up flips the label on a warm pod (seconds); scaling down flips
serving pods back (they leave the endpoints and finish their requests) before the Deployment shrinks, and
the pod-deletion-cost annotation makes the replica set remove unready pods and idle warm pods before any
pod that serves. Unready pods keep (or get back) "true": they serve as soon as they are ready again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pagoda_operator import labels
from pagoda_operator.builders import SERVING_DELETION_COST, UNREADY_DELETION_COST, WARM_DELETION_COST


def is_ready(pod: Mapping[str, Any]) -> bool:
    """The one readiness test: running with its Ready condition true (the kubelet's readiness probe)."""
    status = pod.get("status") or {}
    return status.get("phase") == "Running" and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
    )


@dataclass(frozen=True)
class PodRole:
    """What the planner needs to know of one pod."""

    name: str
    ready: bool
    serving: bool
    terminating: bool
    created: str  # RFC 3339 timestamps sort in time order
    deletion_cost: str | None

    @classmethod
    def from_pod(cls, pod: Mapping[str, Any]) -> PodRole:
        meta = pod.get("metadata") or {}
        return cls(
            name=meta["name"],
            ready=is_ready(pod),
            serving=(meta.get("labels") or {}).get(labels.SERVING) == "true",
            terminating=bool(meta.get("deletionTimestamp")),
            created=meta.get("creationTimestamp") or "",
            deletion_cost=(meta.get("annotations") or {}).get(labels.DELETION_COST),
        )


@dataclass(frozen=True)
class PodPatch:
    """A merge patch for one pod's serving label and deletion cost."""

    name: str
    serving: bool
    deletion_cost: int
    was_serving: bool
    ready: bool

    @property
    def body(self) -> dict[str, Any]:
        return {
            "metadata": {
                "labels": {labels.SERVING: "true" if self.serving else "false"},
                "annotations": {labels.DELETION_COST: str(self.deletion_cost)},
            }
        }

    @property
    def promotes(self) -> bool:
        return self.serving and not self.was_serving and self.ready

    @property
    def demotes(self) -> bool:
        return self.was_serving and not self.serving


@dataclass(frozen=True)
class PoolSummary:
    replicas: int  # pods that stand for serving replicas, ready or still loading
    ready_serving: int
    warm: int  # ready pods outside the Service
    loading: int  # pods not ready yet


def choose_serving(pods: Sequence[PodRole], desired_serving: int) -> set[str]:
    """Ready pods that serve: those serving already stay (no churn), then the longest-running ones."""
    ready = [p for p in pods if p.ready and not p.terminating]
    ready.sort(key=lambda p: (not p.serving, p.created, p.name))
    return {p.name for p in ready[: max(desired_serving, 0)]}


def plan_pod_roles(pods: Sequence[Mapping[str, Any]], desired_serving: int) -> list[PodPatch]:
    """The label/annotation patches that leave exactly `desired_serving` ready pods serving.

    Terminating pods are left alone: they are already out of the endpoints and draining. Unready pods
    carry "true" (outside the endpoints anyway until ready), so they serve on readiness unaided.
    """
    roles = [PodRole.from_pod(pod) for pod in pods]
    serving = choose_serving(roles, desired_serving)
    patches = []
    for role in roles:
        if role.terminating:
            continue
        wanted = role.name in serving or not role.ready
        cost = (
            SERVING_DELETION_COST
            if role.name in serving
            else WARM_DELETION_COST
            if role.ready
            else UNREADY_DELETION_COST
        )
        if wanted != role.serving or role.deletion_cost != str(cost):
            patches.append(
                PodPatch(
                    name=role.name,
                    serving=wanted,
                    deletion_cost=cost,
                    was_serving=role.serving,
                    ready=role.ready,
                )
            )
    return patches


def summarize_pool(pods: Sequence[Mapping[str, Any]], desired_serving: int) -> PoolSummary:
    """Counts for the status, as they stand once `plan_pod_roles`'s patches are applied."""
    live = [r for r in (PodRole.from_pod(pod) for pod in pods) if not r.terminating]
    ready = sum(r.ready for r in live)
    ready_serving = min(desired_serving, ready)
    return PoolSummary(
        replicas=min(desired_serving, len(live)),
        ready_serving=ready_serving,
        warm=ready - ready_serving,
        loading=len(live) - ready,
    )


def serving_ready_pods(pods: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The pods behind the Service that answer now: what the autoscaler scrapes."""
    return [
        pod
        for pod in pods
        if (role := PodRole.from_pod(pod)).serving
        and role.ready
        and not role.terminating
        and (pod.get("status") or {}).get("podIP")
    ]
