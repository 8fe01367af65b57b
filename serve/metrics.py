"""Prometheus metrics, one registry per app (so several apps in one process never collide)."""

from __future__ import annotations

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")


class Metrics:
    def __init__(self, max_batch: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        buckets = tuple(float(b) for b in range(1, max_batch + 1))
        self.queue_depth = Gauge("turbobooth_queue_depth", "generation requests waiting for a batch", registry=r)
        self.batch_requests = Histogram("turbobooth_batch_requests", "requests per batched call", buckets=buckets,
                                        registry=r)
        self.batch_rows = Histogram("turbobooth_batch_images", "images asked for per batched call (before padding)",
                                    buckets=buckets, registry=r)
        self.batch_seconds = Histogram("turbobooth_batch_seconds", "time of one batched generate call", registry=r)
        self.latency = Histogram("turbobooth_request_seconds", "request latency by route", ["route"], registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
        self.rejected = Counter("turbobooth_rejected", "requests refused, by limit", ["limit"], registry=r)
        self.cancelled = Counter("turbobooth_cancelled_requests", "requests whose client left before the answer",
                                 registry=r)
        self.jobs = Gauge("turbobooth_jobs", "jobs in the store by state", ["state"], registry=r)
        self.ready = Gauge("turbobooth_model_ready", "1 once the model is loaded", registry=r)

    def render(self, job_counts: dict) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        for state in JOB_STATES:
            self.jobs.labels(state=state).set(job_counts.get(state, 0))
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
