"""The builtin autoscaler (autoscaling.mode: builtin), for clusters without Prometheus.

Every tick the operator scrapes the serving pods' /metrics, sums the queue and the KV-cache usage, and
asks for max(ceil(waiting / targetWaitingRequests), ceil(kv usage / targetKVCacheUsage)) replicas, clamped
to [minReplicas, maxReplicas]. It scales up only when the pods of the last scale-up are all ready (never
piles up cold starts on a queue they will absorb) and scales down only after the recommendation stayed
lower for the whole stabilization window, to the highest value seen in that window.

With the router in front (spec.router), the routers' `pagoda_router_pending_requests` (requests held
while no engine is ready) join the queue: they are the only load there is at zero replicas, so they
scale 0 -> 1 (the warm pool's promotion makes that seconds). With minReplicas 0 it scales to zero only
when the whole window saw no traffic: nothing held, queued or running.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, TypeVar

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from pagoda_operator.spec import AutoscalingSpec

T = TypeVar("T")

WAITING_METRIC = "vllm:num_requests_waiting"
KV_CACHE_METRIC = "vllm:kv_cache_usage_perc"
KV_CACHE_METRIC_LEGACY = "vllm:gpu_cache_usage_perc"  # vLLM's older name, still served by Pagoda
RUNNING_METRIC = "vllm:num_requests_running"
ROUTER_PENDING_METRIC = "pagoda_router_pending_requests"
SCRAPE_TIMEOUT_SECONDS = 3.0
# Scale-up waits for the pods of the last scale-up, but not forever: a pod that no node can take (no free
# GPU) would otherwise freeze the autoscaler while the queue grows.
SCALE_UP_WAIT_LIMIT_SECONDS = 600.0
# The most one tick may add: the HPA's default (100% or 4 pods, whichever is more).
SCALE_UP_STEP_PODS = 4
# Float sums like 0.7 + 0.9 land a hair above 1.6; do not let that cost a whole replica.
CEIL_TOLERANCE = 1e-9


# Every reason decide_scale gives: the ScalingActive condition is the builtin autoscaler's while it has one.
DECISION_REASONS = frozenset(
    {
        "OutOfBounds",
        "NoMetrics",
        "WaitingForPods",
        "ScaleUp",
        "StabilizingScaleUp",
        "ScaleDown",
        "StabilizingScaleDown",
        "AtTarget",
    }
)


class MetricsError(ValueError):
    """A /metrics page without the engine's queue and KV-cache gauges."""


@dataclass(frozen=True)
class PodLoad:
    waiting: float
    kv_cache_usage: float  # 0..1
    running: float = 0.0  # only tells traffic from none (scale to zero)


@dataclass(frozen=True)
class ScalingWindow:
    """The stabilization state kept on the object between ticks (seconds since the epoch)."""

    above_since: float | None = None
    below_since: float | None = None
    window_peak: int | None = None  # the highest recommendation while below
    waiting_since: float | None = None  # scale-up held back for unready pods since


@dataclass(frozen=True)
class ScaleDecision:
    replicas: int
    recommendation: int | None
    reason: str
    message: str
    window: ScalingWindow


def count(name: str, value: float) -> float:
    """A gauge read as a count or a fraction: NaN, an infinity or a negative value (a broken exporter) makes
    the pod's reading unusable, as if it had not answered, instead of failing the tick's arithmetic."""
    if not 0 <= value < math.inf:
        raise MetricsError(f"{name} is {value}")
    return value


def parse_metrics(text: str) -> PodLoad:
    """Read a pod's load from Prometheus text, summing over label sets (one per served model name)."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (WAITING_METRIC, KV_CACHE_METRIC, KV_CACHE_METRIC_LEGACY, RUNNING_METRIC):
                totals[sample.name] = totals.get(sample.name, 0.0) + count(sample.name, sample.value)
    kv_cache = totals.get(KV_CACHE_METRIC, totals.get(KV_CACHE_METRIC_LEGACY))
    if WAITING_METRIC not in totals or kv_cache is None:
        raise MetricsError(f"/metrics lacks {WAITING_METRIC} or {KV_CACHE_METRIC}")
    return PodLoad(
        waiting=totals[WAITING_METRIC], kv_cache_usage=kv_cache, running=totals.get(RUNNING_METRIC, 0.0)
    )


def parse_router_pending(text: str) -> float:
    """A router's held requests from its Prometheus text."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == ROUTER_PENDING_METRIC:
                return count(sample.name, sample.value)
    raise MetricsError(f"/metrics lacks {ROUTER_PENDING_METRIC}")


async def scrape_pod(
    session: aiohttp.ClientSession, host: str, port: int, parse: Callable[[str], T]
) -> T | None:
    """One pod's reading, or None when it does not answer (it is then left out of the sums)."""
    try:
        async with session.get(
            f"http://{host}:{port}/metrics", timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_SECONDS)
        ) as response:
            response.raise_for_status()
            return parse(await response.text())
    except (aiohttp.ClientError, asyncio.TimeoutError, MetricsError, ValueError):
        return None


async def scrape_pods(
    targets: Sequence[tuple[str, int]],
    parse: Callable[[str], T] = parse_metrics,  # type: ignore[assignment]
) -> list[T]:
    async with aiohttp.ClientSession() as session:
        readings = await asyncio.gather(*(scrape_pod(session, host, port, parse) for host, port in targets))
    return [reading for reading in readings if reading is not None]


def clamp(replicas: int, policy: AutoscalingSpec) -> int:
    return max(policy.min_replicas, min(policy.max_replicas, replicas))


def recommend_with_missing(
    loads: Sequence[PodLoad], missing: int, current: int, policy: AutoscalingSpec
) -> int | None:
    """As the HPA treats pods it has no metrics for: at zero load when scaling up (they add nothing), at
    the target when scaling down (an overloaded pod that missed the scrape must not shrink the fleet)."""
    if not loads:
        return None
    recommendation = recommend_replicas(loads, policy)
    if missing and recommendation < current:
        at_target = PodLoad(policy.target_waiting_requests, policy.target_kv_cache_usage)
        recommendation = min(current, recommend_replicas([*loads, *[at_target] * missing], policy))
    return recommendation


def recommend_with_router(
    recommendation: int | None,
    loads: Sequence[PodLoad],
    pending: float | None,
    current: int,
    policy: AutoscalingSpec,
) -> int | None:
    """Fold in the routers' held requests (None: no router answered). At zero replicas they are the
    whole measurement; at any size, traffic keeps at least one replica (minReplicas 0 scales to zero
    only without any)."""
    if pending is None:
        return recommendation
    if recommendation is None and current > 0:
        return None  # serving pods exist but none answered: no basis to go down to zero
    by_pending = math.ceil(pending / policy.target_waiting_requests - CEIL_TOLERANCE)
    busy = pending > 0 or any(load.waiting > 0 or load.running > 0 for load in loads)
    return clamp(max(recommendation or 0, by_pending, 1 if busy else 0), policy)


def recommend_replicas(loads: Sequence[PodLoad], policy: AutoscalingSpec) -> int:
    waiting = sum(load.waiting for load in loads)
    kv_cache = sum(load.kv_cache_usage for load in loads)
    by_queue = math.ceil(waiting / policy.target_waiting_requests - CEIL_TOLERANCE)
    by_kv_cache = math.ceil(kv_cache / policy.target_kv_cache_usage - CEIL_TOLERANCE)
    return clamp(max(by_queue, by_kv_cache), policy)


def decide_scale(
    current: int,
    ready_serving: int,
    recommendation: int | None,
    policy: AutoscalingSpec,
    window: ScalingWindow,
    now: float,
) -> ScaleDecision:
    """The replica count to write this tick, with the window to keep for the next one."""
    if current != clamp(current, policy):
        return ScaleDecision(
            clamp(current, policy),
            recommendation,
            "OutOfBounds",
            f"{current} replicas is outside [{policy.min_replicas}, {policy.max_replicas}]",
            ScalingWindow(),
        )
    if recommendation is None:
        return ScaleDecision(current, None, "NoMetrics", "no serving pod answered on /metrics", window)
    if recommendation > current:
        waiting_since = window.waiting_since if window.waiting_since is not None else now
        if ready_serving < current and now - waiting_since < SCALE_UP_WAIT_LIMIT_SECONDS:
            return ScaleDecision(
                current,
                recommendation,
                "WaitingForPods",
                f"{ready_serving}/{current} serving pods ready: not scaling up to {recommendation} before "
                f"the last scale-up has landed (for at most {SCALE_UP_WAIT_LIMIT_SECONDS:.0f}s)",
                ScalingWindow(waiting_since=waiting_since),
            )
        above_since = window.above_since if window.above_since is not None else now
        if now - above_since >= policy.scale_up_stabilization_seconds:
            target = min(recommendation, current + max(SCALE_UP_STEP_PODS, current))
            capped = f" (capped from {recommendation})" if target < recommendation else ""
            stuck = f", although only {ready_serving}/{current} are ready" if ready_serving < current else ""
            return ScaleDecision(
                target,
                recommendation,
                "ScaleUp",
                f"scaling up from {current} to {target} replicas{capped}{stuck}",
                ScalingWindow(),
            )
        return ScaleDecision(
            current,
            recommendation,
            "StabilizingScaleUp",
            f"recommending {recommendation} since {now - above_since:.0f}s, scaling up after "
            f"{policy.scale_up_stabilization_seconds}s",
            ScalingWindow(above_since=above_since),
        )
    if recommendation < current:
        below_since = window.below_since if window.below_since is not None else now
        peak = max(recommendation, window.window_peak or recommendation)
        if now - below_since >= policy.scale_down_stabilization_seconds:
            return ScaleDecision(
                peak,
                recommendation,
                "ScaleDown",
                f"scaling down from {current} to {peak} replicas",
                ScalingWindow(),
            )
        return ScaleDecision(
            current,
            recommendation,
            "StabilizingScaleDown",
            f"recommending {recommendation} since {now - below_since:.0f}s, scaling down after "
            f"{policy.scale_down_stabilization_seconds}s",
            replace(window, above_since=None, below_since=below_since, window_peak=peak),
        )
    return ScaleDecision(
        current, recommendation, "AtTarget", f"{current} replicas match the load", ScalingWindow()
    )


def scrape_port(pod: Mapping[str, Any], default: int) -> int:
    """The pod's prometheus.io/port annotation, else `default` (the engine's port)."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    try:
        return int(annotations.get("prometheus.io/port", default))
    except ValueError:
        return default


def to_rfc3339(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat().replace("+00:00", "Z")


def from_rfc3339(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def window_from_status(autoscaler_status: Mapping[str, Any]) -> ScalingWindow:
    """The stabilization window as the last tick left it in status.autoscaler."""
    return ScalingWindow(
        above_since=from_rfc3339(autoscaler_status.get("aboveSince")),
        below_since=from_rfc3339(autoscaler_status.get("belowSince")),
        window_peak=autoscaler_status.get("windowPeak"),
        waiting_since=from_rfc3339(autoscaler_status.get("waitingSince")),
    )
