"""The monitor's drift statistics against SciPy (a test-only dependency) and hand-worked values."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from scipy import special, stats

from pipeline.monitoring.statistics import (
    ChiSquaredResult,
    KsResult,
    accuracy,
    bin_counts,
    binary_log_loss,
    chi2_sf,
    chi_squared_from_counts,
    counts_quantile,
    kolmogorov_sf,
    ks_from_counts,
    ks_two_sample,
    psi,
    psi_from_counts,
    quantile_edges,
    regularized_gamma_q,
)


def rng(seed: int = 20240611) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_module_imports_without_scipy() -> None:
    code = (
        "import sys; import pipeline.monitoring.statistics; "
        "sys.exit(1 if any(m == 'scipy' or m.startswith('scipy.') for m in sys.modules) else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# Binning


def test_quantile_edges_cut_a_continuous_sample_into_equal_bins() -> None:
    reference = rng().normal(size=20_000)
    edges = quantile_edges(reference, bins=10)
    assert edges.shape == (9,)
    assert np.all(np.diff(edges) > 0)
    # Edges are order statistics, so each right-closed bin holds exactly a tenth.
    assert bin_counts(reference, edges).tolist() == [2_000] * 10


def test_quantile_edges_of_a_binary_feature_is_a_single_edge() -> None:
    reference = (rng().random(1_000) < 0.3).astype(float)
    edges = quantile_edges(reference, bins=10)
    assert edges.tolist() == [0.0]
    counts = bin_counts(reference, edges)
    assert counts.tolist() == [int(np.sum(reference == 0)), int(np.sum(reference == 1))]


def test_quantile_edges_merge_heavy_ties() -> None:
    reference = np.concatenate([np.zeros(800), np.arange(1, 201, dtype=float)])
    edges = quantile_edges(reference, bins=10)
    assert edges[0] == 0.0
    assert len(edges) == len(np.unique(edges)) <= 9
    assert edges[-1] < reference.max()


def test_a_constant_reference_gives_one_bin() -> None:
    edges = quantile_edges(np.full(50, 3.5))
    assert edges.size == 0
    assert bin_counts([1.0, 3.5, 9.0], edges).tolist() == [3]
    assert psi(np.full(50, 3.5), np.full(20, 3.5)) == 0.0


@pytest.mark.parametrize("bins", [0, -3])
def test_quantile_edges_reject_fewer_than_one_bin(bins: int) -> None:
    with pytest.raises(ValueError, match="bins"):
        quantile_edges([1.0, 2.0], bins=bins)


def test_quantile_edges_reject_infinite_reference() -> None:
    with pytest.raises(ValueError, match="finite"):
        quantile_edges([1.0, math.inf])


def test_bin_counts_put_a_value_equal_to_an_edge_in_the_lower_bin() -> None:
    edges = np.array([0.0, 1.0, 2.0])
    values = [-math.inf, -5.0, 0.0, 0.5, 1.0, 1.0000001, 2.0, 2.5, math.inf]
    counts = bin_counts(values, edges)
    assert counts.dtype == np.int64
    assert counts.tolist() == [3, 2, 2, 2]


def test_bin_counts_of_an_empty_window_are_zeros() -> None:
    assert bin_counts(np.array([]), np.array([1.0, 2.0])).tolist() == [0, 0, 0]


def test_bin_counts_are_mergeable() -> None:
    generator = rng()
    edges = quantile_edges(generator.normal(size=1_000))
    first, second = generator.normal(size=300), generator.normal(size=700)
    merged = bin_counts(first, edges) + bin_counts(second, edges)
    assert merged.tolist() == bin_counts(np.concatenate([first, second]), edges).tolist()


@pytest.mark.parametrize("edges", [[1.0, 1.0], [2.0, 1.0], [0.0, math.nan], [[0.0, 1.0]]])
def test_bin_counts_reject_bad_edges(edges: list[Any]) -> None:
    with pytest.raises(ValueError, match="edges"):
        bin_counts([0.5], edges)


# Missing values


def _nan_calls() -> list[tuple[str, Callable[[], object]]]:
    with_nan = np.array([0.1, math.nan, 0.7])
    clean = np.array([0.2, 0.4, 0.9])
    labels = np.array([0, 1, 1])
    return [
        ("quantile_edges", lambda: quantile_edges(with_nan)),
        ("bin_counts", lambda: bin_counts(with_nan, [0.5])),
        ("psi reference", lambda: psi(with_nan, clean)),
        ("psi current", lambda: psi(clean, with_nan)),
        ("ks_two_sample", lambda: ks_two_sample(clean, with_nan)),
        ("binary_log_loss", lambda: binary_log_loss(labels, with_nan)),
        ("accuracy", lambda: accuracy(labels, with_nan)),
    ]


@pytest.mark.parametrize(("name", "call"), _nan_calls(), ids=[n for n, _ in _nan_calls()])
def test_nan_in_raw_values_is_rejected(name: str, call: Callable[[], object]) -> None:
    with pytest.raises(ValueError, match="NaN"):
        call()


@pytest.mark.parametrize(
    "call",
    [
        lambda: psi_from_counts([1, math.nan], [1, 1]),
        lambda: ks_from_counts([1, 1], [math.nan, 1]),
        lambda: chi_squared_from_counts([1, 1], [1, math.nan]),
    ],
)
def test_nan_in_counts_is_rejected(call: Callable[[], object]) -> None:
    with pytest.raises(ValueError, match="counts"):
        call()


# PSI


def test_psi_of_identical_proportions_is_zero() -> None:
    counts = np.array([10, 0, 25, 65])
    assert psi_from_counts(counts, counts) == 0.0
    assert psi_from_counts(counts, 3 * counts) == pytest.approx(0.0, abs=1e-15)


def test_psi_matches_a_hand_computed_value_and_is_symmetric() -> None:
    reference, current = [50, 30, 20], [30, 30, 40]
    expected = (0.3 - 0.5) * math.log(0.3 / 0.5) + (0.4 - 0.2) * math.log(0.4 / 0.2)
    assert psi_from_counts(reference, current) == pytest.approx(expected, rel=1e-12)
    assert psi_from_counts(current, reference) == pytest.approx(expected, rel=1e-12)


def test_psi_floors_an_empty_bin_at_epsilon() -> None:
    value = psi_from_counts([90, 10], [100, 0], epsilon=1e-4)
    expected = (1.0 - 0.9) * math.log(1.0 / 0.9) + (1e-4 - 0.1) * math.log(1e-4 / 0.1)
    assert math.isfinite(value)
    assert value == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("reference", "current", "epsilon"),
    [
        ([1, 2], [1, 2, 3], 1e-4),
        ([1, -2], [1, 2], 1e-4),
        ([0, 0], [1, 2], 1e-4),
        ([], [], 1e-4),
        ([1, 2], [1, 2], 0.0),
    ],
)
def test_psi_from_counts_rejects_bad_input(
    reference: list[int], current: list[int], epsilon: float
) -> None:
    with pytest.raises(ValueError, match=r"count|epsilon|observations"):
        psi_from_counts(reference, current, epsilon)


def _theoretical_psi(edges: np.ndarray, shift: float) -> float:
    reference = np.diff(np.concatenate([[0.0], stats.norm.cdf(edges), [1.0]]))
    current = np.diff(np.concatenate([[0.0], stats.norm.cdf(edges - shift), [1.0]]))
    return psi_from_counts(reference, current)


@pytest.mark.parametrize(("shift", "floor"), [(0.0, None), (0.5, 0.1), (1.0, 0.25)])
def test_psi_of_normal_samples_tracks_the_binned_theoretical_value(
    shift: float, floor: float | None
) -> None:
    generator = rng()
    reference = generator.normal(0.0, 1.0, 20_000)
    current = generator.normal(shift, 1.0, 20_000)
    value = psi(reference, current)
    if floor is None:
        assert value < 0.02
    else:
        assert value > floor
    assert value == pytest.approx(_theoretical_psi(quantile_edges(reference), shift), abs=0.03)


# Kolmogorov distribution and KS


def test_kolmogorov_sf_matches_scipy() -> None:
    grid = np.concatenate([np.linspace(0.005, 0.3, 60), np.linspace(0.3, 3.0, 271), [4.0, 6.0]])
    ours = np.array([kolmogorov_sf(float(x)) for x in grid])
    np.testing.assert_allclose(ours, special.kolmogorov(grid), rtol=1e-10, atol=0)
    np.testing.assert_allclose(ours, stats.kstwobign.sf(grid), rtol=1e-10, atol=0)
    assert np.all(np.diff(ours) <= 0)


def test_kolmogorov_sf_edges() -> None:
    assert kolmogorov_sf(0.0) == 1.0
    assert kolmogorov_sf(-1.0) == 1.0
    assert kolmogorov_sf(0.1) == pytest.approx(1.0, abs=1e-15)
    assert kolmogorov_sf(40.0) == 0.0
    with pytest.raises(ValueError, match="NaN"):
        kolmogorov_sf(math.nan)


def _asymptotic_pvalue(statistic: float, n: int, m: int) -> float:
    return float(stats.kstwobign.sf(statistic * math.sqrt(n * m / (n + m))))


def _ks_samples() -> list[tuple[str, np.ndarray, np.ndarray]]:
    generator = rng(11)
    return [
        ("same normal", generator.normal(size=2_000), generator.normal(size=1_500)),
        ("shifted normal", generator.normal(size=2_000), generator.normal(0.5, 1.0, 2_500)),
        ("slightly shifted", generator.normal(size=400), generator.normal(0.15, 1.0, 300)),
        ("wider", generator.normal(size=1_000), generator.normal(0.0, 1.5, 1_000)),
        ("tied poisson", generator.poisson(3.0, 800).astype(float), generator.poisson(3.3, 600)),
        ("tied binary", generator.integers(0, 2, 500).astype(float), generator.integers(0, 2, 90)),
        ("tiny", np.array([1.0, 2.0, 2.0]), np.array([2.0, 3.0])),
    ]


@pytest.mark.parametrize(("name", "a", "b"), _ks_samples(), ids=[s[0] for s in _ks_samples()])
def test_ks_two_sample_matches_scipy(name: str, a: np.ndarray, b: np.ndarray) -> None:
    result = ks_two_sample(a, b)
    reference = stats.ks_2samp(a, b, method="asymp")
    assert result.statistic == pytest.approx(float(reference.statistic), abs=1e-12)
    # The p-value is the Kolmogorov limit law; SciPy's "asymp" uses the finite-n law at
    # round(n*m/(n+m)), so the exact comparison is with kstwobign and the SciPy one is loose.
    assert result.pvalue == pytest.approx(
        _asymptotic_pvalue(result.statistic, len(a), len(b)), rel=1e-9, abs=1e-300
    )
    if min(len(a), len(b)) >= 50:  # below that SciPy's finite-n law is far from the limit
        assert result.pvalue == pytest.approx(float(reference.pvalue), rel=0.35, abs=1e-9)
    assert ks_two_sample(b, a) == result


def test_ks_two_sample_separates_same_from_shifted_distributions() -> None:
    generator = rng(5)
    same = ks_two_sample(generator.normal(size=5_000), generator.normal(size=5_000))
    shifted = ks_two_sample(generator.normal(size=5_000), generator.normal(0.3, 1.0, 5_000))
    assert same.pvalue > 0.01
    assert shifted.pvalue < 1e-20
    assert shifted.statistic == pytest.approx(
        stats.norm.cdf(0.15) - stats.norm.cdf(-0.15), abs=0.03
    )


def test_ks_pvalue_agrees_with_scipy_asymp_for_large_samples() -> None:
    generator = rng(3)
    a, b = generator.normal(size=40_000), generator.normal(0.01, 1.0, 40_000)
    ours = ks_two_sample(a, b).pvalue
    assert ours == pytest.approx(float(stats.ks_2samp(a, b, method="asymp").pvalue), rel=0.02)


def test_ks_of_identical_samples() -> None:
    sample = rng().normal(size=100)
    assert ks_two_sample(sample, sample.copy()) == KsResult(0.0, 1.0)


def test_ks_rejects_empty_samples() -> None:
    with pytest.raises(ValueError, match="empty"):
        ks_two_sample([], [1.0])


def test_ks_from_counts_equals_raw_ks_when_each_value_has_its_own_bin() -> None:
    generator = rng(8)
    a = generator.poisson(4.0, 3_000).astype(float)
    b = generator.poisson(4.4, 2_000).astype(float)
    edges = np.unique(np.concatenate([a, b]))[:-1]
    binned = ks_from_counts(bin_counts(a, edges), bin_counts(b, edges))
    raw = ks_two_sample(a, b)
    assert binned.statistic == pytest.approx(raw.statistic, abs=1e-12)
    assert binned.pvalue == pytest.approx(raw.pvalue, rel=1e-9)


@pytest.mark.parametrize("bins", [2, 5, 10, 20])
def test_ks_from_counts_is_a_lower_bound_of_raw_ks(bins: int) -> None:
    generator = rng(bins)
    reference = generator.normal(size=3_000)
    current = generator.normal(0.2, 1.3, 2_000)
    edges = quantile_edges(reference, bins)
    binned = ks_from_counts(bin_counts(reference, edges), bin_counts(current, edges))
    raw = ks_two_sample(reference, current)
    assert 0.0 < binned.statistic <= raw.statistic + 1e-15
    assert binned.pvalue >= raw.pvalue


def test_ks_from_counts_of_proportional_counts_is_zero() -> None:
    assert ks_from_counts([1, 2, 3], [10, 20, 30]) == KsResult(0.0, 1.0)


def test_ks_from_counts_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="length"):
        ks_from_counts([1, 2, 3], [1, 2])


# Incomplete gamma and chi-squared


def test_regularized_gamma_q_matches_scipy_over_a_grid() -> None:
    x = np.concatenate([[0.0], np.geomspace(1e-6, 600.0, 300)])
    for dof in range(1, 51):
        a = dof / 2.0
        ours = np.array([regularized_gamma_q(a, float(v)) for v in x])
        np.testing.assert_allclose(ours, special.gammaincc(a, x), rtol=1e-8, atol=1e-300)


@pytest.mark.parametrize("a", [0.1, 3.7, 60.0, 500.0, 4_000.0])
def test_regularized_gamma_q_near_the_bulk_of_large_shapes(a: float) -> None:
    x = np.maximum(a + np.linspace(-6.0, 6.0, 49) * math.sqrt(a), 1e-3)
    ours = np.array([regularized_gamma_q(a, float(v)) for v in x])
    np.testing.assert_allclose(ours, special.gammaincc(a, x), rtol=1e-8, atol=1e-300)


def test_regularized_gamma_q_closed_forms() -> None:
    for x in (0.0, 0.3, 1.0, 2.0, 17.0):
        assert regularized_gamma_q(1.0, x) == pytest.approx(math.exp(-x), rel=1e-13)
        assert regularized_gamma_q(0.5, x) == pytest.approx(math.erfc(math.sqrt(x)), rel=1e-12)
    assert regularized_gamma_q(2.0, math.inf) == 0.0


@pytest.mark.parametrize(("a", "x"), [(0.0, 1.0), (-1.0, 1.0), (1.0, -0.5), (math.nan, 1.0)])
def test_regularized_gamma_q_rejects_its_domain_edges(a: float, x: float) -> None:
    with pytest.raises(ValueError, match="a > 0"):
        regularized_gamma_q(a, x)


def test_chi2_sf_matches_scipy_over_a_grid() -> None:
    x = np.concatenate([np.linspace(0.0, 5.0, 26), np.geomspace(5.0, 800.0, 120)])
    for dof in range(1, 51):
        ours = np.array([chi2_sf(float(v), dof) for v in x])
        np.testing.assert_allclose(ours, stats.chi2.sf(x, dof), rtol=1e-8, atol=1e-300)
    assert chi2_sf(-1.0, 3) == 1.0
    with pytest.raises(ValueError, match="dof"):
        chi2_sf(1.0, 0)


def _assert_matches_chi2_contingency(result: ChiSquaredResult, table: np.ndarray) -> None:
    statistic, pvalue, dof, _ = stats.chi2_contingency(table, correction=False)
    assert result.dof == dof
    assert result.statistic == pytest.approx(float(statistic), rel=1e-12)
    assert result.pvalue == pytest.approx(float(pvalue), rel=1e-8, abs=1e-300)


@pytest.mark.parametrize(
    ("reference_p", "current_p"),
    [
        ([0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]),
        ([0.5, 0.3, 0.15, 0.05], [0.4, 0.3, 0.2, 0.1]),
        ([0.5, 0.3, 0.15, 0.05], [0.2, 0.3, 0.3, 0.2]),
        ([0.7, 0.3], [0.65, 0.35]),
    ],
)
def test_chi_squared_matches_scipy_on_categorical_samples(
    reference_p: list[float], current_p: list[float]
) -> None:
    generator = rng(17)
    reference = generator.multinomial(5_000, reference_p)
    current = generator.multinomial(1_200, current_p)
    result = chi_squared_from_counts(reference, current)
    _assert_matches_chi2_contingency(result, np.array([reference, current]))


def test_chi_squared_detects_a_categorical_shift() -> None:
    generator = rng(23)
    base = [0.5, 0.3, 0.15, 0.05]
    reference = generator.multinomial(5_000, base)
    same = chi_squared_from_counts(reference, generator.multinomial(2_000, base))
    shifted = chi_squared_from_counts(reference, generator.multinomial(2_000, [0.4, 0.3, 0.2, 0.1]))
    assert same.pvalue > 0.01
    assert shifted.pvalue < 1e-10


def test_chi_squared_drops_categories_empty_on_both_sides() -> None:
    reference = np.array([40, 0, 25, 10, 0])
    current = np.array([30, 0, 35, 0, 0])
    result = chi_squared_from_counts(reference, current)
    assert result.dof == 2
    _assert_matches_chi2_contingency(result, np.array([[40, 25, 10], [30, 35, 0]]))


def test_chi_squared_with_a_single_category_has_no_evidence() -> None:
    assert chi_squared_from_counts([0, 12, 0], [0, 3, 0]) == ChiSquaredResult(0.0, 0, 1.0)


def test_chi_squared_rejects_an_empty_side() -> None:
    with pytest.raises(ValueError, match="no observations"):
        chi_squared_from_counts([1, 2], [0, 0])


# Histogram quantiles


@pytest.mark.parametrize("q", [0.0, 0.01, 0.04, 0.1, 0.25, 0.5, 0.73, 0.9, 0.99, 0.999, 1.0])
def test_counts_quantile_is_within_one_bin_of_the_sample_quantile(q: float) -> None:
    values = rng().uniform(0.0, 1.0, 50_000)
    edges = np.linspace(0.0, 1.0, 21)[1:-1]
    width = 0.05
    estimate = counts_quantile(edges, bin_counts(values, edges), q)
    assert abs(estimate - float(np.quantile(values, q))) <= width


def test_counts_quantile_interpolates_inside_a_bin() -> None:
    edges = [10.0, 20.0, 30.0]
    counts = [0, 4, 4, 2]  # ranks 0..4 in (10, 20], 4..8 in (20, 30], 8..10 above 30
    assert counts_quantile(edges, counts, 0.1) == pytest.approx(12.5)
    assert counts_quantile(edges, counts, 0.4) == pytest.approx(20.0)
    assert counts_quantile(edges, counts, 0.6) == pytest.approx(25.0)
    assert counts_quantile(edges, counts, 0.0) == pytest.approx(10.0)
    # Ranks beyond the last edge report that edge: a lower bound, not an estimate.
    assert counts_quantile(edges, counts, 0.99) == 30.0


def test_counts_quantile_in_the_lowest_bin_reports_the_first_edge() -> None:
    assert counts_quantile([1.0, 2.0], [5, 5, 0], 0.2) == 1.0


@pytest.mark.parametrize(
    ("edges", "counts", "q", "match"),
    [
        ([], [3], 0.5, "edge"),
        ([1.0, 2.0], [1, 1], 0.5, "bins"),
        ([1.0, 2.0], [0, 0, 0], 0.5, "no observations"),
        ([2.0, 1.0], [1, 1, 1], 0.5, "increasing"),
        ([1.0, 2.0], [1, 1, 1], 1.5, "q must"),
        ([1.0, 2.0], [1, 1, 1], math.nan, "q must"),
    ],
)
def test_counts_quantile_rejects_bad_input(
    edges: list[float], counts: list[int], q: float, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        counts_quantile(edges, counts, q)


# Quality metrics


def test_binary_log_loss_matches_a_hand_computed_value() -> None:
    labels = [1, 0, 1, 0]
    probabilities = [0.9, 0.1, 0.8, 0.3]
    expected = -(math.log(0.9) + math.log(0.9) + math.log(0.8) + math.log(0.7)) / 4
    assert binary_log_loss(labels, probabilities) == pytest.approx(expected, rel=1e-12)


def test_binary_log_loss_clips_confident_mistakes() -> None:
    assert binary_log_loss([1, 0], [0.0, 1.0]) == pytest.approx(-math.log(1e-12), rel=1e-9)
    assert binary_log_loss([1, 0], [0.0, 1.0], clip=1e-3) == pytest.approx(-math.log(1e-3))
    assert binary_log_loss([1, 0], [1.0, 0.0]) == pytest.approx(0.0, abs=1e-11)
    assert binary_log_loss([True, False], [0.5, 0.5]) == pytest.approx(math.log(2.0))


def test_accuracy_counts_the_threshold_as_positive() -> None:
    labels = [1, 0, 1, 0, 1]
    probabilities = [0.5, 0.49, 0.2, 0.8, 0.99]
    assert accuracy(labels, probabilities) == pytest.approx(3 / 5)
    assert accuracy(labels, probabilities, threshold=0.1) == pytest.approx(3 / 5)
    assert accuracy(labels, probabilities, threshold=0.9) == pytest.approx(3 / 5)
    assert accuracy([0, 1], [0.3, 0.7]) == 1.0


@pytest.mark.parametrize(
    ("labels", "probabilities", "match"),
    [
        ([0, 2], [0.1, 0.2], "labels"),
        ([0, 1], [0.1, 1.2], "probabilities"),
        ([0, 1, 1], [0.1, 0.2], "labels but"),
        ([], [], "empty"),
    ],
)
def test_quality_metrics_reject_bad_input(
    labels: list[int], probabilities: list[float], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        binary_log_loss(labels, probabilities)
    with pytest.raises(ValueError, match=match):
        accuracy(labels, probabilities)


def test_binary_log_loss_rejects_a_bad_clip() -> None:
    with pytest.raises(ValueError, match="clip"):
        binary_log_loss([1], [0.5], clip=0.0)
