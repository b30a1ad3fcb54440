"""``sluiceway monitor``: the faust-streaming drift and quality monitor.

Agents fold every ``InferenceResult`` (and every ``Feedback`` label) into the tumbling window of
its model version; a timer closes windows once their end plus a grace period has passed,
summarises them against the reference, lets the rollback policy decide, and writes what it
found: a ``DriftReport`` on ``<ns>.drift`` for every evaluated window, a JSON and an HTML report
in the object store for every alert, and a rollback ``ControlEvent`` on ``<ns>.control`` when
the policy says so.

All state lives in faust tables backed by changelog topics: open windows, scores waiting for
their labels, the policy's counts, and recent window summaries for the reports. A monitor
killed mid-window restarts with its windows intact and closes them as if nothing happened.

Windows are keyed by ``[model, version, window start]`` (a JSON array, so any character in a
name is safe: ``pipeline.monitoring.closing.WindowKey``), and closed by this module's own timer
rather than faust's windowed tables: faust only tracks window expiry in memory, so windows
restored from the changelog after a restart would never close. Closing follows
``pipeline.monitoring.closing``: a window is forgotten only after its decision is durably
written, and a rollback is emitted once per idempotency key (the monitor reads the control
topic to its end before it judges anything).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import faust
import numpy as np

import schemas
from pipeline.health import HealthState
from pipeline.kafka import clients
from pipeline.kafka.admin import (
    cluster_durability,
    control_topic_spec,
    ensure_topics,
    monitor_topic_specs,
)
from pipeline.kafka.events import send_events
from pipeline.metrics import MonitorMetrics
from pipeline.monitoring.closing import (
    CloserSettings,
    JudgedWindow,
    WindowCloser,
    WindowKey,
)
from pipeline.monitoring.evidence import ReportData, WindowSummary
from pipeline.monitoring.policy import PolicySettings, RollbackPolicy
from pipeline.monitoring.report import render_html, report_json
from pipeline.monitoring.windows import (
    Reference,
    Thresholds,
    add_label,
    add_result,
    new_window,
    summarise,
)
from pipeline.routing import RoutingTable
from pipeline.settings import MonitorSettings, Settings
from pipeline.storage.client import ensure_bucket, make_client
from pipeline.topics import ModelTopics, control_topic, drift_topic
from schemas.exceptions import DecodeError
from schemas.models import (
    ControlEvent,
    DriftReport,
    Feedback,
    InferenceResult,
    ObjectRef,
    ResultStatus,
)
from workers.inference.control import MONITOR_ISSUER
from workers.monitor.control import ControlLog
from workers.monitor.references import load_reference

log = logging.getLogger("sluiceway.monitor")
E = TypeVar("E", InferenceResult, Feedback)

HISTORY_WINDOWS = 24
"""Window summaries kept per version for the reports' charts."""
CLOSE_INTERVAL_S = 0.5
CONTROL_CATCH_UP_S = 30.0
"""How long one attempt to read the control topic to its end may take at start."""
FAULT_ENV = "MONITOR_TEST_FAULT"
"""Fault injection for the integration tests: ``kill-after-rollback`` makes the monitor SIGKILL
itself right after a rollback ControlEvent is acknowledged, before it forgets the window."""


def thresholds_from(monitor: MonitorSettings) -> Thresholds:
    return Thresholds(
        psi=monitor.psi_threshold,
        ks=monitor.ks_threshold,
        chi2_alpha=monitor.chi2_alpha,
        cramers_v=monitor.cramers_v_threshold,
        error_rate=monitor.error_rate_threshold,
        expired_rate=monitor.expired_rate_threshold,
        low_confidence_margin=monitor.low_confidence_margin,
        low_confidence_rate=monitor.low_confidence_rate_threshold,
        latency_p99_ms=monitor.latency_p99_ms_threshold,
        log_loss=monitor.log_loss_threshold,
        min_labels=monitor.min_labels,
    )


def _score(result: InferenceResult, output: str) -> float | None:
    tensors = result.outputs.tensors if result.outputs else None
    tensor = next((t for t in tensors or [] if t.name == output), None)
    if tensor is None or tensor.datatype.value not in ("FP32", "FP64"):
        return None
    dtype = "<f4" if tensor.datatype.value == "FP32" else "<f8"
    values = np.frombuffer(tensor.data, dtype=dtype)
    return float(values[0]) if values.size else None


def _result_counter(
    result: InferenceResult, score: float | None, thresholds: Thresholds
) -> Callable[[Any, Reference], None]:
    def count(state: Any, reference: Reference) -> None:
        add_result(
            state,
            reference,
            status=result.status.value,
            score=score,
            features=result.input_features,
            total_ms=result.timings.total_ms if result.timings else None,
            thresholds=thresholds,
        )

    return count


def _label_counter(score: float, label: int) -> Callable[[Any, Reference], None]:
    def count(state: Any, _reference: Reference) -> None:
        add_label(state, score, label)

    return count


class Monitor:
    """The faust app and the state it shares between agents and the closing timer."""

    def __init__(self, settings: Settings, models: Sequence[str]) -> None:
        self.settings = settings
        self.models = list(models)
        self.config = settings.monitor
        self.thresholds = thresholds_from(self.config)
        self.policy = RollbackPolicy(
            PolicySettings(
                consecutive_windows=self.config.consecutive_windows,
                recovery_windows=self.config.recovery_windows,
                cooldown_s=self.config.cooldown_s,
            )
        )
        self.window_ms = int(self.config.window_s * 1000)
        self.grace_ms = max(1000, self.window_ms // 5)
        self.store = make_client(settings.object_store)
        self.references: dict[str, Reference] = {}
        self.routing = RoutingTable(
            {
                m: settings.models[m].default_version or ""
                for m in self.models
                if m in settings.models
            }
        )
        self.follower: ControlLog | None = None
        faust_home = settings.monitor.state_dir
        faust_home.mkdir(parents=True, exist_ok=True)  # faust makes only the last folder
        self.app = faust.App(
            f"{settings.namespace}-monitor",
            broker=f"kafka://{settings.kafka.bootstrap_servers}",
            # The same security as every other client: TLS, SASL or OAUTHBEARER, one principal.
            broker_credentials=clients.faust_credentials(settings.kafka),
            store="memory://",
            # faust's own files go with the rest of the local state, not into the working
            # directory (its default, "<app id>-data", left one folder per run there).
            datadir=str(faust_home / f"{settings.namespace}-monitor"),
            web_enabled=False,
            topic_partitions=1,
            table_cleanup_interval=3600.0,
            # A new monitor judges traffic from now on; a restarted one resumes at its
            # committed offsets (at least once: records after the last commit count twice).
            consumer_auto_offset_reset="latest",
        )
        # The changelog topics' extra configuration: prepare() adds min.insync.replicas once it
        # knows the cluster; faust reads this mapping only when it declares the topics.
        self.changelog_config: dict[str, str] = {}
        self.windows = self._table("windows")
        self.pending = self._table("pending-scores")
        self.states = self._table("policy")
        self.history = self._table("history")
        self.closed = self._table("closed-until")
        self.late = 0
        self.metrics = MonitorMetrics()
        self.health = HealthState()
        self.closer = WindowCloser(
            CloserSettings(
                window_ms=self.window_ms,
                grace_ms=self.grace_ms,
                min_window_count=self.config.min_window_count,
                thresholds=self.thresholds.by_metric(),
                issuer=f"{MONITOR_ISSUER}:{self.app.conf.id}",
                history_windows=HISTORY_WINDOWS,
            ),
            windows=self.windows,
            states=self.states,
            closed=self.closed,
            history=self.history,
            policy=self.policy,
            routing=self.routing,
            summarise=self._summarise,
            sink=self,
            flush=self._flush_tables,
            clock=time.time,
        )
        topics = [ModelTopics(settings.namespace, m) for m in self.models]
        results = self.app.topic(*(t.results for t in topics), value_serializer="raw")
        feedback = self.app.topic(*(t.feedback for t in topics), value_serializer="raw")
        self.app.agent(results, name="results")(self._on_results)
        self.app.agent(feedback, name="feedback")(self._on_feedback)
        self.app.timer(CLOSE_INTERVAL_S)(self._close_due_windows)
        self.app.timer(60.0)(self._forget_unlabelled)
        self.app.task(self._start)

    def _table(self, name: str) -> Any:
        return self.app.Table(
            name, partitions=1, use_partitioner=True, extra_topic_configs=self.changelog_config
        )

    # ------------------------------------------------------------------ start

    def prepare(self) -> None:
        """Topics, bucket and references: everything the app needs before it starts."""
        specs = [control_topic_spec(self.settings.namespace)]
        for model in self.models:
            specs += monitor_topic_specs(
                self.settings.namespace, ModelTopics(self.settings.namespace, model)
            )
        ensure_topics(self.settings.kafka, specs)
        # faust creates its changelog topics itself: as durable as the product's own.
        durability = cluster_durability(clients.admin(self.settings.kafka), self.settings.kafka)
        self.app.conf.topic_replication_factor = durability.replication_factor
        if durability.min_insync_replicas is not None:
            self.changelog_config["min.insync.replicas"] = str(durability.min_insync_replicas)
        ensure_bucket(self.store, self.settings.object_store.bucket)
        for model in self.models:
            self.references[model] = load_reference(self.settings, self.store, model)

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        follower = await loop.run_in_executor(
            None,
            ControlLog,
            self.settings.kafka,
            control_topic(self.settings.namespace),
            self.routing,
        )
        # Read the control topic to its end before judging anything: a rollback this monitor
        # emitted before it died must be known before the window behind it is judged again.
        while not await loop.run_in_executor(None, follower.catch_up, CONTROL_CATCH_UP_S):
            log.warning('control topic="%s" not read to its end yet; judging waits', follower.topic)
        self.follower = follower
        # Ready once judging can start: the control topic is read to its end.
        self.health.assignment("control", 1)
        log.info('monitor models="%s" window_s="%s"', ",".join(self.models), self.config.window_s)

    # ------------------------------------------------------------------ agents

    def _window_key(self, model: str, version: str, timestamp_ms: int) -> str:
        start = timestamp_ms - timestamp_ms % self.window_ms
        return WindowKey(start_ms=start, model=model, version=version).encode()

    def _is_late(self, model: str, version: str, timestamp_ms: int) -> bool:
        """A record for a window already judged is counted as late, not judged twice."""
        if self.closer.is_late(model, version, timestamp_ms):
            self.late += 1
            self.metrics.late.inc()
            if self.late % 1000 == 1:
                log.warning(
                    'late records dropped="%d" (their windows were already judged)', self.late
                )
            return True
        return False

    def _fold(
        self, model: str, version: str, timestamp_ms: int, update: Callable[[Any, Reference], None]
    ) -> bool:
        """Apply ``update`` to the window that ``timestamp_ms`` falls in; ``False`` if the
        model has no reference or the window was already judged."""
        reference = self.references.get(model)
        if reference is None or self._is_late(model, version, timestamp_ms):
            return False
        key = self._window_key(model, version, timestamp_ms)
        state = self.windows.get(key) or new_window(reference)
        update(state, reference)
        self.windows[key] = state
        return True

    @staticmethod
    def _decoded(event: Any, kind: type[E]) -> E | None:
        try:
            return schemas.decode(event.value or b"", kind)
        except DecodeError as error:
            log.warning(
                'skipped topic="%s" offset="%s" error="%s"',
                event.message.topic,
                event.message.offset,
                error,
            )
            return None

    async def _on_results(self, stream: faust.StreamT[Any]) -> None:
        async for event in stream.events():
            result = self._decoded(event, InferenceResult)
            if result is None or result.model_version is None:
                continue
            timestamp_ms = int(event.message.timestamp * 1000)
            score = _score(result, self.config.score_output)

            counter = _result_counter(result, score, self.thresholds)
            counted = self._fold(result.model, result.model_version, timestamp_ms, counter)
            if counted:
                self.metrics.results.labels(result.model, result.model_version).inc()
            if counted and score is not None and result.status is ResultStatus.OK:
                waiting = [result.model, result.model_version, score, timestamp_ms]
                self.pending[str(result.request_id)] = waiting

    async def _on_feedback(self, stream: faust.StreamT[Any]) -> None:
        async for event in stream.events():
            feedback = self._decoded(event, Feedback)
            if feedback is None:
                continue
            waiting = self.pending.get(str(feedback.request_id))
            label = feedback.label
            if waiting is None or not isinstance(label, bool | int | float):
                continue
            model, version, score, _ = waiting
            timestamp_ms = int(event.message.timestamp * 1000)
            self._fold(model, version, timestamp_ms, _label_counter(float(score), int(bool(label))))
            del self.pending[str(feedback.request_id)]

    # ------------------------------------------------------------------ closing

    async def _close_due_windows(self) -> None:
        self.health.loop_turned()
        if self.follower is None:
            return  # the control topic is not read to its end yet
        self.follower.poll(0.0)
        await self.closer.close_due()

    def _summarise(self, key: WindowKey, state: Any) -> WindowSummary | None:
        reference = self.references.get(key.model)
        if reference is None:
            return None
        return summarise(
            state,
            reference,
            self.thresholds,
            model=key.model,
            version=key.version,
            start_ms=key.start_ms,
            end_ms=key.start_ms + self.window_ms,
        )

    async def _flush_tables(self) -> None:
        """Wait until every table write so far is acknowledged in its changelog topic."""
        await self.app.producer.flush()

    # ------------------------------------------------------------------ the decision sink

    async def refresh_control(self) -> None:
        if self.follower is not None:
            self.follower.poll(0.0)

    async def send_report(self, report: DriftReport) -> None:
        self._observe(report)
        await self._send(drift_topic(self.settings.namespace), report.model, report)

    def _observe(self, report: DriftReport) -> None:
        model, version = report.model, report.model_version
        self.metrics.reports.labels(
            model, version, report.decision.value, report.severity.value
        ).inc()
        for metric in report.metrics:
            labels = (model, version, metric.name, metric.feature or "")
            self.metrics.drift_value.labels(*labels).set(metric.value)
            self.metrics.drift_breached.labels(*labels).set(1 if metric.breached else 0)

    async def send_control(self, event: ControlEvent) -> None:
        await self._send(control_topic(self.settings.namespace), event.model, event)
        if os.environ.get(FAULT_ENV) == "kill-after-rollback":
            log.warning('fault injected="%s": killed after the rollback', FAULT_ENV)
            os.kill(os.getpid(), signal.SIGKILL)

    async def _send(self, topic: str, key: str, event: DriftReport | ControlEvent) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, send_events, self.settings.kafka, topic, [(key, event)])

    async def store_report(self, judged: JudgedWindow) -> ObjectRef:
        return await self._write_report(judged)

    async def _write_report(self, judged: JudgedWindow) -> ObjectRef:
        """The JSON and HTML reports, at a path that depends only on the window (the same
        objects are overwritten when a window is judged again)."""
        model, decision = judged.key.model, judged.decision
        reference = self.references[model]
        data = ReportData(
            report_id=str(judged.report_id),
            model=model,
            version=judged.key.version,
            baseline_version=decision.rollback_to,
            decision=decision.decision,
            explanation=decision.explanation,
            windows=judged.history,
            thresholds=self.thresholds.by_metric(),
            score_edges=reference.score_edges,
            reference_score_counts=reference.score_counts,
            feature_edges={**reference.numeric_edges, **reference.categories},
            reference_feature_counts={
                **reference.numeric_counts,
                **{f: (*c, 0) for f, c in reference.category_counts.items()},
            },
            created_at_ms=int(time.time() * 1000),
        )
        day = datetime.fromtimestamp(judged.key.start_ms / 1000, tz=UTC).strftime("%Y/%m/%d")
        prefix = f"reports/{model}/{day}/{judged.report_id}"
        bucket = self.settings.object_store.bucket
        page = render_html(data).encode()
        document = json.dumps(report_json(data), indent=2).encode()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._put, bucket, f"{prefix}.json", document, "json")
        etag = await loop.run_in_executor(None, self._put, bucket, f"{prefix}.html", page, "html")
        return ObjectRef(bucket=bucket, key=f"{prefix}.html", etag=etag)

    def _put(self, bucket: str, key: str, body: bytes, kind: str) -> str:
        content_type = "text/html; charset=utf-8" if kind == "html" else "application/json"
        written = self.store.put_object(
            bucket, key, io.BytesIO(body), len(body), content_type=content_type
        )
        return str(written.etag)

    async def _forget_unlabelled(self) -> None:
        horizon_ms = int((time.time() - self.config.label_ttl_s) * 1000)
        for request_id, waiting in list(self.pending.items()):
            if int(waiting[3]) < horizon_ms:
                del self.pending[request_id]


def run_monitor(settings: Settings, models: Sequence[str], loglevel: str = "info") -> None:
    """Run the monitor until SIGTERM or SIGINT (faust's worker handles both)."""
    monitor = Monitor(settings, models)
    monitor.prepare()
    if settings.monitor.metrics_port is not None:
        monitor.metrics.serve(
            settings.monitor.metrics_port, settings.monitor.metrics_address, monitor.health
        )
    worker = faust.Worker(monitor.app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()
