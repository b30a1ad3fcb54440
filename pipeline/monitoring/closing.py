"""Closing a monitor window: judge it, write the decision durably, and only then forget it.

The monitor keeps its windows, the policy's state, how far each version has been judged
(``closed``) and recent window summaries (``history``) in changelog-backed tables; this module
gets them as plain mutable mappings, with the routing table, a clock and a :class:`DecisionSink`
(the object store and the producers), so every step is testable without Kafka.

Closing one due window, in this order:

1. Summarise the window against the reference.
2. Judge it (or get back the decision already taken for it, see below), and record in the
   tables what the judgement changed: the policy's state with the decision it took for this
   window, the ``closed`` mark (later records for the window are late, so the window stays what
   was judged), the summary in ``history``. Then ``flush``: these writes are durable before
   anything is written outside.
3. Write the decision: the report objects (alerts and rollbacks), the ``DriftReport``, and for a
   rollback the ``ControlEvent``, each acknowledged or stored before the next, unless the
   control topic already holds a decision with the rollback's idempotency key.
4. Only now forget the window.

A failure anywhere leaves the window in its table, and the next call judges it again. The
policy remembers the last window it judged per version and its decision, so judging the same
window again gives the same decision without counting the window twice (and without depending
on the routing table, which a rollback emitted before the failure has already changed). A window
of a version that the policy has already judged past was written before that later window was
judged (windows are closed in order, one at a time): it is forgotten without being written
again. The report id is derived from the window key and the rollback's event id from its
idempotency key, so a decision written twice (a monitor killed between steps 3 and 4) carries the
same ids twice: a ``DriftReport`` repeated with the same ``report_id``, the same report objects
overwritten, and no second ``ControlEvent``.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np

from pipeline.monitoring.evidence import Breach, WindowSummary
from pipeline.monitoring.policy import Decision, ModelState, RollbackPolicy
from pipeline.routing import RouteAction, RouteDecision, RoutingTable
from schemas.models import (
    ControlAction,
    ControlEvent,
    DriftDecision,
    DriftMetric,
    DriftReport,
    DriftSeverity,
    ObjectRef,
)

log = logging.getLogger("sluiceway.monitor")

IDS = uuid.UUID("5a1c3e7a-0b1d-5c3e-9f00-6d6f6e69746f")
"""Namespace of the monitor's derived ids (report ids from window keys, event ids from
idempotency keys)."""


@dataclass(frozen=True, order=True)
class WindowKey:
    """One tumbling window of one model version, as a table key.

    Encoded as a JSON array, so model names and versions may hold any character (``|``, ``/``,
    quotes, unicode) and still decode to exactly what they were; ``decode`` also reads the keys
    of earlier monitors (``model|version|start``) where they are unambiguous.
    """

    start_ms: int
    model: str
    version: str

    def encode(self) -> str:
        return json.dumps([self.model, self.version, self.start_ms])

    @classmethod
    def decode(cls, key: str) -> WindowKey:
        """Raise ``ValueError`` for a key that is neither form."""
        if key.startswith("["):
            parts = json.loads(key)
            if (
                not isinstance(parts, list)
                or len(parts) != 3
                or not isinstance(parts[0], str)
                or not isinstance(parts[1], str)
                or not isinstance(parts[2], int)
                or isinstance(parts[2], bool)
            ):
                raise ValueError(f"not a window key: {key!r}")
            return cls(start_ms=parts[2], model=parts[0], version=parts[1])
        legacy = key.split("|")
        if len(legacy) != 3 or not legacy[2].isdigit():
            raise ValueError(f"not a window key: {key!r}")
        return cls(start_ms=int(legacy[2]), model=legacy[0], version=legacy[1])


def version_key(model: str, version: str) -> str:
    """Table key of one model version (``closed`` and ``history``), any characters allowed."""
    return json.dumps([model, version])


def report_id_for(key: WindowKey) -> uuid.UUID:
    """The DriftReport id of a window: the same however often the window is judged."""
    return uuid.uuid5(IDS, "drift-report:" + key.encode())


def control_event_id(idempotency_key: str) -> uuid.UUID:
    return uuid.uuid5(IDS, "control-event:" + idempotency_key)


def summary_json(summary: WindowSummary) -> dict[str, Any]:
    data = asdict(summary)
    data["breaches"] = [asdict(b) for b in summary.breaches]
    return data


def summary_from_json(data: dict[str, Any]) -> WindowSummary:
    return WindowSummary(
        model=data["model"],
        version=data["version"],
        start_ms=int(data["start_ms"]),
        end_ms=int(data["end_ms"]),
        count=int(data["count"]),
        metrics={k: float(v) for k, v in data["metrics"].items()},
        breaches=tuple(Breach(**b) for b in data["breaches"]),
        score_counts=tuple(data["score_counts"]),
        feature_counts={k: tuple(v) for k, v in data["feature_counts"].items()},
    )


def drift_metrics(summary: WindowSummary, thresholds: dict[str, float]) -> list[DriftMetric]:
    """The DriftReport's metrics: every finite statistic, with its threshold and breach."""
    breached = {b.metric: b for b in summary.breaches}
    metrics = []
    for name, value in sorted(summary.metrics.items()):
        if not np.isfinite(value):
            continue
        breach = breached.get(name)
        prefix = name.split(":", 1)[0]
        metrics.append(
            DriftMetric(
                name=prefix,
                feature=name.split(":", 1)[1] if ":" in name else None,
                value=value,
                threshold=breach.threshold if breach else thresholds.get(prefix),
                breached=breach is not None,
            )
        )
    return metrics


@dataclass(frozen=True)
class JudgedWindow:
    """A window with its decision, as the sink writes it."""

    key: WindowKey
    summary: WindowSummary
    decision: Decision
    report_id: uuid.UUID
    history: tuple[WindowSummary, ...]
    """The version's recent windows, oldest first, this one last (the report's charts)."""


class DecisionSink(Protocol):
    """Where decisions go. Each call returns only once what it wrote is durable (stored, or
    produced and acknowledged by the broker), and raises otherwise."""

    async def store_report(self, judged: JudgedWindow) -> ObjectRef:
        """Store the JSON and HTML reports of an alert or rollback; return the HTML's ref."""
        ...

    async def send_report(self, report: DriftReport) -> None: ...

    async def send_control(self, event: ControlEvent) -> None: ...

    async def refresh_control(self) -> None:
        """Fold the control topic's new events into the routing table (keys included)."""
        ...


@dataclass(frozen=True)
class CloserSettings:
    window_ms: int
    grace_ms: int
    min_window_count: int
    thresholds: dict[str, float]
    """Threshold per metric prefix, for the DriftReport's metrics."""
    issuer: str
    """``issued_by`` of rollbacks (starts with ``monitor``)."""
    history_windows: int = 24


class WindowCloser:
    """Closes due windows, one at a time and in order (see the module doc for the steps)."""

    def __init__(
        self,
        settings: CloserSettings,
        *,
        windows: MutableMapping[str, Any],
        states: MutableMapping[str, Any],
        closed: MutableMapping[str, Any],
        history: MutableMapping[str, Any],
        policy: RollbackPolicy,
        routing: RoutingTable,
        summarise: Callable[[WindowKey, Any], WindowSummary | None],
        sink: DecisionSink,
        flush: Callable[[], Awaitable[None]],
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.windows = windows
        self.states = states
        self.closed = closed
        self.history = history
        self.policy = policy
        self.routing = routing
        self.summarise = summarise
        self.sink = sink
        self.flush = flush
        self.clock = clock  # wall-clock seconds, like time.time

    def due(self) -> list[tuple[WindowKey, str]]:
        """Windows whose end plus grace has passed, oldest first, with their raw keys.

        A key that is not a window key cannot be judged: it is dropped, with a warning, rather
        than stopping every window behind it.
        """
        now_ms = int(self.clock() * 1000)
        found = []
        for raw in list(self.windows.keys()):
            try:
                key = WindowKey.decode(raw)
            except ValueError as error:
                log.warning('window dropped key="%s" error="%s"', raw, error)
                del self.windows[raw]
                continue
            if key.start_ms + self.settings.window_ms + self.settings.grace_ms <= now_ms:
                found.append((key, raw))
        return sorted(found)

    async def close_due(self) -> int:
        """Close every due window in order; return how many were closed.

        Stops at the first window that fails: it stays in its table and is judged again at the
        next call, before any later window (the policy sees each version's windows in order).
        """
        count = 0
        for key, raw in self.due():
            try:
                await self.close(key, raw)
            except Exception as error:  # any failure: the window stays, judged again next time
                log.warning(
                    'window not closed model="%s" version="%s" start_ms="%d" error="%s: %s" '
                    "(kept; judged again)",
                    key.model,
                    key.version,
                    key.start_ms,
                    type(error).__name__,
                    error,
                )
                return count
            count += 1
        return count

    def is_late(self, model: str, version: str, timestamp_ms: int) -> bool:
        """Whether a record at ``timestamp_ms`` falls in a window of this version already
        judged."""
        return timestamp_ms < int(self.closed.get(version_key(model, version)) or 0)

    async def close(self, key: WindowKey, raw: str) -> None:
        """Judge one window, write its decision, then forget it (steps in the module doc)."""
        state = self.windows[raw]
        model_state = ModelState.from_json(self.states.get(key.model))
        if model_state.behind(key.version, key.start_ms):
            log.info(
                'window model="%s" version="%s" start_ms="%d" already judged and written',
                key.model,
                key.version,
                key.start_ms,
            )
            del self.windows[raw]
            return
        # Step 1. Summarise.
        summary = self.summarise(key, state)
        end_ms = key.start_ms + self.settings.window_ms
        marker = version_key(key.model, key.version)
        self.closed[marker] = max(int(self.closed.get(marker) or 0), end_ms)
        if summary is None:  # no reference for the model: nothing to judge
            del self.windows[raw]
            return
        past = self._remember(summary)
        if summary.count < self.settings.min_window_count:
            log.info(
                'window model="%s" version="%s" count="%d" below min_window_count, not judged',
                key.model,
                key.version,
                summary.count,
            )
            del self.windows[raw]
            return
        # Step 2. Judge (or get the same decision back) and make what it changed durable.
        decision = self.policy.observe(
            model_state,
            summary,
            serving_version=self.routing.version_for(key.model) or None,
            pinned=self.routing.is_pinned(key.model),
        )
        self.states[key.model] = model_state.to_json()
        await self.flush()
        # Step 3. Write the decision; each part durable before the next.
        judged = JudgedWindow(key, summary, decision, report_id_for(key), past)
        await self._write(judged)
        log.info(
            'window model="%s" version="%s" count="%d" decision="%s" %s',
            key.model,
            key.version,
            summary.count,
            decision.decision,
            decision.explanation,
        )
        # Step 4. Only now forget the window.
        del self.windows[raw]

    def _remember(self, summary: WindowSummary) -> tuple[WindowSummary, ...]:
        """Put the window's summary in its version's history (once, however often it is
        judged); return that history, oldest first."""
        marker = version_key(summary.model, summary.version)
        others = [s for s in self.history.get(marker) or [] if s["start_ms"] != summary.start_ms]
        past = sorted([*others, summary_json(summary)], key=lambda s: int(s["start_ms"]))
        self.history[marker] = past[-self.settings.history_windows :]
        return tuple(summary_from_json(s) for s in past[-self.settings.history_windows :])

    async def _write(self, judged: JudgedWindow) -> None:
        decision, summary = judged.decision, judged.summary
        report_ref = None
        if decision.decision != "none":
            report_ref = await self.sink.store_report(judged)
        now = datetime.fromtimestamp(self.clock(), tz=UTC)
        await self.sink.send_report(
            DriftReport(
                report_id=judged.report_id,
                model=summary.model,
                model_version=summary.version,
                baseline_version=decision.rollback_to,
                window_start=datetime.fromtimestamp(summary.start_ms / 1000, tz=UTC),
                window_end=datetime.fromtimestamp(summary.end_ms / 1000, tz=UTC),
                window_count=summary.count,
                consecutive_breaches=decision.consecutive_breaches,
                metrics=drift_metrics(summary, self.settings.thresholds),
                severity=DriftSeverity(decision.severity),
                decision=DriftDecision(decision.decision),
                explanation=decision.explanation,
                report_ref=report_ref,
                created_at=now,
            )
        )
        if decision.decision != "rollback" or decision.rollback_to is None:
            return
        key = decision.idempotency_key
        assert key is not None  # the policy gives every rollback one
        await self.sink.refresh_control()
        if self.routing.has_seen(summary.model, key):
            log.info(
                'rollback model="%s" key="%s" already on the control topic, not sent again',
                summary.model,
                key,
            )
            return
        event = ControlEvent(
            event_id=control_event_id(key),
            model=summary.model,
            action=ControlAction.ROLLBACK,
            from_version=summary.version,
            to_version=decision.rollback_to,
            reason=decision.explanation,
            report_id=judged.report_id,
            report_ref=report_ref,
            issued_at=now,
            issued_by=self.settings.issuer,
            idempotency_key=key,
        )
        await self.sink.send_control(event)
        # The monitor's own view follows at once (the control topic echoes it later: a no-op).
        self.routing.apply(
            RouteDecision(
                model=event.model,
                action=RouteAction.ROLLBACK,
                version=event.to_version,
                issued_at_ms=int(event.issued_at.timestamp() * 1000),
                reason=event.reason,
                idempotency_key=key,
            )
        )
