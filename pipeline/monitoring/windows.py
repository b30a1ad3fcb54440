"""A monitor window's state and its summary against the reference.

A window's state is a small JSON-able dict of counters and histogram counts over bin edges
fixed once from the reference (so it is mergeable and cheap to keep in a changelog topic); it
never holds raw values. ``summarise`` turns it into a :class:`WindowSummary`: every statistic,
and the breaches against the thresholds.

Features with few distinct values in the reference (flags, payment terms) are categorical:
chi-squared against the reference counts, with Cramer's V as the effect size that must pass its
threshold as well, because with thousands of rows a chi-squared p-value flags differences too
small to matter. The other features are numeric: PSI and KS over the reference's quantile bins.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.monitoring.evidence import Breach, WindowSummary
from pipeline.monitoring.statistics import (
    bin_counts,
    chi_squared_from_counts,
    counts_quantile,
    ks_from_counts,
    psi_from_counts,
    quantile_edges,
)

Floats = npt.NDArray[np.float64]

LATENCY_EDGES_MS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0)
MAX_CATEGORIES = 12
"""A reference feature with at most this many distinct values is treated as categorical."""
SCORE_BINS = 10


@dataclass(frozen=True)
class Thresholds:
    psi: float = 0.2
    ks: float = 0.2
    chi2_alpha: float = 1e-4
    cramers_v: float = 0.1
    error_rate: float = 0.05
    expired_rate: float = 0.05
    low_confidence_margin: float = 0.1
    """A score within this distance of 0.5 is a low-confidence prediction."""
    low_confidence_rate: float = 0.5
    latency_p99_ms: float = 2000.0
    log_loss: float = 0.45
    min_labels: int = 50
    """Quality metrics need at least this many labelled results in the window."""

    def by_metric(self) -> dict[str, float]:
        return {
            "psi": self.psi,
            "ks": self.ks,
            "chi2": self.cramers_v,
            "error_rate": self.error_rate,
            "expired_rate": self.expired_rate,
            "low_confidence_rate": self.low_confidence_rate,
            "latency_p99_ms": self.latency_p99_ms,
            "log_loss": self.log_loss,
        }


@dataclass(frozen=True)
class Reference:
    """Bin edges and reference counts for every feature and for the predictions."""

    numeric_edges: dict[str, tuple[float, ...]]
    numeric_counts: dict[str, tuple[int, ...]]
    categories: dict[str, tuple[float, ...]]
    category_counts: dict[str, tuple[int, ...]]
    score_edges: tuple[float, ...]
    score_counts: tuple[int, ...]

    @classmethod
    def build(
        cls, x: Floats, feature_names: Sequence[str], scores: Floats, bins: int = 10
    ) -> Reference:
        numeric_edges: dict[str, tuple[float, ...]] = {}
        numeric_counts: dict[str, tuple[int, ...]] = {}
        categories: dict[str, tuple[float, ...]] = {}
        category_counts: dict[str, tuple[int, ...]] = {}
        for index, name in enumerate(feature_names):
            column = x[:, index]
            values, counts = np.unique(column, return_counts=True)
            if len(values) <= MAX_CATEGORIES:
                categories[name] = tuple(float(v) for v in values)
                category_counts[name] = tuple(int(c) for c in counts)
            else:
                edges = quantile_edges(column, bins)
                numeric_edges[name] = tuple(float(e) for e in edges)
                numeric_counts[name] = tuple(int(c) for c in bin_counts(column, edges))
        score_edges = quantile_edges(scores, SCORE_BINS)
        return cls(
            numeric_edges,
            numeric_counts,
            categories,
            category_counts,
            tuple(float(e) for e in score_edges),
            tuple(int(c) for c in bin_counts(scores, score_edges)),
        )

    @property
    def features(self) -> tuple[str, ...]:
        return (*self.numeric_edges, *self.categories)

    def to_json(self) -> dict[str, Any]:
        return {
            "numeric_edges": self.numeric_edges,
            "numeric_counts": self.numeric_counts,
            "categories": self.categories,
            "category_counts": self.category_counts,
            "score_edges": self.score_edges,
            "score_counts": self.score_counts,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Reference:
        def floats(d: Mapping[str, Sequence[float]]) -> dict[str, tuple[float, ...]]:
            return {k: tuple(float(v) for v in vs) for k, vs in d.items()}

        def ints(d: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
            return {k: tuple(int(v) for v in vs) for k, vs in d.items()}

        return cls(
            floats(data["numeric_edges"]),
            ints(data["numeric_counts"]),
            floats(data["categories"]),
            ints(data["category_counts"]),
            tuple(float(v) for v in data["score_edges"]),
            tuple(int(v) for v in data["score_counts"]),
        )


def new_window(reference: Reference) -> dict[str, Any]:
    """An empty window state (plain JSON types only)."""
    return {
        "count": 0,
        "errors": 0,
        "expired": 0,
        "scored": 0,
        "low_confidence": 0,
        "scores": [0] * (len(reference.score_edges) + 1),
        "numeric": {f: [0] * (len(e) + 1) for f, e in reference.numeric_edges.items()},
        # One extra slot per categorical feature for values the reference never had.
        "categorical": {f: [0] * (len(c) + 1) for f, c in reference.categories.items()},
        "latency": [0] * (len(LATENCY_EDGES_MS) + 1),
        "labelled": 0,
        "log_loss_sum": 0.0,
        "correct": 0,
    }


def _bin(value: float, edges: Sequence[float]) -> int:
    return int(np.searchsorted(np.asarray(edges), value, side="left"))


def add_result(
    state: dict[str, Any],
    reference: Reference,
    *,
    status: str,
    score: float | None,
    features: Mapping[str, Any] | None,
    total_ms: float | None,
    thresholds: Thresholds,
) -> None:
    """Count one result into the window (mutates ``state``)."""
    state["count"] += 1
    if status == "error" or status == "rejected":
        state["errors"] += 1
    elif status == "expired":
        state["expired"] += 1
    if score is not None and math.isfinite(score):
        state["scored"] += 1
        state["scores"][_bin(score, reference.score_edges)] += 1
        state["low_confidence"] += abs(score - 0.5) < thresholds.low_confidence_margin
    if total_ms is not None:
        state["latency"][_bin(total_ms, LATENCY_EDGES_MS)] += 1
    for name, value in (features or {}).items():
        # Missing or non-numeric values are not evidence of drift in the distribution.
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, int | float) or not math.isfinite(value):
            continue
        if name in reference.numeric_edges:
            state["numeric"][name][_bin(float(value), reference.numeric_edges[name])] += 1
        elif name in reference.categories:
            known = reference.categories[name]
            slot = known.index(float(value)) if float(value) in known else len(known)
            state["categorical"][name][slot] += 1


def add_label(state: dict[str, Any], probability: float, label: int) -> None:
    """Count one ground-truth label against the score the version gave."""
    p = min(max(probability, 1e-12), 1 - 1e-12)
    state["labelled"] += 1
    state["log_loss_sum"] += -math.log(p) if label else -math.log(1 - p)
    state["correct"] += int((probability >= 0.5) == bool(label))


def _rate(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def summarise(
    state: Mapping[str, Any],
    reference: Reference,
    thresholds: Thresholds,
    *,
    model: str,
    version: str,
    start_ms: int,
    end_ms: int,
) -> WindowSummary:
    metrics: dict[str, float] = {}
    breaches: list[Breach] = []

    def check(metric: str, value: float, threshold: float) -> None:
        metrics[metric] = value
        if math.isfinite(value) and value > threshold:
            breaches.append(Breach(metric, value, threshold))

    count = int(state["count"])
    scored = int(state["scored"])
    if scored:
        check("psi:score", psi_from_counts(reference.score_counts, state["scores"]), thresholds.psi)
    for name, counts in state["numeric"].items():
        if sum(counts) == 0:
            continue
        check(
            f"psi:{name}", psi_from_counts(reference.numeric_counts[name], counts), thresholds.psi
        )
        check(
            f"ks:{name}",
            ks_from_counts(reference.numeric_counts[name], counts).statistic,
            thresholds.ks,
        )
    for name, counts in state["categorical"].items():
        total = sum(counts)
        if total == 0:
            continue
        expected = [*reference.category_counts[name], 0]
        test = chi_squared_from_counts(expected, counts)
        metrics[f"chi2_p:{name}"] = test.pvalue
        # Cramer's V for a 2 x k table: the effect size, comparable across window sizes.
        n = total + sum(expected)
        cramers_v = math.sqrt(test.statistic / n) if n and test.dof else 0.0
        metrics[f"chi2:{name}"] = cramers_v
        if test.pvalue < thresholds.chi2_alpha and cramers_v > thresholds.cramers_v:
            breaches.append(Breach(f"chi2:{name}", cramers_v, thresholds.cramers_v))
    check("error_rate", _rate(state["errors"], count), thresholds.error_rate)
    check("expired_rate", _rate(state["expired"], count), thresholds.expired_rate)
    if scored:
        check(
            "low_confidence_rate",
            _rate(state["low_confidence"], scored),
            thresholds.low_confidence_rate,
        )
    if sum(state["latency"]):
        edges = np.asarray(LATENCY_EDGES_MS)
        metrics["latency_p50_ms"] = counts_quantile(edges, state["latency"], 0.5)
        check(
            "latency_p99_ms",
            counts_quantile(edges, state["latency"], 0.99),
            thresholds.latency_p99_ms,
        )
    labelled = int(state["labelled"])
    if labelled:
        metrics["labelled"] = float(labelled)
        metrics["accuracy"] = state["correct"] / labelled
        log_loss = state["log_loss_sum"] / labelled
        if labelled >= thresholds.min_labels:
            check("log_loss", log_loss, thresholds.log_loss)
        else:
            metrics["log_loss"] = log_loss
    return WindowSummary(
        model=model,
        version=version,
        start_ms=start_ms,
        end_ms=end_ms,
        count=count,
        metrics=metrics,
        breaches=tuple(breaches),
        score_counts=tuple(int(c) for c in state["scores"]),
        feature_counts={
            **{f: tuple(int(c) for c in v) for f, v in state["numeric"].items()},
            **{f: tuple(int(c) for c in v) for f, v in state["categorical"].items()},
        },
    )
