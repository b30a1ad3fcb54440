"""When a breaching window becomes an alert, and when an alert becomes a rollback.

The policy sees each closed window of each model version once, in order, and keeps a little
state per model (JSON-able, so the monitor keeps it in a changelog-backed table and a restart
continues the count). The rules:

- A version **breaches** in a window when any statistic is over its threshold.
- ``consecutive_windows`` breaching windows in a row make an **alert**; a clean window resets
  the count. An alerting version is **healthy** again only after ``recovery_windows`` clean
  windows in a row (hysteresis: one lucky window does not clear it).
- A **rollback** needs all of: the alerting version is the one serving; evidence against the
  version itself (its predictions, its quality where labels arrived, its errors), because input
  drift alone is a change in traffic that rolling back would not fix; another version that was
  healthy (``recovery_windows`` clean windows) more recently than any alert of its own; no
  operator pin; and the model's last automatic action is older than ``cooldown_s``.
- After a rollback the rolled-back version's count starts again, so it is not rolled back twice.
- The policy remembers, per version, the last window it judged and what it decided: the same
  window seen again (a monitor that died after judging it and before forgetting it) gets the same
  decision back without being counted twice, and ``ModelState.behind`` tells an older window of
  that version, already judged and written, from a new one.
- A rollback carries an idempotency key derived from the model, both versions and the starts of
  the breaching windows (``rollback_key``): deciding the same rollback again gives the same key,
  which followers of the control topic fold once.

Every decision carries an explanation that names the evidence: metric, value, threshold,
windows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from pipeline.monitoring.evidence import Breach, WindowSummary

MODEL_METRIC_PREFIXES = (
    "psi:score",
    "log_loss",
    "accuracy",
    "error_rate",
    "expired_rate",
    "low_confidence_rate",
)
"""Metrics that speak about the version itself rather than about its traffic."""


@dataclass(frozen=True)
class PolicySettings:
    consecutive_windows: int = 2
    recovery_windows: int = 2
    cooldown_s: float = 300.0


@dataclass
class VersionState:
    consecutive_breaches: int = 0
    clean_streak: int = 0
    alerting: bool = False
    healthy_at_ms: int | None = None
    """End of the window that last completed a healthy streak."""
    recent_windows: list[tuple[int, int]] = field(default_factory=list)
    """(start, end) of the current breaching streak's windows, for the explanation."""
    judged_start_ms: int | None = None
    """Start of the last window judged (``observe``) for this version."""
    judged: dict[str, Any] | None = None
    """What that window was decided (``Decision.to_json``), replayed if it is seen again."""


@dataclass
class ModelState:
    versions: dict[str, VersionState] = field(default_factory=dict)
    last_action_ms: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> ModelState:
        if not data:
            return cls()
        versions = {
            name: VersionState(
                consecutive_breaches=int(v["consecutive_breaches"]),
                clean_streak=int(v["clean_streak"]),
                alerting=bool(v["alerting"]),
                healthy_at_ms=v.get("healthy_at_ms"),
                recent_windows=[(int(s), int(e)) for s, e in v.get("recent_windows", [])],
                judged_start_ms=v.get("judged_start_ms"),
                judged=v.get("judged"),
            )
            for name, v in data.get("versions", {}).items()
        }
        return cls(versions=versions, last_action_ms=data.get("last_action_ms"))

    def behind(self, version: str, start_ms: int) -> bool:
        """Whether a later window of ``version`` than the one at ``start_ms`` was judged: that
        one was judged and written before it (windows are judged in order) and is done."""
        state = self.versions.get(version)
        return (
            state is not None
            and state.judged_start_ms is not None
            and start_ms < state.judged_start_ms
        )


@dataclass(frozen=True)
class Decision:
    decision: str
    """``none``, ``alert`` or ``rollback`` (the DriftReport's ``decision``)."""
    severity: str
    """``ok``, ``warning`` (breaching, not yet K windows) or ``critical`` (alert or rollback)."""
    consecutive_breaches: int
    rollback_to: str | None
    explanation: str
    evidence: tuple[Breach, ...]
    windows: tuple[tuple[int, int], ...] = ()
    """(start, end) of the breaching windows the decision rests on."""
    idempotency_key: str | None = None
    """A rollback's key (``rollback_key``): the same rollback decided twice has the same key."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Decision:
        return cls(
            decision=str(data["decision"]),
            severity=str(data["severity"]),
            consecutive_breaches=int(data["consecutive_breaches"]),
            rollback_to=data.get("rollback_to"),
            explanation=str(data["explanation"]),
            evidence=tuple(
                Breach(str(b["metric"]), float(b["value"]), float(b["threshold"]))
                for b in data.get("evidence", [])
            ),
            windows=tuple((int(s), int(e)) for s, e in data.get("windows", [])),
            idempotency_key=data.get("idempotency_key"),
        )


def rollback_key(
    model: str, from_version: str, to_version: str, window_starts: Sequence[int]
) -> str:
    """The idempotency key of a rollback: a digest of what identifies it, so it is the same
    however often, and by whichever monitor, the rollback is decided, whatever the characters in
    the names."""
    identity = json.dumps([model, from_version, to_version, [int(s) for s in window_starts]])
    return "rollback-" + hashlib.sha256(identity.encode()).hexdigest()[:32]


def _time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%H:%M:%S")


def _is_model_metric(metric: str) -> bool:
    return metric.startswith(MODEL_METRIC_PREFIXES)


def _describe(breaches: tuple[Breach, ...]) -> str:
    return ", ".join(f"{b.metric} {b.value:.3g} > {b.threshold:.3g}" for b in breaches)


class RollbackPolicy:
    def __init__(self, settings: PolicySettings) -> None:
        self.settings = settings

    def observe(
        self,
        state: ModelState,
        window: WindowSummary,
        *,
        serving_version: str | None,
        pinned: bool,
    ) -> Decision:
        """Fold one closed window into ``state`` (mutated) and decide.

        The window judged last for its version, seen again, gets the same decision back and
        changes nothing. A window older than that one must not be passed in (``behind``).
        """
        version = state.versions.setdefault(window.version, VersionState())
        if version.judged is not None and version.judged_start_ms == window.start_ms:
            return Decision.from_json(version.judged)
        if version.judged_start_ms is not None and window.start_ms < version.judged_start_ms:
            raise ValueError(
                f"{window.model} v{window.version}: window at {window.start_ms} is older than "
                f"the one judged last ({version.judged_start_ms})"
            )
        decision = self._decide(state, version, window, serving_version, pinned)
        version.judged_start_ms = window.start_ms
        version.judged = decision.to_json()
        return decision

    def _decide(
        self,
        state: ModelState,
        version: VersionState,
        window: WindowSummary,
        serving_version: str | None,
        pinned: bool,
    ) -> Decision:
        if not window.breached:
            return self._clean(version, window)
        version.consecutive_breaches += 1
        version.clean_streak = 0
        version.recent_windows = [*version.recent_windows, (window.start_ms, window.end_ms)][
            -self.settings.consecutive_windows :
        ]
        name = f"{window.model} v{window.version}"
        streak = version.consecutive_breaches
        needed = self.settings.consecutive_windows
        found = (
            f"{name} breached in {streak} consecutive window(s) "
            f"({', '.join(f'{_time(s)}-{_time(e)}' for s, e in version.recent_windows)}): "
            f"{_describe(window.breaches)}."
        )
        spans = tuple(version.recent_windows)
        if streak < needed:
            return Decision(
                "none",
                "warning",
                streak,
                None,
                f"{found} Alert after {needed}.",
                window.breaches,
                spans,
            )
        version.alerting = True
        reason = self._why_not_rollback(state, window, serving_version, pinned)
        if reason is not None:
            return Decision(
                "alert", "critical", streak, None, f"{found} {reason}", window.breaches, spans
            )
        target = self._healthy_other(state, window.version)
        assert target is not None  # _why_not_rollback checked it
        healthy_at = state.versions[target].healthy_at_ms
        assert healthy_at is not None
        state.last_action_ms = window.end_ms
        version.consecutive_breaches = 0
        version.recent_windows = []
        explanation = (
            f"{found} v{target} was healthy (clean through {_time(healthy_at)}); "
            f"rolling {window.model} back from v{window.version} to v{target}."
        )
        key = rollback_key(window.model, window.version, target, [s for s, _ in spans])
        return Decision(
            "rollback", "critical", streak, target, explanation, window.breaches, spans, key
        )

    def _clean(self, version: VersionState, window: WindowSummary) -> Decision:
        version.consecutive_breaches = 0
        version.recent_windows = []
        version.clean_streak += 1
        if version.clean_streak >= self.settings.recovery_windows:
            version.alerting = False
            version.healthy_at_ms = window.end_ms
        note = (
            f" Still alerting until {self.settings.recovery_windows} clean windows in a row."
            if version.alerting
            else ""
        )
        return Decision(
            "none",
            "ok",
            0,
            None,
            f"{window.model} v{window.version}: no threshold breached in "
            f"{_time(window.start_ms)}-{_time(window.end_ms)} ({window.count} results).{note}",
            (),
        )

    def _why_not_rollback(
        self,
        state: ModelState,
        window: WindowSummary,
        serving_version: str | None,
        pinned: bool,
    ) -> str | None:
        if not any(_is_model_metric(b.metric) for b in window.breaches):
            return (
                "Only the inputs drifted: the traffic changed, not the model, and a rollback "
                "would not help. Alerting."
            )
        if serving_version is not None and serving_version != window.version:
            return f"v{window.version} is not serving (v{serving_version} is). Alerting."
        if pinned:
            return f"v{window.version} is pinned by an operator; no automatic rollback. Alerting."
        if (
            state.last_action_ms is not None
            and window.end_ms - state.last_action_ms < self.settings.cooldown_s * 1000
        ):
            return (
                f"In cooldown after the automatic action at {_time(state.last_action_ms)} "
                f"({self.settings.cooldown_s:.0f}s). Alerting."
            )
        if self._healthy_other(state, window.version) is None:
            return "No other version has been healthy to roll back to. Alerting."
        return None

    @staticmethod
    def _healthy_other(state: ModelState, version: str) -> str | None:
        candidates = [
            (v.healthy_at_ms, name)
            for name, v in state.versions.items()
            if name != version and not v.alerting and v.healthy_at_ms is not None
        ]
        return max(candidates)[1] if candidates else None
