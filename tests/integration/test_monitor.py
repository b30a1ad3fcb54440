"""The drift monitor against the real stack: a worker serving invoice_risk, the faust monitor,
invoice traffic with ground-truth feedback, and the control topic.

Windows are 2 s long here (30 s in production) so that each test sees several of them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

import schemas
from pipeline.kafka.admin import control_topic_spec, ensure_topics, monitor_topic_specs
from pipeline.kafka.events import send_events
from pipeline.modeling.invoices import FEATURES, Shift, generate
from pipeline.modeling.training import DEMO_MODEL
from pipeline.settings import Settings
from pipeline.storage.client import make_client
from pipeline.topics import ModelTopics, control_topic, drift_topic
from schemas.models import (
    ControlAction,
    ControlEvent,
    DriftDecision,
    DriftReport,
    Feedback,
    InferenceRequest,
    InferenceResult,
    Inputs,
)
from tests.integration.waiting import wait_for
from workers.inference.runner import prepare_topics_and_bucket

REPO_ROOT = Path(__file__).resolve().parents[2]
POLL_S = 0.1
WINDOW_S = 2.0
RATE = 120.0
"""Requests per second: about 240 per window, over min_window_count."""


@pytest.fixture
def monitored(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "monitor": settings.monitor.model_copy(
                update={
                    "window_s": WINDOW_S,
                    "min_window_count": 100,
                    "consecutive_windows": 2,
                    "recovery_windows": 2,
                    "cooldown_s": 60.0,
                    "min_labels": 30,
                }
            )
        }
    )


def wait_until(condition: Callable[[], object], timeout_s: float, what: str) -> None:
    """``wait_for`` for conditions that do not block: checked every ``POLL_S``."""

    def check() -> bool:
        if condition():
            return True
        time.sleep(POLL_S)
        return False

    wait_for(check, timeout_s, what)


def _environment(settings: Settings) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SLUICEWAY_")}
    environment.update(settings.as_environment())
    return environment


def _start(settings: Settings, command: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", command, "--model", DEMO_MODEL],
            cwd=REPO_ROOT,
            env=_environment(settings),
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def _stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Traffic:
    """Publishes invoices at a steady rate and a ground-truth label for every result."""

    settings: Settings
    shift: Shift | None = None
    labels: dict[str, int] = field(default_factory=dict)
    served_by: list[tuple[float, str]] = field(default_factory=list)
    """(time read, version) of every result."""
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Traffic:
        self._threads = [
            threading.Thread(target=self._publish, daemon=True),
            threading.Thread(target=self._label, daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _publish(self) -> None:
        topics = ModelTopics(self.settings.namespace, DEMO_MODEL)
        producer = Producer({**self.settings.kafka.client_config(), "linger.ms": 5})
        seed = 0
        while not self._stop.is_set():
            seed += 1
            data = generate(int(RATE), seed=seed, shift=self.shift)
            started = time.monotonic()
            for index, (row, label) in enumerate(zip(data.x, data.y, strict=True)):
                request = InferenceRequest(
                    request_id=uuid.uuid4(),
                    model=DEMO_MODEL,
                    inputs=Inputs(
                        features={n: float(v) for n, v in zip(FEATURES, row, strict=True)}
                    ),
                )
                self.labels[str(request.request_id)] = int(label)
                producer.produce(topics.requests, schemas.encode(request))
                producer.poll(0)
                pause = started + (index + 1) / RATE - time.monotonic()
                if pause > 0:
                    time.sleep(pause)  # pacing the feed
                if self._stop.is_set():
                    break
        producer.flush(10)

    def _label(self) -> None:
        topics = ModelTopics(self.settings.namespace, DEMO_MODEL)
        consumer = Consumer(
            {
                **self.settings.kafka.client_config(),
                "group.id": f"labeller-{uuid.uuid4().hex[:6]}",
                "auto.offset.reset": "earliest",
            }
        )
        consumer.subscribe([topics.results])
        producer = Producer({**self.settings.kafka.client_config(), "linger.ms": 5})
        while not self._stop.is_set():
            for message in consumer.consume(200, 0.2):
                if message.error() is not None:
                    continue
                result = schemas.decode(message.value() or b"", InferenceResult)
                self.served_by.append((time.monotonic(), result.model_version or ""))
                label = self.labels.get(str(result.request_id))
                if label is None:
                    continue
                feedback = Feedback(
                    request_id=result.request_id,
                    model=DEMO_MODEL,
                    model_version=result.model_version,
                    label=label,
                    observed_at=datetime.now(UTC),
                    source="accounts-payable",
                )
                producer.produce(topics.feedback, schemas.encode(feedback))
                producer.poll(0)
        producer.flush(10)
        consumer.close()


class EventLog:
    """Reads a topic from the beginning in the background, decoding one contract."""

    def __init__(
        self, settings: Settings, topic: str, kind: type[DriftReport] | type[ControlEvent]
    ):
        self.events: list[DriftReport | ControlEvent] = []
        self._stop = threading.Event()
        self._consumer = Consumer(
            {**settings.kafka.client_config(), "group.id": f"log-{uuid.uuid4().hex[:6]}"}
        )
        self._consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        self._kind = kind
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for message in self._consumer.consume(100, 0.2):
                if message.error() is None and message.value():
                    self.events.append(schemas.decode(message.value() or b"", self._kind))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._consumer.close()


@dataclass
class Scene:
    settings: Settings
    logs: Path
    worker: subprocess.Popen[bytes]
    monitor: subprocess.Popen[bytes]
    drift: EventLog
    control: EventLog

    def reports(self) -> list[DriftReport]:
        return [e for e in self.drift.events if isinstance(e, DriftReport)]

    def rollbacks(self) -> list[ControlEvent]:
        return [
            e
            for e in self.control.events
            if isinstance(e, ControlEvent) and e.action is ControlAction.ROLLBACK
        ]

    def restart_monitor(self, sig: int) -> None:
        _stop(self.monitor, sig)
        self.monitor = _start(self.settings, "monitor", self.logs / "monitor.log")

    def promote(self, version: str) -> None:
        event = ControlEvent(
            event_id=uuid.uuid4(),
            model=DEMO_MODEL,
            action=ControlAction.PROMOTE,
            to_version=version,
            reason="test promotes the new version",
            issued_at=datetime.now(UTC),
            issued_by="cli:test",
        )
        send_events(
            self.settings.kafka, control_topic(self.settings.namespace), [(DEMO_MODEL, event)]
        )


@pytest.fixture
def scene(monitored: Settings, tmp_path: Path) -> Iterator[Scene]:
    settings = monitored
    prepare_topics_and_bucket(settings, [DEMO_MODEL])
    ensure_topics(
        settings.kafka,
        [
            control_topic_spec(settings.namespace),
            *monitor_topic_specs(settings.namespace, ModelTopics(settings.namespace, DEMO_MODEL)),
        ],
    )
    worker = _start(settings, "worker", tmp_path / "worker.log")
    monitor = _start(settings, "monitor", tmp_path / "monitor.log")
    drift = EventLog(settings, drift_topic(settings.namespace), DriftReport)
    control = EventLog(settings, control_topic(settings.namespace), ControlEvent)
    found = Scene(settings, tmp_path, worker, monitor, drift, control)
    try:
        yield found
    finally:
        _stop(found.worker)
        _stop(found.monitor)
        drift.close()
        control.close()
        for log in ("worker.log", "monitor.log"):
            print(f"--- {log}\n" + (tmp_path / log).read_text(errors="replace")[-3000:])


def _judged(scene: Scene, version: str) -> Callable[[], list[DriftReport]]:
    return lambda: [r for r in scene.reports() if r.model_version == version]


def _healthy_v1_then_promote_v2(scene: Scene, traffic: Traffic) -> None:
    wait_until(
        lambda: len([r for r in _judged(scene, "1")() if r.decision is DriftDecision.NONE]) >= 3,
        timeout_s=60,
        what="three judged windows of v1 on reference traffic",
    )
    traffic.shift = "young_vendors"
    scene.promote("2")


def test_promoting_a_bad_version_on_drifted_traffic_rolls_it_back(scene: Scene) -> None:
    traffic = Traffic(scene.settings).start()
    try:
        _healthy_v1_then_promote_v2(scene, traffic)
        promoted_at = time.monotonic()
        wait_until(lambda: scene.rollbacks(), timeout_s=60, what="a rollback control event")
        rollback = scene.rollbacks()[0]
        assert (rollback.from_version, rollback.to_version) == ("2", "1")
        assert rollback.issued_by is not None
        assert rollback.issued_by.startswith("monitor")
        # Within the configured number of windows (2), give or take one for the promotion's.
        breaching = [r for r in _judged(scene, "2")() if r.consecutive_breaches > 0]
        assert 2 <= len(breaching) <= 3
        # Later results are served by v1 again.
        after = time.monotonic()
        wait_until(
            lambda: any(t > after + 2 and v == "1" for t, v in traffic.served_by),
            timeout_s=30,
            what="results served by v1 after the rollback",
        )
        assert any(t > promoted_at and v == "2" for t, v in traffic.served_by)
        assert all(v == "1" for t, v in traffic.served_by if t > after + 5)
        _check_report(scene, rollback)
    finally:
        traffic.stop()


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.svg_ids: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "svg":
            self.svg_ids.append(dict(attrs).get("id") or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _check_report(scene: Scene, rollback: ControlEvent) -> None:
    """The HTML report names the evidence the rollback event gives, and has its plots."""
    assert rollback.report_ref is not None
    store = make_client(scene.settings.object_store)
    body = store.get_object(rollback.report_ref.bucket, rollback.report_ref.key)
    try:
        page = _Page()
        page.feed(body.read().decode())
    finally:
        body.close()
        body.release_conn()
    text = " ".join(page.text)
    assert {"chart-psi", "chart-scores", "chart-quality"} <= set(page.svg_ids)
    assert any(i.startswith("chart-feature-") for i in page.svg_ids)
    report = next(r for r in scene.reports() if r.report_id == rollback.report_id)
    breached = [m for m in report.metrics if m.breached]
    assert breached
    for metric in breached:
        name = f"{metric.name}:{metric.feature}" if metric.feature else metric.name
        assert name in rollback.reason
        assert name in text
    assert "psi:score" in rollback.reason
    assert " ".join(rollback.reason.split()) in " ".join(text.split())


def test_no_alert_while_v1_serves_reference_traffic(scene: Scene) -> None:
    traffic = Traffic(scene.settings).start()
    try:
        wait_until(
            lambda: len(_judged(scene, "1")()) >= 8,
            timeout_s=90,
            what="eight judged windows",
        )
    finally:
        traffic.stop()
    reports = _judged(scene, "1")()
    assert all(r.decision is DriftDecision.NONE for r in reports), [
        r.explanation for r in reports if r.decision is not DriftDecision.NONE
    ]
    assert not scene.rollbacks()
    assert all(r.window_count >= 100 for r in reports)


def test_a_monitor_killed_mid_window_resumes_and_still_decides(scene: Scene) -> None:
    traffic = Traffic(scene.settings).start()
    try:
        _healthy_v1_then_promote_v2(scene, traffic)
        wait_until(
            lambda: any(r.consecutive_breaches == 1 for r in _judged(scene, "2")()),
            timeout_s=60,
            what="the first breaching window of v2",
        )
        # Mid-way through the next window: no goodbye, no flush.
        time.sleep(WINDOW_S / 2)  # placing the kill inside a window, not waiting for state
        scene.restart_monitor(signal.SIGKILL)
        wait_until(lambda: scene.rollbacks(), timeout_s=90, what="a rollback after the restart")
        assert scene.rollbacks()[0].to_version == "1"
        second = [r for r in _judged(scene, "2")() if r.consecutive_breaches == 2]
        assert second, "the breach count carried over the restart"
    finally:
        traffic.stop()
