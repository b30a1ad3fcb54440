"""The second half of ``make demo``: a bad version is promoted and rolled back by the monitor.

A labelled invoice feed runs against ``invoice_risk`` while the worker and the drift monitor
run as their own processes. Once the monitor has judged version 1 healthy, the demo promotes
version 2 (trained on an extract with amounts in cents) the way an operator would; the monitor
sees its predictions collapse and its log-loss climb, and rolls it back on its own. The story
is told as a timeline, with a link to the HTML report the monitor wrote.

Windows are shortened for the demo (``window_s``, default 3 s instead of 30 s) so the story
takes under a minute; the cooldown is off so that a second ``make demo`` tells it again.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from devkit.demo.feeds import LabelledFeed
from devkit.modeling.cases import CASE_MODEL
from devkit.modeling.training import DEMO_MODEL
from devkit.settings import LocalSettings
from devkit.stack.services import resolve
from pipeline.kafka.admin import control_topic_spec, ensure_topics, monitor_topic_specs
from pipeline.kafka.events import TopicTail, send_control
from pipeline.settings import AnySettings, Settings
from pipeline.storage.client import make_client
from pipeline.topics import ModelTopics, control_topic, drift_topic
from schemas.models import ControlAction, ControlEvent, DriftDecision, DriftReport
from workers.inference.runner import prepare_topics_and_bucket
from workers.processes import Principals, ServiceProcess, as_principal

Progress = Callable[[str], None]
POLL_S = 0.2
HEALTHY_WINDOWS = 2
STORY_TIMEOUT_S = 120.0


@dataclass
class RollbackStory:
    window_s: float
    rate: float
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    promoted_at: datetime | None = None
    first_breach: DriftReport | None = None
    rollback: ControlEvent | None = None
    v1_again_at: datetime | None = None
    judged: list[DriftReport] = field(default_factory=list)
    report_url: str | None = None
    published: int = 0
    labelled: int = 0

    @property
    def ok(self) -> bool:
        return (
            self.rollback is not None
            and self.rollback.to_version == "1"
            and self.v1_again_at is not None
        )


def _demo_settings(settings: AnySettings, window_s: float, rate: float) -> AnySettings:
    monitor = settings.monitor.model_copy(
        update={
            "window_s": window_s,
            "min_window_count": int(rate * window_s / 2),
            "consecutive_windows": 2,
            "recovery_windows": HEALTHY_WINDOWS,
            "cooldown_s": 0.0,
            "min_labels": 30,
        }
    )
    return settings.model_copy(update={"monitor": monitor})


def _promote(settings: Settings, version: str, reason: str) -> ControlEvent:
    return send_control(
        settings, DEMO_MODEL, ControlAction.PROMOTE, version, reason=reason, issued_by="cli:demo"
    )


def _wait(
    condition: Callable[[], bool],
    deadline: float,
    what: str,
    on_poll: Callable[[], None] = lambda: None,
) -> None:
    while True:
        on_poll()
        if condition():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the rollback story stalled waiting for {what}")
        time.sleep(POLL_S)  # polling in-memory state filled by the tails


@contextlib.contextmanager
def _services(settings: LocalSettings, principals: Principals | None) -> Iterator[None]:
    logs = resolve(settings.stack.state_dir) / "logs"
    models = [DEMO_MODEL, CASE_MODEL]
    with contextlib.ExitStack() as stack:
        # The same models as the first part's workers, hence the same consumer groups: a
        # second group on the requests topic would serve every request twice.
        if principals is None:
            args = ["worker", "--model", DEMO_MODEL, "--model", CASE_MODEL]
            stack.enter_context(ServiceProcess(settings, args, logs / "demo-worker.log"))
        else:
            for model in models:
                worker = as_principal(settings, principals.workers[model])
                log = logs / f"demo-worker-{model}.log"
                stack.enter_context(ServiceProcess(worker, ["worker", "--model", model], log))
        monitor = settings if principals is None else as_principal(settings, principals.monitor)
        stack.enter_context(
            ServiceProcess(monitor, ["monitor", "--model", DEMO_MODEL], logs / "demo-monitor.log")
        )
        yield


def run_rollback_story(
    settings: LocalSettings,
    progress: Progress = print,
    *,
    window_s: float = 3.0,
    rate: float = 250.0,
    principals: Principals | None = None,
) -> RollbackStory:
    """``principals``: on a secured broker, the workers (one per model), the monitor, the
    labelled feed (the SDK's principal) and the operator's own actions each connect as their
    own principal; ``None``: all use ``settings.kafka``."""
    settings = _demo_settings(settings, window_s, rate)
    operator = settings if principals is None else as_principal(settings, principals.operator)
    client = settings if principals is None else as_principal(settings, principals.client)
    story = RollbackStory(window_s, rate)
    topics = ModelTopics(settings.namespace, DEMO_MODEL)
    prepare_topics_and_bucket(operator, [DEMO_MODEL, CASE_MODEL])
    ensure_topics(
        operator.kafka,
        [control_topic_spec(settings.namespace), *monitor_topic_specs(settings.namespace, topics)],
    )
    _promote(operator, "1", "demo: start the story from version 1")
    drift = TopicTail(
        operator.kafka, drift_topic(settings.namespace), DriftReport, from_beginning=False
    )
    control = TopicTail(
        operator.kafka, control_topic(settings.namespace), ControlEvent, from_beginning=False
    )
    feed = LabelledFeed(client, DEMO_MODEL, rate)
    deadline = time.monotonic() + STORY_TIMEOUT_S
    shown = 0

    def judged_after(since: datetime, version: str) -> list[DriftReport]:
        return [r for r in drift.events if r.model_version == version and r.window_start >= since]

    def show_windows() -> None:
        nonlocal shown
        for report in drift.events[shown:]:
            verdict = (
                report.decision.value
                if report.decision is not DriftDecision.NONE
                else ("breaching" if report.consecutive_breaches else "healthy")
            )
            progress(
                f"  window {report.window_start:%H:%M:%S}-{report.window_end:%H:%M:%S} "
                f"v{report.model_version}: {verdict} ({report.window_count} results)"
            )
        shown = len(drift.events)

    try:
        with _services(settings, principals):
            feed.start()
            progress(
                f"feeding {rate:.0f} labelled invoices/s; the monitor judges {window_s:g}s windows"
            )
            _wait(
                lambda: len(judged_after(story.started_at, "1")) >= HEALTHY_WINDOWS,
                deadline,
                f"{HEALTHY_WINDOWS} judged windows of v1",
                show_windows,
            )
            promotion = _promote(
                operator, "2", "demo: promote v2, retrained on the extract after the ERP upgrade"
            )
            story.promoted_at = promotion.issued_at
            progress("promoted invoice_risk v2 (as an operator would: sluiceway control promote)")
            _wait(
                lambda: any(e.action is ControlAction.ROLLBACK for e in control.events),
                deadline,
                "the monitor's rollback",
                show_windows,
            )
            story.rollback = next(e for e in control.events if e.action is ControlAction.ROLLBACK)
            rolled_back = time.monotonic()
            progress(f"the monitor rolled back to v{story.rollback.to_version}")
            _wait(lambda: feed.served_since(rolled_back, "1"), deadline, "a result from v1")
            story.v1_again_at = datetime.now(UTC)
    finally:
        feed.stop()
        drift.close()
        control.close()
    story.judged = list(drift.events)
    story.first_breach = next(
        (r for r in story.judged if r.model_version == "2" and r.consecutive_breaches > 0), None
    )
    story.published, story.labelled = feed.published, feed.labelled
    if story.rollback is not None and story.rollback.report_ref is not None:
        ref = story.rollback.report_ref
        story.report_url = make_client(settings.object_store).presigned_get_object(
            ref.bucket, ref.key, expires=timedelta(days=7)
        )
    return story


def render_story(story: RollbackStory) -> str:
    verdict = "OK" if story.ok else "FAILED"

    def at(moment: datetime | None) -> str:
        return f"{moment:%H:%M:%S}" if moment else "--:--:--"

    lines = [
        f"Rollback story {verdict}: v2 promoted, judged by the monitor, rolled back to v1 "
        f"({story.window_s:g}s windows, {story.rate:.0f} labelled invoices/s, "
        f"{story.published} published, {story.labelled} labels)",
        f"  {at(story.promoted_at)}  operator promotes invoice_risk v2",
    ]
    if story.first_breach is not None:
        breached = ", ".join(
            f"{m.name}{':' + m.feature if m.feature else ''} {m.value:.3g}"
            for m in story.first_breach.metrics
            if m.breached
        )
        lines.append(
            f"  {at(story.first_breach.window_end)}  first breaching window of v2 "
            f"({at(story.first_breach.window_start)}-{at(story.first_breach.window_end)}): "
            f"{breached}"
        )
    if story.rollback is not None:
        lines.append(
            f"  {at(story.rollback.issued_at)}  monitor rolls back v{story.rollback.from_version} "
            f"-> v{story.rollback.to_version}: {story.rollback.reason}"
        )
    lines.append(f"  {at(story.v1_again_at)}  first result served by v1 again")
    if story.rollback is not None and story.rollback.report_ref is not None:
        lines.append(f"  report      {story.rollback.report_ref.uri}")
    if story.report_url:
        lines.append(f"  open it     {story.report_url}")
    return "\n".join(lines)
