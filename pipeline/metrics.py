"""Prometheus metrics of a worker, on a registry of its own (several workers fit one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BREAKER_STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.consumed = Counter("sluiceway_consumed", "Records consumed", ["topic"], registry=r)
        self.produced = Counter(
            "sluiceway_results", "Results produced, by status", ["model", "status"], registry=r
        )
        self.dead_lettered = Counter(
            "sluiceway_dead_lettered",
            "Records sent to the DLQ, by reason",
            ["model", "reason"],
            registry=r,
        )
        self.batch_size = Histogram(
            "sluiceway_batch_size",
            "Requests per micro-batch",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "sluiceway_queue_wait_seconds",
            "Time a request waited in the batcher",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.backend_latency = Histogram(
            "sluiceway_backend_latency_seconds",
            "Backend call duration per batch",
            ["backend", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "sluiceway_backend_retries", "Backend call retries", ["backend", "model"], registry=r
        )
        self.breaker_state = Gauge(
            "sluiceway_breaker_state",
            "Circuit breaker state (0 closed, 1 half-open, 2 open)",
            ["breaker"],
            registry=r,
        )
        self.paused_partitions = Gauge(
            "sluiceway_paused_partitions", "Partitions paused for back-pressure", registry=r
        )
        self.in_flight = Gauge(
            "sluiceway_in_flight",
            "Records consumed whose outcome is not yet acknowledged",
            registry=r,
        )
        self.consumer_lag = Gauge(
            "sluiceway_consumer_lag",
            "High watermark minus position",
            ["topic", "partition"],
            registry=r,
        )
        self.rejected = Counter(
            "sluiceway_rejected",
            "Requests answered rejected at the trust boundary (not dead-lettered)",
            ["model", "reason"],
            registry=r,
        )
        self.replies_skipped = Counter(
            "sluiceway_replies_skipped",
            "Replies not written: the reply topic does not exist, or its delivery failed",
            ["reason"],
            registry=r,
        )
        self.commits_refused = Counter(
            "sluiceway_commits_refused",
            "Commits the group refused because it moved on (records go to the new owner)",
            registry=r,
        )
        self.batch_splits = Counter(
            "sluiceway_batch_splits",
            "Batches the backend refused that were split to isolate the bad records",
            ["model"],
            registry=r,
        )
        self.queued = Gauge(
            "sluiceway_queued",
            "Records waiting in the micro-batcher",
            registry=r,
        )
        self.deadline_index = Gauge(
            "sluiceway_deadline_index",
            "Entries in the micro-batcher's deadline index (bounded by about twice the queued)",
            registry=r,
        )
        self.known_reply_topics = Gauge(
            "sluiceway_reply_topic_cache",
            "Reply topics whose existence the worker remembers (bounded)",
            registry=r,
        )

    def serve(self, port: int, address: str = "127.0.0.1") -> None:
        """Expose ``/metrics`` over HTTP on ``address:port``."""
        start_http_server(port, addr=address, registry=self.registry)
