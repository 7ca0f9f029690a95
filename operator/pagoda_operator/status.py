"""The LLMDeployment's status: counts, endpoint, conditions (Ready, Progressing, Degraded, ScalingActive)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pagoda_operator import labels
from pagoda_operator.autoscaler import DECISION_REASONS, from_rfc3339
from pagoda_operator.builders import endpoint_url
from pagoda_operator.spec import InvalidSpecError, LLMDeploymentSpec, parse_quantity
from pagoda_operator.warmpool import PoolSummary, is_ready

# Container states that will not fix themselves without the user.
FAILING_REASONS = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
    }
)


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool
    reason: str
    message: str


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_conditions(
    existing: Sequence[Mapping[str, Any]], updates: Sequence[Condition], now: str, generation: int | None
) -> list[dict[str, Any]]:
    """Apply `updates`; lastTransitionTime moves only when a condition's status flips."""
    by_type = {c["type"]: dict(c) for c in existing if "type" in c}
    for update in updates:
        status = "True" if update.status else "False"
        previous = by_type.get(update.type, {})
        by_type[update.type] = {
            "type": update.type,
            "status": status,
            "reason": update.reason,
            "message": update.message,
            "lastTransitionTime": previous.get("lastTransitionTime", now)
            if previous.get("status") == status
            else now,
            **({"observedGeneration": generation} if generation is not None else {}),
        }
    order = ["Ready", "Progressing", "Degraded", "ScalingActive"]
    return sorted(
        by_type.values(), key=lambda c: order.index(c["type"]) if c["type"] in order else len(order)
    )


def find_condition(conditions: Sequence[Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


@dataclass(frozen=True)
class Problem:
    """Something that will not fix itself, for the Degraded condition (reason: CamelCase, for machines)."""

    reason: str
    message: str


def pod_failures(pods: Sequence[Mapping[str, Any]]) -> list[str]:
    """'pod/container: Reason: message' for every container stuck in a state it will not leave alone."""
    failures = []
    for pod in pods:
        status = pod.get("status") or {}
        for container in (status.get("initContainerStatuses") or []) + (
            status.get("containerStatuses") or []
        ):
            waiting = (container.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in FAILING_REASONS:
                message = f": {waiting['message']}" if waiting.get("message") else ""
                failures.append(
                    f"{pod['metadata']['name']}/{container.get('name')}: {waiting['reason']}{message}"
                )
    return failures


def unschedulable_pods(pods: Sequence[Mapping[str, Any]]) -> list[str]:
    """'pod: the scheduler's message' for pods no node can take (no free GPU, an unbound claim, taints)."""
    found = []
    for pod in pods:
        for condition in (pod.get("status") or {}).get("conditions") or []:
            if condition.get("type") == "PodScheduled" and condition.get("reason") == "Unschedulable":
                found.append(f"{pod['metadata']['name']}: {condition.get('message', 'Unschedulable')}")
    return found


# The kubelet's and attach-detach controller's events for a volume that will not attach or mount, e.g. a
# ReadWriteOnce claim already attached on another node ("Multi-Attach error").
VOLUME_FAILURE_REASONS = frozenset({"FailedAttachVolume", "FailedMount"})


def volume_failures(pods: Sequence[Mapping[str, Any]], events: Sequence[Mapping[str, Any]]) -> list[str]:
    """'pod: message' for unready pods whose volumes fail to attach or mount (old events of pods that
    came up since are ignored)."""
    waiting = {
        (pod["metadata"]["name"], pod["metadata"].get("uid"))
        for pod in pods
        if not is_ready(pod) and not pod["metadata"].get("deletionTimestamp")
    }
    found = []
    for event in events:
        involved = event.get("involvedObject") or {}
        if event.get("reason") in VOLUME_FAILURE_REASONS and any(
            involved.get("name") == name and involved.get("uid") in (None, uid) for name, uid in waiting
        ):
            found.append(f"{involved['name']}: {event.get('reason')}: {event.get('message', '')}")
    return sorted(set(found))


def rollout_problem(deployment: Mapping[str, Any] | None) -> Problem | None:
    """The Deployment's own verdict on a rollout that stopped moving (progressDeadlineSeconds passed)."""
    conditions = ((deployment or {}).get("status") or {}).get("conditions") or []
    progressing = find_condition(conditions, "Progressing")
    if progressing is not None and progressing.get("reason") == "ProgressDeadlineExceeded":
        return Problem("ProgressDeadlineExceeded", str(progressing.get("message") or "the rollout stalled"))
    return None


def claim_problem(claim: Mapping[str, Any] | None, now: float, grace_seconds: float) -> Problem | None:
    """A cache claim still unbound after `grace_seconds`: no storage class provisions it as asked."""
    if claim is None or ((claim.get("status") or {}).get("phase") or "Pending") != "Pending":
        return None
    created = from_rfc3339((claim.get("metadata") or {}).get("creationTimestamp"))
    if created is None or now - created < grace_seconds:
        return None
    spec = claim.get("spec") or {}
    return Problem(
        "CacheClaimUnbound",
        f"PersistentVolumeClaim {claim['metadata']['name']} is not bound after {int(now - created)} s: no "
        f"volume or storage class ({spec.get('storageClassName') or 'the default class'}) provides "
        f"{', '.join(spec.get('accessModes') or [])}; set spec.cache.storageClassName or accessMode",
    )


def problems_of(
    pods: Sequence[Mapping[str, Any]],
    deployment: Mapping[str, Any] | None,
    claim: Mapping[str, Any] | None,
    now: float,
    claim_grace_seconds: float,
    events: Sequence[Mapping[str, Any]] = (),
) -> list[Problem]:
    per_pod = [
        ("PodsFailing", pod_failures(pods)),
        ("PodsUnschedulable", unschedulable_pods(pods)),
        ("VolumeAttachFailed", volume_failures(pods, events)),
    ]
    problems = [Problem(reason, "; ".join(found[:3])) for reason, found in per_pod if found]
    whole = (rollout_problem(deployment), claim_problem(claim, now, claim_grace_seconds))
    return problems + [problem for problem in whole if problem is not None]


def readiness_conditions(
    desired: int, pool: PoolSummary, desired_pods: int, problems: Sequence[Problem]
) -> list[Condition]:
    if pool.ready_serving >= desired:
        ready = Condition(
            "Ready", True, "ReplicasReady", f"{pool.ready_serving}/{desired} serving replicas ready"
        )
    else:
        ready = Condition(
            "Ready",
            False,
            "WaitingForReplicas",
            f"{pool.ready_serving}/{desired} serving replicas ready, {pool.loading} pod(s) loading",
        )
    starting = desired_pods - pool.loading - pool.ready_serving - pool.warm
    if problems:
        # Stalled, not progressing: waiting will not help until someone acts on Degraded's message.
        progressing = Condition("Progressing", False, problems[0].reason, "stalled: see Degraded")
    elif pool.loading or starting > 0:
        progressing = Condition(
            "Progressing",
            True,
            "PodsStarting",
            f"{pool.loading} pod(s) loading the model, {max(starting, 0)} to be created",
        )
    else:
        progressing = Condition("Progressing", False, "Stable", "every pod is loaded and ready")
    if problems:
        degraded = Condition(
            "Degraded", True, problems[0].reason, "; ".join(f"{p.reason}: {p.message}" for p in problems)
        )
    else:
        degraded = Condition("Degraded", False, "AsExpected", "")
    return [ready, progressing, degraded]


def with_router(ready: Condition, routers_ready: int, routers_desired: int) -> Condition:
    """With the router in front, the Service's endpoints are the router pods: none ready, no endpoint."""
    if not ready.status or routers_ready > 0:
        return ready
    return Condition(
        "Ready",
        False,
        "WaitingForRouter",
        f"{ready.message}, but 0/{routers_desired} router pods ready (the Service's endpoints)",
    )


def base_status(
    name: str, namespace: str, generation: int | None, desired: int, pool: PoolSummary
) -> dict[str, Any]:
    status: dict[str, Any] = {
        "replicas": pool.replicas,
        "readyReplicas": pool.ready_serving,
        "warmReplicas": pool.warm,
        "readySummary": f"{pool.ready_serving}/{desired}",
        "selector": labels.serving_selector(name),
        "endpoint": endpoint_url(name, namespace),
    }
    if generation is not None:
        status["observedGeneration"] = generation
    return status


def hpa_condition(hpa: Mapping[str, Any] | None) -> Condition:
    """The HPA's own verdict (AbleToScale, ScalingActive, ScalingLimited), not a blanket True."""
    conditions = ((hpa or {}).get("status") or {}).get("conditions") or []
    blocking = next(
        (
            c
            for c in conditions
            if c.get("type") in ("AbleToScale", "ScalingActive") and c.get("status") == "False"
        ),
        None,
    )
    if blocking is not None:
        reason, message = blocking.get("reason", "HPAFailing"), blocking.get("message", "")
        return Condition("ScalingActive", False, reason, f"HPA: {message}")
    active = find_condition(conditions, "ScalingActive")
    if active is None:
        return Condition(
            "ScalingActive", False, "WaitingForHPA", "the HorizontalPodAutoscaler has not reported yet"
        )
    limited = find_condition(conditions, "ScalingLimited")
    limit = f"; {limited.get('message', '')}" if limited and limited.get("status") == "True" else ""
    return Condition(
        "ScalingActive", True, active.get("reason", "HPAActive"), f"HPA: {active.get('message', '')}{limit}"
    )


def scaling_condition(
    spec: LLMDeploymentSpec, existing: Sequence[Mapping[str, Any]], hpa: Mapping[str, Any] | None = None
) -> Condition:
    autoscaling = spec.autoscaling
    if not autoscaling.enabled:
        return Condition("ScalingActive", False, "AutoscalingDisabled", "spec.replicas is set by hand")
    if autoscaling.mode == "hpa":
        return hpa_condition(hpa)
    current = find_condition(existing, "ScalingActive")
    if current is not None and current.get("reason") in DECISION_REASONS:
        # The builtin autoscaler's own tick owns this condition.
        return Condition(
            "ScalingActive",
            current.get("status") == "True",
            current.get("reason", ""),
            current.get("message", ""),
        )
    return Condition(
        "ScalingActive", True, "BuiltinAutoscaler", "the operator scrapes the serving pods' /metrics"
    )


def contains(live: Any, desired: Any) -> bool:
    """Whether `live` holds everything `desired` says; the server's defaults may add more."""
    if isinstance(desired, Mapping):
        return isinstance(live, Mapping) and all(
            k in live and contains(live[k], v) for k, v in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(live, list)
            and len(live) == len(desired)
            and all(contains(a, b) for a, b in zip(live, desired))
        )
    return bool(live == desired) or same_quantity(live, desired)


def merge_patch_is_noop(current: Mapping[str, Any], patch: Mapping[str, Any]) -> bool:
    """Whether a JSON merge patch would leave `current` as it is: every value already there, and every
    null (a removal) on a key that is already absent."""
    for key, value in patch.items():
        if value is None:
            if key in current:
                return False
        elif isinstance(value, Mapping):
            live = current.get(key)
            if not isinstance(live, Mapping) or not merge_patch_is_noop(live, value):
                return False
        elif key not in current or not contains(current[key], value):
            return False
    return True


def same_quantity(live: Any, desired: Any) -> bool:
    """The API server rewrites quantities canonically (2 -> "2", "0.5" -> "500m", "1.5Gi" -> "1536Mi")."""
    if isinstance(live, bool) or isinstance(desired, bool) or not isinstance(live, (int, str)):
        return False
    if not isinstance(desired, (int, str)):
        return False
    try:
        return parse_quantity(live) == parse_quantity(desired)
    except InvalidSpecError:
        return False
