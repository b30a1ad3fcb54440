"""What a monitor window found, and what a report shows: plain data shared by the decision
policy, the report renderer and the faust application."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Breach:
    metric: str
    """``psi:<feature>``, ``ks:<feature>``, ``chi2:<feature>``, ``psi:score``, ``log_loss``,
    ``error_rate``, ``expired_rate``, ``low_confidence_rate``, ``latency_p99_ms``..."""
    value: float
    threshold: float


@dataclass(frozen=True)
class WindowSummary:
    """One closed tumbling window of one model version."""

    model: str
    version: str
    start_ms: int
    end_ms: int
    count: int
    metrics: dict[str, float]
    """Every statistic computed for the window, by metric name (same names as ``Breach``)."""
    breaches: tuple[Breach, ...] = ()
    score_counts: tuple[int, ...] = ()
    """The window's predictions over ``ReportData.score_edges``."""
    feature_counts: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """The window's inputs over ``ReportData.feature_edges[feature]``."""

    @property
    def breached(self) -> bool:
        return bool(self.breaches)


@dataclass(frozen=True)
class ReportData:
    """Everything the JSON and HTML reports show for one decision."""

    report_id: str
    model: str
    version: str
    baseline_version: str | None
    decision: str
    """``none``, ``alert`` or ``rollback`` (the DriftReport's decision)."""
    explanation: str
    """One paragraph naming the evidence, as put in the DriftReport and the ControlEvent."""
    windows: tuple[WindowSummary, ...]
    """This version's windows, oldest first; the last ones are the breaching ones."""
    thresholds: dict[str, float]
    score_edges: tuple[float, ...]
    reference_score_counts: tuple[int, ...]
    feature_edges: dict[str, tuple[float, ...]]
    reference_feature_counts: dict[str, tuple[int, ...]]
    created_at_ms: int
