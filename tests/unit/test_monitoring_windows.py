"""Window state and summaries against a reference, without Kafka: the monitor's arithmetic."""

from __future__ import annotations

import json

import numpy as np
import pytest

from devkit.modeling.invoices import FEATURES, generate
from pipeline.monitoring.windows import (
    Reference,
    Thresholds,
    add_label,
    add_result,
    new_window,
    summarise,
)

THRESHOLDS = Thresholds(min_labels=20)


@pytest.fixture(scope="module")
def reference() -> Reference:
    sample = generate(5_000, seed=1)
    return Reference.build(sample.x, FEATURES, _score(sample.x))


def _score(x: np.ndarray) -> np.ndarray:
    """Any fixed, continuous score function stands in for a model here."""
    result: np.ndarray = 1 / (1 + np.exp(-(np.log(x[:, 0]) - 9.0)))
    return result


def _window(reference: Reference, rows: np.ndarray, scores: np.ndarray) -> dict[str, object]:
    state = new_window(reference)
    for row, score in zip(rows, scores, strict=True):
        add_result(
            state,
            reference,
            status="ok",
            score=float(score),
            features=dict(zip(FEATURES, row.tolist(), strict=True)),
            total_ms=12.0,
            thresholds=THRESHOLDS,
        )
    return state


def _summary(reference: Reference, state: dict[str, object]):  # type: ignore[no-untyped-def]
    return summarise(
        state, reference, THRESHOLDS, model="m", version="1", start_ms=0, end_ms=30_000
    )


def test_features_split_into_numeric_and_categorical(reference: Reference) -> None:
    assert set(reference.numeric_edges) == {
        "amount_eur",
        "vendor_tenure_days",
        "days_to_due",
    }
    assert set(reference.categories) >= {"new_bank_account", "foreign_vendor", "manual_entry"}
    assert reference.categories["payment_terms_days"] == (0.0, 14.0, 30.0, 45.0, 60.0, 90.0)
    restored = Reference.from_json(json.loads(json.dumps(reference.to_json())))
    assert restored == reference


def test_reference_like_traffic_breaches_nothing(reference: Reference) -> None:
    same = generate(600, seed=2)
    summary = _summary(reference, _window(reference, same.x, _score(same.x)))
    assert summary.count == 600
    assert summary.breaches == ()
    assert summary.metrics["psi:amount_eur"] < 0.1
    assert summary.metrics["error_rate"] == 0.0
    assert 10.0 <= summary.metrics["latency_p50_ms"] <= 20.0


def test_drifted_inputs_and_collapsed_scores_are_named(reference: Reference) -> None:
    young = generate(600, seed=3, shift="young_vendors")
    summary = _summary(reference, _window(reference, young.x, np.full(600, 0.01)))
    breached = {b.metric for b in summary.breaches}
    assert {"psi:vendor_tenure_days", "ks:vendor_tenure_days", "psi:score"} <= breached
    # Categorical features are tested by chi-squared, with its p-value reported beside.
    assert summary.metrics["chi2_p:new_bank_account"] < 0.05  # young vendors change banks more
    assert "psi:new_bank_account" not in summary.metrics
    assert "psi:amount_eur" not in breached


def test_errors_and_labels_become_rates_and_log_loss(reference: Reference) -> None:
    state = new_window(reference)
    for index in range(100):
        add_result(
            state,
            reference,
            status="error" if index < 10 else "ok",
            score=None if index < 10 else 0.9,
            features=None,
            total_ms=None,
            thresholds=THRESHOLDS,
        )
    for _ in range(30):
        add_label(state, 0.9, 0)  # confidently wrong
    summary = _summary(reference, state)
    assert summary.metrics["error_rate"] == pytest.approx(0.1)
    assert summary.metrics["log_loss"] == pytest.approx(-np.log(0.1))
    assert summary.metrics["accuracy"] == 0.0
    assert {b.metric for b in summary.breaches} >= {"error_rate", "log_loss"}


def test_too_few_labels_report_log_loss_without_judging_it(reference: Reference) -> None:
    state = new_window(reference)
    for _ in range(5):
        add_label(state, 0.99, 0)
    summary = _summary(reference, state)
    assert summary.metrics["log_loss"] > 1
    assert "log_loss" not in {b.metric for b in summary.breaches}


def test_window_state_is_plain_json(reference: Reference) -> None:
    state = _window(reference, generate(50, seed=4).x, np.full(50, 0.3))
    assert json.loads(json.dumps(state)) == state
