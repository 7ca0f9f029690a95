"""The exposition carries exactly vLLM's metric names, types and histogram buckets."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from pagoda.engine.async_engine import StepReport
from pagoda.engine.stats import EngineStats
from pagoda.entrypoints.metrics import ServerMetrics
from pagoda.outputs import CompletionOutput, RequestMetrics, RequestOutput

# name as Prometheus scrapes it -> type (what vLLM exposes; dashboards and the autoscaler rely on these)
VLLM_METRICS = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:gpu_cache_usage_perc": "gauge",
    "vllm:num_preemptions_total": "counter",
    "vllm:prompt_tokens_total": "counter",
    "vllm:generation_tokens_total": "counter",
    "vllm:request_success_total": "counter",
    "vllm:prefix_cache_queries_total": "counter",
    "vllm:prefix_cache_hits_total": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram",
}
# vllm/v1/metrics/loggers.py
VLLM_TTFT_BUCKETS = [
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
]
VLLM_E2E_BUCKETS = [
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
]


def scrape_types(text: str) -> dict[str, str]:
    """Sample name -> family type, as a Prometheus server reads the exposition."""
    types = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith(("_bucket", "_count", "_sum")) and family.type == "histogram":
                types[family.name] = "histogram"
            elif not sample.name.endswith("_created"):
                types[sample.name] = family.type
    return types


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def stats(running: int = 0, waiting: int = 0, usage: float = 0.0) -> EngineStats:
    return EngineStats(
        num_running=running,
        num_waiting=waiting,
        kv_cache_usage=usage,
        num_preemptions=2,
        prefix_cache_queries=64,
        prefix_cache_hits=32,
        num_total_blocks=100,
    )


def output(
    request_id: str, n_tokens: int, new: int, finish: str | None, metrics: RequestMetrics
) -> RequestOutput:
    completion = CompletionOutput(
        index=0, text="x" * n_tokens, token_ids=list(range(n_tokens)), finish_reason=finish
    )
    return RequestOutput(
        request_id=request_id,
        prompt=None,
        prompt_token_ids=[1, 2, 3, 4, 5],
        outputs=[completion],
        finished=finish is not None,
        metrics=metrics,
        new_token_counts=[new],
    )


def test_names_types_and_buckets_are_vllms() -> None:
    current = stats(running=3, waiting=1, usage=0.25)
    metrics = ServerMetrics("m", lambda: current)
    text = metrics.render().decode()
    types = scrape_types(text)
    assert {name: types.get(name) for name in VLLM_METRICS} == VLLM_METRICS
    assert all(name.startswith("vllm:") for name in types)
    values = samples(text)
    label = (("model_name", "m"),)
    assert values[("vllm:num_requests_running", label)] == 3
    assert values[("vllm:num_requests_waiting", label)] == 1
    assert values[("vllm:kv_cache_usage_perc", label)] == values[("vllm:gpu_cache_usage_perc", label)] == 0.25
    assert values[("vllm:prefix_cache_hits_total", label)] == 32
    buckets = sorted(
        float(dict(key[1])["le"]) for key in values if key[0] == "vllm:time_to_first_token_seconds_bucket"
    )
    assert buckets[:-1] == VLLM_TTFT_BUCKETS and buckets[-1] == float("inf")
    buckets = sorted(
        float(dict(key[1])["le"]) for key in values if key[0] == "vllm:e2e_request_latency_seconds_bucket"
    )
    assert buckets[:-1] == VLLM_E2E_BUCKETS


def test_request_figures_follow_the_steps() -> None:
    metrics = ServerMetrics("m", lambda: stats())
    timing = RequestMetrics(arrival_time=100.0, first_scheduled_time=100.5, first_token_time=101.0)
    metrics.observe_step(StepReport([output("a", 1, 1, None, timing)], stats(), {}, 101.0))
    metrics.observe_step(StepReport([output("a", 2, 1, None, timing)], stats(), {}, 101.2))
    metrics.observe_step(StepReport([output("a", 3, 1, "length", timing)], stats(), {}, 101.5))
    metrics.observe_step(StepReport([], stats(), {"b": 100.0}, 102.0))  # an abort
    values = samples(metrics.render().decode())
    label = (("model_name", "m"),)
    assert values[("vllm:prompt_tokens_total", label)] == 5
    assert values[("vllm:generation_tokens_total", label)] == 3
    assert values[("vllm:time_to_first_token_seconds_sum", label)] == 1.0  # from arrival, not from scheduling
    assert values[("vllm:request_queue_time_seconds_sum", label)] == 0.5
    assert values[("vllm:inter_token_latency_seconds_count", label)] == 2
    assert abs(values[("vllm:inter_token_latency_seconds_sum", label)] - 0.5) < 1e-9
    assert values[("vllm:e2e_request_latency_seconds_count", label)] == 2
    success = {
        dict(k[1])["finished_reason"]: v for k, v in values.items() if k[0] == "vllm:request_success_total"
    }
    assert success == {"stop": 0, "length": 1, "abort": 1}
