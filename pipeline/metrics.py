"""Prometheus metrics of a worker, on a registry of its own (several workers fit one process),
and the HTTP endpoint that serves them beside the process's health (``/healthz``, ``/readyz``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from pipeline.health import HealthState, Verdict

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

    def serve(
        self, port: int, address: str = "127.0.0.1", health: HealthState | None = None
    ) -> ThreadingWSGIServer:
        """Expose ``/metrics`` (and ``/healthz``, ``/readyz`` of ``health``) on ``address:port``."""
        return serve(self.registry, port, address, health)


class MonitorMetrics:
    """What the drift monitor judged: the windows it closed and each metric's last value."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.results = Counter(
            "sluiceway_monitor_results",
            "Results counted into a window, by model and version",
            ["model", "version"],
            registry=r,
        )
        self.late = Counter(
            "sluiceway_monitor_late_results",
            "Results dropped because their window was already judged",
            registry=r,
        )
        self.reports = Counter(
            "sluiceway_drift_reports",
            "Windows judged, by decision (none, alert, rollback) and severity",
            ["model", "version", "decision", "severity"],
            registry=r,
        )
        self.drift_value = Gauge(
            "sluiceway_drift_metric",
            "Last judged window's value of each drift or quality metric (feature: '' if none)",
            ["model", "version", "metric", "feature"],
            registry=r,
        )
        self.drift_breached = Gauge(
            "sluiceway_drift_metric_breached",
            "1 while the last judged window breached the metric's threshold, else 0",
            ["model", "version", "metric", "feature"],
            registry=r,
        )

    def serve(
        self, port: int, address: str = "127.0.0.1", health: HealthState | None = None
    ) -> ThreadingWSGIServer:
        """Expose ``/metrics`` (and ``/healthz``, ``/readyz`` of ``health``) on ``address:port``."""
        return serve(self.registry, port, address, health)


_HEALTH_PATHS: dict[str, Callable[[HealthState], Verdict]] = {
    "/healthz": HealthState.liveness,
    "/readyz": HealthState.readiness,
}

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def health_app(metrics_app: WsgiApp, health: HealthState | None) -> WsgiApp:
    """``/healthz`` and ``/readyz`` answer GET with 200 or 503 and the verdict's reasons as
    text, any other method with 405; every other path goes to ``metrics_app``. Without
    ``health`` they answer 404."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        check = _HEALTH_PATHS.get(environ.get("PATH_INFO", ""))
        if check is None:
            return metrics_app(environ, start_response)
        if health is None:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"no health state in this process\n"]
        if environ.get("REQUEST_METHOD") not in {"GET", "HEAD"}:
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD")])
            return [b"GET or HEAD\n"]
        verdict = check(health)
        status = "200 OK" if verdict.ok else "503 Service Unavailable"
        start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
        return [verdict.text().encode()]

    return app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds would flood the log; errors still reach stderr."""


def serve(
    registry: CollectorRegistry, port: int, address: str, health: HealthState | None
) -> ThreadingWSGIServer:
    """Serve ``registry`` and ``health`` on ``address:port`` from a daemon thread."""
    server = make_server(
        address,
        port,
        health_app(make_wsgi_app(registry), health),
        ThreadingWSGIServer,
        handler_class=_QuietHandler,
    )
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
