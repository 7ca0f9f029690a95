"""The builtin autoscaler's pure parts: reading vLLM's /metrics and deciding the replica count."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pagoda_operator.autoscaler import (
    SCALE_UP_WAIT_LIMIT_SECONDS,
    MetricsError,
    PodLoad,
    ScalingWindow,
    decide_scale,
    parse_metrics,
    parse_router_pending,
    recommend_replicas,
    recommend_with_missing,
    recommend_with_router,
)
from pagoda_operator.spec import AutoscalingSpec

# An excerpt of a real vLLM (v0.9) /metrics page: the gauges sit between counters and histograms.
VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen2.5-0.5B-Instruct"} 8.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="Qwen/Qwen2.5-0.5B-Instruct"} 5.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="Qwen/Qwen2.5-0.5B-Instruct"} 0.5
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="Qwen/Qwen2.5-0.5B-Instruct"} 0.625
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="Qwen/Qwen2.5-0.5B-Instruct"} 2.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="Qwen/Qwen2.5-0.5B-Instruct"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="Qwen/Qwen2.5-0.5B-Instruct"} 40.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="Qwen/Qwen2.5-0.5B-Instruct"} 40.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="Qwen/Qwen2.5-0.5B-Instruct"} 3.2
"""

POLICY = AutoscalingSpec(
    enabled=True,
    min_replicas=1,
    max_replicas=10,
    target_waiting_requests=4,
    target_kv_cache_usage=0.8,
    scale_up_stabilization_seconds=0,
    scale_down_stabilization_seconds=300,
)


def test_parses_a_vllm_metrics_page() -> None:
    assert parse_metrics(VLLM_METRICS) == PodLoad(waiting=5.0, kv_cache_usage=0.625, running=8.0)


def test_parses_what_prometheus_client_exposes() -> None:
    """The exposition the engine's own prometheus-client writes, with two served model names."""
    registry = CollectorRegistry()
    waiting = Gauge("vllm:num_requests_waiting", "waiting", ["model_name"], registry=registry)
    kv_cache = Gauge("vllm:kv_cache_usage_perc", "kv", ["model_name"], registry=registry)
    Counter("vllm:prompt_tokens", "prompt tokens", ["model_name"], registry=registry).labels("a").inc(7)
    Histogram("vllm:e2e_request_latency_seconds", "latency", ["model_name"], registry=registry).labels(
        "a"
    ).observe(1)
    waiting.labels("a").set(2)
    waiting.labels("b").set(1)
    kv_cache.labels("a").set(0.25)
    kv_cache.labels("b").set(0.5)
    assert parse_metrics(generate_latest(registry).decode()) == PodLoad(waiting=3.0, kv_cache_usage=0.75)


def test_falls_back_to_the_older_kv_cache_name() -> None:
    text = "vllm:num_requests_waiting 1\nvllm:gpu_cache_usage_perc 0.3\n"
    assert parse_metrics(text) == PodLoad(waiting=1.0, kv_cache_usage=0.3)


def test_a_page_without_the_engine_gauges_is_an_error() -> None:
    with pytest.raises(MetricsError):
        parse_metrics("process_cpu_seconds_total 12.0\n")


@pytest.mark.parametrize("value", ["NaN", "+Inf", "-1"])
def test_a_gauge_that_is_no_count_is_an_error_not_a_failed_tick(value: str) -> None:
    """Once parsed, NaN and +Inf failed the tick's ceil() (OverflowError, ValueError) on every timer run."""
    with pytest.raises(MetricsError):
        parse_metrics(f"vllm:num_requests_waiting {value}\nvllm:kv_cache_usage_perc 0.5\n")
    with pytest.raises(MetricsError):
        parse_metrics(f"vllm:num_requests_waiting 1\nvllm:kv_cache_usage_perc{{model_name=\"m\"}} {value}\n")
    with pytest.raises(MetricsError):
        parse_router_pending(f"pagoda_router_pending_requests {value}\n")


@pytest.mark.parametrize(
    ("loads", "expected"),
    [
        ([PodLoad(0, 0.0)], 1),  # idle: the minimum
        ([PodLoad(9, 0.1)], 3),  # ceil(9 / 4) by the queue
        ([PodLoad(0, 0.7), PodLoad(0, 0.9)], 2),  # ceil(1.6 / 0.8) by the KV cache, no float creep to 3
        ([PodLoad(2, 0.9), PodLoad(2, 0.9), PodLoad(2, 0.9)], 4),  # ceil(2.7 / 0.8) beats ceil(6 / 4)
        ([PodLoad(400, 1.0)], 10),  # clamped to the maximum
    ],
)
def test_recommendation(loads: list[PodLoad], expected: int) -> None:
    assert recommend_replicas(loads, POLICY) == expected


def test_scales_up_at_once_when_every_serving_pod_is_ready() -> None:
    decision = decide_scale(
        current=2, ready_serving=2, recommendation=5, policy=POLICY, window=ScalingWindow(), now=1000.0
    )
    assert (decision.replicas, decision.reason) == (5, "ScaleUp")


def test_never_scales_up_again_while_the_last_new_pods_are_not_ready() -> None:
    decision = decide_scale(
        current=5, ready_serving=3, recommendation=8, policy=POLICY, window=ScalingWindow(), now=1000.0
    )
    assert (decision.replicas, decision.reason) == (5, "WaitingForPods")


def test_scale_up_stabilization_waits_for_a_sustained_recommendation() -> None:
    policy = AutoscalingSpec(enabled=True, max_replicas=10, scale_up_stabilization_seconds=30)
    first = decide_scale(2, 2, 4, policy, ScalingWindow(), now=100.0)
    assert (first.replicas, first.reason, first.window.above_since) == (2, "StabilizingScaleUp", 100.0)
    later = decide_scale(2, 2, 4, policy, first.window, now=131.0)
    assert (later.replicas, later.reason) == (4, "ScaleUp")


def test_scales_down_only_after_the_window_to_the_peak_seen_in_it() -> None:
    first = decide_scale(6, 6, 2, POLICY, ScalingWindow(), now=0.0)
    assert (first.replicas, first.reason, first.window.below_since) == (6, "StabilizingScaleDown", 0.0)
    middle = decide_scale(6, 6, 4, POLICY, first.window, now=200.0)
    assert (middle.replicas, middle.window.window_peak) == (6, 4)
    late = decide_scale(6, 6, 3, POLICY, middle.window, now=299.0)
    assert late.replicas == 6
    done = decide_scale(6, 6, 3, POLICY, late.window, now=300.0)
    assert (done.replicas, done.reason, done.window) == (4, "ScaleDown", ScalingWindow())


def test_a_load_spike_resets_the_scale_down_window() -> None:
    waiting = decide_scale(6, 6, 2, POLICY, ScalingWindow(), now=0.0)
    at_target = decide_scale(6, 6, 6, POLICY, waiting.window, now=100.0)
    assert at_target.window == ScalingWindow()
    again = decide_scale(6, 6, 2, POLICY, at_target.window, now=350.0)
    assert (again.replicas, again.window.below_since) == (6, 350.0)


def test_without_metrics_it_holds() -> None:
    decision = decide_scale(3, 0, None, POLICY, ScalingWindow(), now=0.0)
    assert (decision.replicas, decision.reason) == (3, "NoMetrics")


def test_replicas_outside_the_bounds_are_clamped_first() -> None:
    assert decide_scale(0, 0, None, POLICY, ScalingWindow(), now=0.0).replicas == 1
    assert decide_scale(12, 12, 12, POLICY, ScalingWindow(), now=0.0).replicas == 10


# ------------------------------------------------------------------- issue 11: no scale-down under load


def test_a_pod_that_misses_the_scrape_cannot_shrink_the_fleet() -> None:
    """Three pods serve; the overloaded one times out on /metrics. Summing only the two idle ones would
    recommend 1 replica; as the HPA does, the missing pod counts at the target when scaling down."""
    policy = AutoscalingSpec(enabled=True, min_replicas=1, max_replicas=10)
    idle = [PodLoad(waiting=0.0, kv_cache_usage=0.05)] * 2
    assert recommend_replicas(idle, policy) == 1  # what the tick used to decide on
    assert recommend_with_missing(idle, missing=1, current=3, policy=policy) == 2
    # Scaling up, a missing pod adds nothing (it does not invent load).
    busy = [PodLoad(waiting=20.0, kv_cache_usage=0.5)] * 2
    expected = recommend_replicas(busy, policy)
    assert recommend_with_missing(busy, missing=1, current=3, policy=policy) == expected
    assert recommend_with_missing([], missing=3, current=3, policy=policy) is None


def test_a_pending_pod_holds_scale_up_for_a_bounded_time() -> None:
    policy = AutoscalingSpec(enabled=True, min_replicas=1, max_replicas=10)
    first = decide_scale(3, 2, 6, policy, ScalingWindow(), now=1000.0)
    assert (first.replicas, first.reason) == (3, "WaitingForPods")
    still = decide_scale(3, 2, 6, policy, first.window, now=1000.0 + SCALE_UP_WAIT_LIMIT_SECONDS - 1)
    assert still.reason == "WaitingForPods" and still.window.waiting_since == 1000.0
    late = decide_scale(3, 2, 6, policy, still.window, now=1000.0 + SCALE_UP_WAIT_LIMIT_SECONDS)
    assert (late.replicas, late.reason) == (6, "ScaleUp")
    assert "only 2/3 are ready" in late.message


def test_one_tick_adds_at_most_four_pods_or_doubles() -> None:
    policy = AutoscalingSpec(enabled=True, min_replicas=1, max_replicas=100)
    small = decide_scale(1, 1, 40, policy, ScalingWindow(), now=0.0)
    assert (small.replicas, small.recommendation) == (5, 40) and "capped from 40" in small.message
    large = decide_scale(10, 10, 40, policy, ScalingWindow(), now=0.0)
    assert large.replicas == 20


# ------------------------------------------------------------------------------- the router in front

ZERO = AutoscalingSpec(enabled=True, min_replicas=0, max_replicas=4, target_waiting_requests=4)


def test_reads_the_pending_requests_of_the_routers_own_metrics_page() -> None:
    from pagoda.router.metrics import RouterMetrics

    metrics = RouterMetrics()
    metrics.requests.labels("http://10.0.0.5:8000", "prefix-hit").inc()
    metrics.pending.set(3)
    assert parse_router_pending(generate_latest(metrics.registry).decode()) == 3.0
    with pytest.raises(MetricsError):
        parse_router_pending(VLLM_METRICS)


@pytest.mark.parametrize(
    ("recommendation", "loads", "pending", "current", "expected"),
    [
        (None, [], 1.0, 0, 1),  # a request held at zero replicas: one pod
        (None, [], 9.0, 0, 3),  # ceil(9 / 4)
        (None, [], 0.0, 0, 0),  # no traffic at zero: stay there
        (0, [PodLoad(0, 0.0)], 0.0, 1, 0),  # idle: zero may be recommended
        (0, [PodLoad(0, 0.1, running=1)], 0.0, 1, 1),  # a running request keeps the pod
        (0, [PodLoad(1, 0.0)], 0.0, 1, 1),  # so does a queued one
        (2, [PodLoad(8, 0.1)], 0.0, 2, 2),  # the engines' own recommendation stands
        (None, [], 0.0, 2, None),  # serving pods that did not answer: no basis to go to zero
        (1, [PodLoad(0, 0.0)], None, 1, 1),  # no router answered: as before
    ],
)
def test_router_pending_requests_drive_scaling_from_and_to_zero(
    recommendation: int | None,
    loads: list[PodLoad],
    pending: float | None,
    current: int,
    expected: int | None,
) -> None:
    assert recommend_with_router(recommendation, loads, pending, current, ZERO) == expected


def test_scales_from_zero_at_once_and_to_zero_only_after_a_quiet_window() -> None:
    up = decide_scale(0, 0, 1, ZERO, ScalingWindow(), now=100.0)
    assert (up.replicas, up.reason) == (1, "ScaleUp")
    policy = AutoscalingSpec(enabled=True, min_replicas=0, scale_down_stabilization_seconds=300)
    quiet = decide_scale(1, 1, 0, policy, ScalingWindow(), now=100.0)
    assert (quiet.replicas, quiet.reason) == (1, "StabilizingScaleDown")
    # traffic within the window keeps the peak at one replica
    busy = decide_scale(1, 1, 1, policy, quiet.window, now=200.0)
    assert busy.replicas == 1
    again = decide_scale(1, 1, 0, policy, busy.window, now=250.0)
    assert decide_scale(1, 1, 0, policy, again.window, now=250.0 + 299).replicas == 1
    down = decide_scale(1, 1, 0, policy, again.window, now=250.0 + 300)
    assert (down.replicas, down.reason) == (0, "ScaleDown")
