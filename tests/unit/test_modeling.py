"""The demo model's generator, fit, attributions and metrics, as plain functions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from devkit.modeling.invoices import FEATURES, generate, ground_truth_logit
from devkit.modeling.logistic import LinearModel, train
from devkit.modeling.metrics import (
    calibration_table,
    expected_calibration_error,
    log_loss,
    roc_auc,
)
from devkit.modeling.training import DEMO_MODEL, VERSIONS, is_trained, train_versions
from devkit.settings import load_demo_settings


def test_the_served_feature_order_is_the_generators() -> None:
    assert load_demo_settings().models[DEMO_MODEL].feature_order == FEATURES


def test_the_generator_is_seeded_and_realistic() -> None:
    first, again, other = generate(20_000, seed=3), generate(20_000, seed=3), generate(20_000, 4)
    np.testing.assert_array_equal(first.x, again.x)
    np.testing.assert_array_equal(first.y, again.y)
    assert not np.array_equal(first.x, other.x)
    column = {name: first.x[:, i] for i, name in enumerate(FEATURES)}
    assert 1_500 < np.median(column["amount_eur"]) < 2_200  # log-normal around 1,800 EUR
    assert np.percentile(column["amount_eur"], 99) > 10 * np.median(column["amount_eur"])
    assert set(np.unique(column["payment_terms_days"])) <= {0, 14, 30, 45, 60, 90}
    assert np.all(column["days_to_due"] <= column["payment_terms_days"])
    assert 0.10 < first.y.mean() < 0.18
    young = column["vendor_tenure_days"] < 90
    # New vendors change bank details more often, the pattern auditors look for.
    assert column["new_bank_account"][young].mean() > 3 * column["new_bank_account"][~young].mean()


def test_shifts_change_what_they_say() -> None:
    reference, cents = generate(5_000, seed=5), generate(5_000, seed=5, shift="amount_cents")
    amount = FEATURES.index("amount_eur")
    np.testing.assert_allclose(cents.x[:, amount], reference.x[:, amount] * 100)
    np.testing.assert_array_equal(cents.y, reference.y)
    young = generate(5_000, seed=5, shift="young_vendors")
    tenure = FEATURES.index("vendor_tenure_days")
    assert np.median(young.x[:, tenure]) < np.median(reference.x[:, tenure]) / 3


def test_training_recovers_the_ground_truth_ranking() -> None:
    data = generate(30_000, seed=1)
    model = train(data.x, data.y, FEATURES, ("amount_eur", "vendor_tenure_days"))
    holdout = generate(10_000, seed=2)
    truth = 1 / (1 + np.exp(-ground_truth_logit(holdout.x)))
    achievable = roc_auc(holdout.y, truth)
    fitted = roc_auc(holdout.y, model.predict_proba(holdout.x))
    assert fitted > 0.72
    assert achievable - fitted < 0.02
    assert expected_calibration_error(holdout.y, model.predict_proba(holdout.x)) < 0.02
    signs = dict(zip(FEATURES, np.sign(model.coef), strict=True))
    assert signs["amount_eur"] > 0
    assert signs["vendor_tenure_days"] < 0
    assert signs["new_bank_account"] > 0


def test_attributions_are_complete_against_the_baseline() -> None:
    data = generate(5_000, seed=8)
    model = train(data.x, data.y, FEATURES, ("amount_eur",))
    x = generate(500, seed=9).x
    gap = model.logit(x) - model.logit(model.baseline.reshape(1, -1))
    np.testing.assert_allclose(model.attributions(x).sum(axis=1), gap, atol=1e-9)
    assert model.logit(model.baseline.reshape(1, -1))[0] == pytest.approx(model.intercept)
    # A feature equal to the baseline's contributes nothing.
    row = model.baseline.copy()
    row[0] *= 3
    assert np.count_nonzero(np.abs(model.attributions(row.reshape(1, -1))) > 1e-12) == 1


def test_saved_weights_load_back_and_are_byte_identical(tmp_path: Path) -> None:
    data = generate(2_000, seed=4)
    model = train(data.x, data.y, FEATURES, ("amount_eur",))
    model.save(tmp_path / "a.npz")
    model.save(tmp_path / "b.npz")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    loaded = LinearModel.load(tmp_path / "a.npz")
    assert loaded.feature_names == FEATURES
    np.testing.assert_array_equal(loaded.predict_proba(data.x), model.predict_proba(data.x))


def test_training_is_reproducible_and_version_two_regresses(tmp_path: Path) -> None:
    first = train_versions(tmp_path / "first", seed=7, n=8_000)
    second = train_versions(tmp_path / "second", seed=7, n=8_000)
    for version in VERSIONS:
        weights = [
            (tmp_path / run / version / "weights.npz").read_bytes() for run in ("first", "second")
        ]
        assert weights[0] == weights[1]
        stored = json.loads((tmp_path / "first" / version / "metrics.json").read_text())
        assert stored["auc"] == first[version]["auc"] == second[version]["auc"]
    assert is_trained(tmp_path / "first")
    other = train_versions(tmp_path / "other", seed=8, n=8_000)
    assert other["1"]["auc"] != first["1"]["auc"]
    # Version 2 (trained on amounts in cents) is badly calibrated on real traffic.
    assert first["2"]["log_loss"] > first["1"]["log_loss"] + 0.1
    assert first["2"]["ece"] > 5 * first["1"]["ece"]


def test_auc_counts_ties_half_and_matches_pairwise_counting() -> None:
    y = np.array([0, 0, 1, 1, 0, 1])
    score = np.array([0.1, 0.4, 0.4, 0.8, 0.8, 0.9])
    pairs = [(p, n) for p in score[y == 1] for n in score[y == 0]]
    expected = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert roc_auc(y, score) == pytest.approx(expected)
    assert roc_auc(np.array([0, 1]), np.array([0.2, 0.9])) == 1.0
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(np.array([1, 1]), np.array([0.2, 0.9]))


def test_log_loss_and_calibration() -> None:
    y = np.array([1, 0, 1, 0])
    assert log_loss(y, np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(np.log(2))
    assert log_loss(y, np.array([1.0, 0.0, 1.0, 0.0])) < 1e-9  # clipped, never infinite
    probability = np.array([0.05, 0.05, 0.95, 0.95])
    table = calibration_table(np.array([0, 1, 1, 1]), probability)
    assert [(b.count, b.observed_rate) for b in table] == [(2, 0.5), (2, 1.0)]
    assert expected_calibration_error(np.array([0, 1, 1, 1]), probability) == pytest.approx(
        (2 * 0.45 + 2 * 0.05) / 4
    )
