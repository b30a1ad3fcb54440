"""The drift monitor against the real stack: a worker serving invoice_risk, the faust monitor,
invoice traffic with ground-truth feedback, and the control topic.

Windows are 2 s long here (30 s in production) so that each test sees several of them.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest

from devkit.demo.feeds import LabelledFeed
from devkit.modeling.training import DEMO_MODEL
from pipeline.kafka.admin import control_topic_spec, ensure_topics, monitor_topic_specs
from pipeline.kafka.events import TopicTail, send_control
from pipeline.settings import Settings
from pipeline.storage.client import make_client
from pipeline.topics import ModelTopics, control_topic, drift_topic
from schemas.models import (
    ControlAction,
    ControlEvent,
    DriftDecision,
    DriftReport,
)
from tests.integration.waiting import wait_until
from workers.inference.runner import prepare_topics_and_bucket
from workers.monitor.app import FAULT_ENV
from workers.processes import ServiceProcess

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


@dataclass
class Scene:
    settings: Settings
    logs: Path
    worker: ServiceProcess
    monitor: ServiceProcess
    drift: TopicTail[DriftReport]
    control: TopicTail[ControlEvent]

    def reports(self) -> list[DriftReport]:
        return list(self.drift.events)

    def rollbacks(self) -> list[ControlEvent]:
        return [e for e in self.control.events if e.action is ControlAction.ROLLBACK]

    def restart_monitor(self, sig: int) -> None:
        self.monitor.restart(sig)

    def promote(self, version: str) -> None:
        send_control(
            self.settings,
            DEMO_MODEL,
            ControlAction.PROMOTE,
            version,
            reason="test promotes the new version",
            issued_by="cli:test",
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
    worker = ServiceProcess(settings, ["worker", "--model", DEMO_MODEL], tmp_path / "worker.log")
    monitor = ServiceProcess(settings, ["monitor", "--model", DEMO_MODEL], tmp_path / "monitor.log")
    worker.start()
    monitor.start()
    drift = TopicTail(settings.kafka, drift_topic(settings.namespace), DriftReport)
    control = TopicTail(settings.kafka, control_topic(settings.namespace), ControlEvent)
    found = Scene(settings, tmp_path, worker, monitor, drift, control)
    try:
        yield found
    finally:
        found.worker.stop()
        found.monitor.stop()
        drift.close()
        control.close()
        for log in ("worker.log", "monitor.log"):
            print(f"--- {log}\n" + (tmp_path / log).read_text(errors="replace")[-3000:])


def _judged(scene: Scene, version: str) -> Callable[[], list[DriftReport]]:
    return lambda: [r for r in scene.reports() if r.model_version == version]


def _healthy_v1_then_promote_v2(scene: Scene, traffic: LabelledFeed) -> None:
    wait_until(
        lambda: len([r for r in _judged(scene, "1")() if r.decision is DriftDecision.NONE]) >= 3,
        timeout_s=60,
        what="three judged windows of v1 on reference traffic",
    )
    traffic.shift = "young_vendors"
    scene.promote("2")


def test_promoting_a_bad_version_on_drifted_traffic_rolls_it_back(scene: Scene) -> None:
    traffic = LabelledFeed(scene.settings, DEMO_MODEL, RATE).start()
    try:
        _healthy_v1_then_promote_v2(scene, traffic)
        promoted_at = time.monotonic()
        wait_until(lambda: scene.rollbacks(), timeout_s=60, what="a rollback control event")
        rollback = scene.rollbacks()[0]
        assert (rollback.from_version, rollback.to_version) == ("2", "1")
        assert rollback.issued_by is not None
        assert rollback.issued_by.startswith("monitor")

        # Within the configured number of windows (2), give or take one for the promotion's.
        # The reports and the control event are on two topics tailed separately: the second
        # breaching report may reach this test after the rollback it led to.
        def breaching() -> list[DriftReport]:
            return [r for r in _judged(scene, "2")() if r.consecutive_breaches > 0]

        wait_until(lambda: len(breaching()) >= 2, timeout_s=30, what="two breaching reports")
        assert len(breaching()) <= 3
        # Later results are served by v1 again.
        after = time.monotonic()
        wait_until(
            lambda: traffic.served_since(after + 2, "1"),
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
    traffic = LabelledFeed(scene.settings, DEMO_MODEL, RATE).start()
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
    traffic = LabelledFeed(scene.settings, DEMO_MODEL, RATE).start()
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


@pytest.fixture
def kill_after_rollback(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The monitor started next SIGKILLs itself right after its rollback is acknowledged."""
    monkeypatch.setenv(FAULT_ENV, "kill-after-rollback")
    return monkeypatch


def test_a_monitor_killed_right_after_emitting_a_rollback_rolls_back_once(
    kill_after_rollback: pytest.MonkeyPatch, scene: Scene
) -> None:
    """Killed between the acknowledged rollback and forgetting its window, the monitor judges
    that window again on restart, finds the rollback's idempotency key on the control topic,
    and does not send it again: exactly one rollback."""
    traffic = LabelledFeed(scene.settings, DEMO_MODEL, RATE).start()
    try:
        _healthy_v1_then_promote_v2(scene, traffic)
        wait_until(lambda: scene.rollbacks(), timeout_s=60, what="a rollback control event")
        wait_until(scene.monitor.exited, timeout_s=30, what="the monitor killed by its fault")
        assert scene.monitor.process is not None
        assert scene.monitor.process.returncode == -signal.SIGKILL
        [rollback] = scene.rollbacks()
        assert rollback.idempotency_key is not None
        assert (rollback.from_version, rollback.to_version) == ("2", "1")

        kill_after_rollback.delenv(FAULT_ENV)
        scene.monitor.start()
        wait_until(
            lambda: [r.report_id for r in scene.reports()].count(rollback.report_id) >= 2,
            timeout_s=90,
            what="the window behind the rollback judged again after the restart",
        )
        again = [r for r in scene.reports() if r.report_id == rollback.report_id][-1]
        assert again.decision is DriftDecision.ROLLBACK  # the same decision, not a new one
        judged_before = len(_judged(scene, "1")())
        wait_until(
            lambda: len(_judged(scene, "1")()) >= judged_before + 2,
            timeout_s=60,
            what="two more judged windows of v1 after the restart",
        )
        assert len(scene.rollbacks()) == 1
        assert not scene.monitor.exited()  # it never got to send (and be killed for) another
        after = time.monotonic()
        wait_until(
            lambda: traffic.served_since(after, "1"),
            timeout_s=30,
            what="results served by v1",
        )
    finally:
        traffic.stop()
