"""Prometheus metrics: the engine reports through the BatchObserver hooks, the edge per request.

Under gunicorn, set PROMETHEUS_MULTIPROC_DIR (gunicorn_config.py does) and /metrics sums all workers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

disable_created_metrics()  # type: ignore[no-untyped-call]  # the *_created series only double the exposition size

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)


class Metrics:
    """One set of metrics per app; satisfies batching.BatchObserver."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("http_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.latency = Histogram("http_request_duration_seconds", "Arrival to answer, by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_progress = Gauge("http_requests_in_progress", "Requests being handled now, by route",
                                 ["route"], multiprocess_mode="livesum", registry=r)
        self.queue_wait = Histogram("batch_queue_wait_seconds", "Time from submit to the start of its batch",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("batch_size", "Items per computed batch", buckets=BATCH_BUCKETS, registry=r)
        self.inference = Histogram("batch_inference_seconds", "Compute time of one batch",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.batch_failures = Counter("batch_failures", "Batches whose handle_batch raised", registry=r)
        self.dropped = Counter("requests_dropped", "Requests dropped before compute, by reason "
                               "(expired, cancelled, queue_full, overloaded)", ["reason"], registry=r)
        self.queue_depth = Gauge("batch_queue_depth", "Requests waiting for a batch, seen after each batch",
                                 multiprocess_mode="livesum", registry=r)
        self.warmup = Gauge("model_warmup_seconds", "Seconds spent warming the model up",
                            multiprocess_mode="max", registry=r)

    def batch_done(self, size: int, queue_waits_s: Sequence[float], run_s: float, ok: bool,
                   queue_depth: int) -> None:
        self.queue_depth.set(queue_depth)
        self.batch_size.observe(size)
        self.inference.observe(run_s)
        for wait in queue_waits_s:
            self.queue_wait.observe(wait)
        if not ok:
            self.batch_failures.inc()

    def dropped_before_compute(self, reason: str, count: int) -> None:
        self.dropped.labels(reason).inc(count)

    def request_started(self, route: str) -> None:
        self.in_progress.labels(route).inc()

    def request_done(self, route: str, status: int, latency_s: float) -> None:
        self.in_progress.labels(route).dec()
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(latency_s)

    def warmed_up(self, seconds: float) -> None:
        self.warmup.set(seconds)

    def render(self) -> tuple[bytes, str]:
        """The exposition text: this process's registry, or every worker's under multiprocess mode."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
