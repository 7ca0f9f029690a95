"""pagoda_router_* metrics, in a registry of their own (the router process serves only these)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pagoda_router_requests", "Requests sent to a backend, by policy decision.",
            ["backend", "decision"], registry=r,
        )
        self.retries = Counter(
            "pagoda_router_retries", "Requests retried on another backend before the first byte.",
            ["reason"], registry=r,
        )
        self.ejections = Counter(
            "pagoda_router_ejections", "Backends ejected after a failed connection.", ["backend"], registry=r
        )
        self.rejected = Counter(
            "pagoda_router_rejected", "Requests answered 503 by the router itself.", ["reason"], registry=r
        )
        self.pending = Gauge(
            "pagoda_router_pending_requests", "Requests waiting for a ready backend (scale from zero).",
            registry=r,
        )
        self.oldest_pending = Gauge(
            "pagoda_router_oldest_pending_seconds", "Age of the oldest request waiting for a backend.",
            registry=r,
        )
        self.queue_time = Histogram(
            "pagoda_router_queue_time_seconds", "Time requests waited for a ready backend.", registry=r,
            buckets=(0.001, 0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.overhead = Histogram(
            "pagoda_router_routing_overhead_seconds",
            "Time from the request's arrival to its dispatch to a backend, queueing excluded.", registry=r,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
        )
        self.in_flight = Gauge(
            "pagoda_router_in_flight_requests", "Requests this router has open on each backend.",
            ["backend"], registry=r,
        )
        self.backend_kv_usage = Gauge(
            "pagoda_router_backend_kv_cache_usage",
            "A backend's vllm:kv_cache_usage_perc at this router's last scrape (0..1).",
            ["backend"], registry=r,
        )
        self.backend_ready = Gauge(
            "pagoda_router_backend_ready", "1 while a backend gets new requests (ready, not ejected).",
            ["backend"], registry=r,
        )
