"""Prometheus metrics under vLLM's names, so vLLM dashboards and autoscaling rules work unchanged.

Engine state (batch size, queue, KV usage, cumulative engine counters) is read from the latest
`EngineStats` at scrape time; per-request figures (token counts, latencies) are recorded as the
engine loop reports each step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pagoda.engine.async_engine import StepReport
from pagoda.engine.stats import EngineStats

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py), so histogram_quantile queries carry over
TTFT_BUCKETS = (
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
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
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
)
REQUEST_LATENCY_BUCKETS = (
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
)
FINISHED_REASONS = ("stop", "length", "abort")


class _EngineStateCollector(Collector):
    """Gauges and engine-side counters, read from the engine's latest stats when scraped."""

    def __init__(self, model_name: str, get_stats: Callable[[], EngineStats | None]) -> None:
        self.model_name = model_name
        self.get_stats = get_stats

    def collect(self) -> Iterator[Metric]:
        stats = self.get_stats()
        running = stats.num_running if stats else 0
        waiting = stats.num_waiting if stats else 0
        usage = stats.kv_cache_usage if stats else 0.0
        yield self._gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.", running
        )
        yield self._gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", waiting)
        yield self._gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", usage)
        yield self._gauge(
            "vllm:gpu_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage. DEPRECATED: use vllm:kv_cache_usage_perc.",
            usage,
        )
        yield self._counter(
            "vllm:num_preemptions",
            "Cumulative number of preemptions from the engine.",
            stats.num_preemptions if stats else 0,
        )
        yield self._counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            stats.prefix_cache_queries if stats else 0,
        )
        yield self._counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            stats.prefix_cache_hits if stats else 0,
        )
        for name, documentation in (
            ("spec_decode_num_drafts", "Number of spec decoding drafts."),
            ("spec_decode_num_draft_tokens", "Number of draft tokens."),
            ("spec_decode_num_accepted_tokens", "Number of accepted tokens."),
        ):
            yield self._counter(f"vllm:{name}", documentation, getattr(stats, name) if stats else 0)
        per_pos = CounterMetricFamily(
            "vllm:spec_decode_num_accepted_tokens_per_pos", "Accepted tokens per draft position.",
            labels=["model_name", "position"],
        )
        for position, count in enumerate(stats.spec_decode_num_accepted_tokens_per_pos if stats else []):
            per_pos.add_metric([self.model_name, str(position)], count)
        yield per_pos

    def _gauge(self, name: str, documentation: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, documentation, labels=["model_name"])
        family.add_metric([self.model_name], value)
        return family

    def _counter(self, name: str, documentation: str, value: float) -> CounterMetricFamily:
        # CounterMetricFamily appends the `_total` suffix itself
        family = CounterMetricFamily(name, documentation, labels=["model_name"])
        family.add_metric([self.model_name], value)
        return family


class ServerMetrics:
    """The server's own registry (no process/platform collectors mixed into vLLM's namespace)."""

    def __init__(self, model_name: str, get_stats: Callable[[], EngineStats | None]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStateCollector(model_name, get_stats))
        labels = ["model_name"]
        # prometheus_client appends `_total` to counter names: these expose vllm:*_total
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", labels, registry=self.registry
        ).labels(model_name)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", labels, registry=self.registry
        ).labels(model_name)
        success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels + ["finished_reason"],
            registry=self.registry,
        )
        self.request_success = {reason: success.labels(model_name, reason) for reason in FINISHED_REASONS}
        self.ttft = self._histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TTFT_BUCKETS,
            model_name,
        )
        self.itl = self._histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            ITL_BUCKETS,
            model_name,
        )
        self.e2e = self._histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
            model_name,
        )
        self.queue_time = self._histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
            model_name,
        )
        self._last_token_time: dict[str, float] = {}  # request id -> when it last gained tokens

    def _histogram(self, name: str, documentation: str, buckets: tuple[float, ...], model_name: str):  # noqa: ANN202
        return Histogram(name, documentation, ["model_name"], buckets=buckets, registry=self.registry).labels(
            model_name
        )

    def observe_step(self, report: StepReport) -> None:
        """Record what one engine step produced. Times are time.monotonic() readings."""
        now = report.time
        for output in report.outputs:
            new_tokens = sum(output.new_token_counts) if output.new_token_counts else 0
            self.generation_tokens.inc(new_tokens)
            metrics = output.metrics
            previous = self._last_token_time.get(output.request_id)
            if previous is None and new_tokens:
                self.prompt_tokens.inc(len(output.prompt_token_ids))
                if metrics is not None:
                    self.ttft.observe(max(0.0, (metrics.first_token_time or now) - metrics.arrival_time))
                    if metrics.first_scheduled_time is not None:
                        self.queue_time.observe(max(0.0, metrics.first_scheduled_time - metrics.arrival_time))
            elif previous is not None and new_tokens:
                self.itl.observe(max(0.0, now - previous))
            if new_tokens:
                self._last_token_time[output.request_id] = now
            if output.finished:
                self._finish(
                    output.request_id,
                    output.outputs[0].finish_reason or "stop",
                    metrics.arrival_time if metrics else None,
                    now,
                )
        for request_id, arrival_time in report.aborted.items():
            self._finish(request_id, "abort", arrival_time, now)

    def _finish(self, request_id: str, reason: str, arrival_time: float | None, now: float) -> None:
        self._last_token_time.pop(request_id, None)
        self.request_success.get(reason, self.request_success["stop"]).inc()
        if arrival_time is not None:
            self.e2e.observe(max(0.0, now - arrival_time))

    def render(self) -> bytes:
        return generate_latest(self.registry)
