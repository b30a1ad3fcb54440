"""Model-quality figures: ROC AUC (ties counted half), log-loss, calibration."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.float64]
Labels = npt.NDArray[np.int64]

_CLIP = 1e-12


def roc_auc(y: Labels, score: Floats) -> float:
    """The probability that a random positive outscores a random negative (Mann-Whitney U,
    with tied scores given average ranks)."""
    positives = int(np.sum(y == 1))
    negatives = len(y) - positives
    if positives == 0 or negatives == 0:
        raise ValueError("AUC needs both classes")
    order = np.argsort(score, kind="mergesort")
    sorted_scores = score[order]
    ranks = np.empty(len(score))
    start = 0
    while start < len(score):
        end = start
        while end + 1 < len(score) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    rank_sum = float(np.sum(ranks[y == 1]))
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def log_loss(y: Labels, probability: Floats) -> float:
    p = np.clip(probability, _CLIP, 1.0 - _CLIP)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1.0 - p)))


@dataclass(frozen=True)
class CalibrationBin:
    low: float
    high: float
    count: int
    mean_predicted: float
    observed_rate: float


def calibration_table(y: Labels, probability: Floats, bins: int = 10) -> list[CalibrationBin]:
    """Equal-width probability bins; empty bins are left out."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(probability, edges[1:-1]), 0, bins - 1)
    table = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        if count:
            table.append(
                CalibrationBin(
                    low=float(edges[b]),
                    high=float(edges[b + 1]),
                    count=count,
                    mean_predicted=float(probability[members].mean()),
                    observed_rate=float(y[members].mean()),
                )
            )
    return table


def expected_calibration_error(y: Labels, probability: Floats, bins: int = 10) -> float:
    """Count-weighted mean gap between predicted and observed rates over the bins."""
    table = calibration_table(y, probability, bins)
    total = sum(b.count for b in table)
    return sum(b.count * abs(b.mean_predicted - b.observed_rate) for b in table) / total
