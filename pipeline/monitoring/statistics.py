"""Drift and quality statistics for the monitor, written against numpy alone.

Window state is a histogram. The monitor keeps tumbling windows whose state lives in Kafka
changelog topics, so it has to be small and mergeable: adding two windows' states must give
the state of their union. Raw samples fail both tests. A numeric feature is therefore summarised
as counts over fixed bin edges, cut once at quantiles of a reference sample
(:func:`quantile_edges`, :func:`bin_counts`), and a categorical feature as counts per category.
Counts add up, and every ``*_from_counts`` statistic here reads only counts, so a window's
verdict never needs its raw values back.

Bins are right-closed: with interior edges ``e0 < e1 < ... < e_last`` they are
``(-inf, e0], (e0, e1], ..., (e_last, +inf)``, so ``len(edges) + 1`` bins in all and a value
equal to an edge falls in the lower bin.

PSI floors proportions at ``epsilon``. The population stability index is
``sum((c - r) * ln(c / r))`` over the bins' reference and current proportions. A bin empty on
one side makes its term infinite, and an infinite index says no more than a large one while
breaking every threshold comparison and mean taken downstream. Flooring both proportions at a
small ``epsilon`` keeps the term finite and still large: a bin holding 10% of one side and none
of the other adds ``0.1 * ln(0.1 / 1e-4) ~ 0.69``, far above the usual 0.25 "major shift"
line. Each term stays non-negative after flooring, so the index is still 0 exactly when the
proportions agree.

KS on bins is a lower bound. The two-sample Kolmogorov-Smirnov statistic is the largest gap
between the two empirical CDFs. From counts the CDFs are known only at the bin edges, where
they agree with the raw-sample CDFs exactly; the gap between edges is invisible. So
:func:`ks_from_counts` never exceeds the raw statistic and equals it when each distinct value
has its own bin, which is the case for discrete features with an edge at every value.

P-values are asymptotic. The KS p-value is the Kolmogorov limit distribution (that of
``sqrt(n) * D``) at ``D * sqrt(n * m / (n + m))``. SciPy's ``ks_2samp(method="asymp")``
instead uses the finite-``n`` one-sample distribution at ``n = round(n * m / (n + m))``. The
two differ by a few percent at moderate sizes, and the limit form gives slightly larger
(more conservative) p-values. The chi-squared p-value comes from the regularised upper
incomplete gamma function, computed by its power series or continued fraction.

Missing values are the caller's business. A NaN has no place in an ordering or a bin, so every
function given raw values rejects NaN with ``ValueError``; callers drop missing values first
(and may count them as a quality metric of their own). Infinite values are ordered like any
other and land in the outer bins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.float64]
Counts = npt.NDArray[np.int64]

# Loop bounds for the series below. Each converges long before its bound for the arguments the
# monitor produces; the bound only turns a pathological input into an error instead of a hang.
_MAX_TERMS = 100_000
# Below this argument the Kolmogorov tail series alternates through many terms of similar size,
# so the CDF's theta-function form, which converges fast there, is used instead.
_KOLMOGOROV_SWITCH = 1.0
# Lentz's continued-fraction method replaces an exact zero divisor with this, so the recurrence
# can go on instead of dividing by zero.
_TINY = 1e-300


@dataclass(frozen=True)
class KsResult:
    statistic: float
    """The largest gap between the two empirical CDFs, in ``[0, 1]``."""
    pvalue: float
    """Asymptotic two-sided p-value (Kolmogorov limit distribution)."""


@dataclass(frozen=True)
class ChiSquaredResult:
    statistic: float
    dof: int
    """Degrees of freedom: the number of categories seen on either side, minus one."""
    pvalue: float


def _sample(values: npt.ArrayLike, name: str, *, allow_empty: bool = False) -> Floats:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if not allow_empty and array.size == 0:
        raise ValueError(f"{name} is empty")
    if np.isnan(array).any():
        raise ValueError(f"{name} contains NaN; drop missing values before computing statistics")
    return array


def _counts(values: npt.ArrayLike, name: str) -> Floats:
    # Float, not int: the same functions take expected proportions as well as observed counts.
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty one-dimensional array of counts")
    if not np.isfinite(array).all() or (array < 0).any():
        raise ValueError(f"{name} must hold finite, non-negative counts")
    if array.sum() <= 0:
        raise ValueError(f"{name} has no observations")
    return array


def _count_pair(
    reference_counts: npt.ArrayLike, current_counts: npt.ArrayLike
) -> tuple[Floats, Floats]:
    reference = _counts(reference_counts, "reference_counts")
    current = _counts(current_counts, "current_counts")
    if reference.shape != current.shape:
        raise ValueError(
            f"count vectors differ in length: {reference.size} reference vs {current.size} current"
        )
    return reference, current


def quantile_edges(reference: npt.ArrayLike, bins: int = 10) -> Floats:
    """Interior bin edges at the reference sample's quantiles ``1/bins, ..., (bins-1)/bins``.

    Edges are observed values (inverted-CDF quantiles), sorted and unique, so ties merge bins
    rather than produce empty ones: a 0/1 feature gets the single edge ``0``, and a constant
    feature no edge (one bin). An edge at the reference maximum is dropped because the bin above
    it would hold no reference value. There are therefore at most ``bins - 1`` edges.
    """
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    sample = _sample(reference, "reference")
    if not np.isfinite(sample).all():
        raise ValueError("reference must be finite: its quantiles become the bin edges")
    levels = np.arange(1, bins, dtype=np.float64) / bins
    cuts = np.unique(np.quantile(sample, levels, method="inverted_cdf"))
    return np.asarray(cuts[cuts < sample.max()], dtype=np.float64)


def bin_counts(values: npt.ArrayLike, edges: npt.ArrayLike) -> Counts:
    """Counts of ``values`` in the ``len(edges) + 1`` bins ``(-inf, e0], ..., (e_last, +inf)``.

    An empty ``values`` gives all-zero counts, so an empty window still has a state.
    """
    cuts = np.asarray(edges, dtype=np.float64)
    if cuts.ndim != 1 or not np.isfinite(cuts).all() or (np.diff(cuts) <= 0).any():
        raise ValueError("edges must be a one-dimensional, finite, strictly increasing array")
    sample = _sample(values, "values", allow_empty=True)
    # side="left" returns the number of edges strictly below each value, which is the index of
    # its right-closed bin: a value equal to an edge stays in the bin that edge closes.
    index = np.searchsorted(cuts, sample, side="left")
    return np.bincount(index, minlength=cuts.size + 1).astype(np.int64)


def psi_from_counts(
    reference_counts: npt.ArrayLike, current_counts: npt.ArrayLike, epsilon: float = 1e-4
) -> float:
    """Population stability index ``sum((c - r) * ln(c / r))`` over the bins' proportions.

    Proportions are floored at ``epsilon`` so a bin empty on one side adds a large finite term
    instead of an infinite one (see the module docstring). The result is non-negative,
    symmetric in its two arguments, and 0 when the proportions are the same.
    """
    if not epsilon > 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    reference, current = _count_pair(reference_counts, current_counts)
    r = np.maximum(reference / reference.sum(), epsilon)
    c = np.maximum(current / current.sum(), epsilon)
    return float(np.sum((c - r) * np.log(c / r)))


def psi(reference: npt.ArrayLike, current: npt.ArrayLike, bins: int = 10) -> float:
    """PSI of two raw samples over ``quantile_edges(reference, bins)``."""
    edges = quantile_edges(reference, bins)
    return psi_from_counts(bin_counts(reference, edges), bin_counts(current, edges))


def kolmogorov_sf(x: float) -> float:
    """``P(K > x)`` for the Kolmogorov distribution, the limit law of ``sqrt(n) * D_n``.

    For ``x >= 1`` the tail series ``2 * sum_{k>=1} (-1)^(k-1) exp(-2 k^2 x^2)``; below that,
    one minus the CDF series ``sqrt(2 pi) / x * sum_{k>=1} exp(-(2k-1)^2 pi^2 / (8 x^2))``,
    which converges fast where the tail series does not. 1 for ``x <= 0``.
    """
    if math.isnan(x):
        raise ValueError("x is NaN")
    if x <= 0:
        return 1.0
    total = 0.0
    if x < _KOLMOGOROV_SWITCH:
        scale = -(math.pi**2) / (8.0 * x * x)
        for k in range(1, _MAX_TERMS):
            term = math.exp(scale * (2 * k - 1) ** 2)
            total += term
            if term <= 1e-17 * total or term == 0.0:
                break
        cdf = math.sqrt(2.0 * math.pi) / x * total
        return min(1.0, max(0.0, 1.0 - cdf))
    for k in range(1, _MAX_TERMS):
        term = math.exp(-2.0 * k * k * x * x)
        total += term if k % 2 == 1 else -term
        if term <= 1e-17 * total or term == 0.0:
            break
    return min(1.0, max(0.0, 2.0 * total))


def _ks_pvalue(statistic: float, n: float, m: float) -> float:
    return kolmogorov_sf(statistic * math.sqrt(n * m / (n + m)))


def ks_two_sample(a: npt.ArrayLike, b: npt.ArrayLike) -> KsResult:
    """Two-sample KS test on raw samples: the exact statistic, the asymptotic p-value.

    Both empirical CDFs are evaluated at every pooled value (right-continuous, so ties are
    counted at once), which is where their gap can peak.
    """
    first = np.sort(_sample(a, "a"))
    second = np.sort(_sample(b, "b"))
    pooled = np.concatenate([first, second])
    cdf_first = np.searchsorted(first, pooled, side="right") / first.size
    cdf_second = np.searchsorted(second, pooled, side="right") / second.size
    statistic = float(np.max(np.abs(cdf_first - cdf_second)))
    return KsResult(statistic, _ks_pvalue(statistic, first.size, second.size))


def ks_from_counts(reference_counts: npt.ArrayLike, current_counts: npt.ArrayLike) -> KsResult:
    """Two-sample KS test on counts over the same bins (or the same ordered categories).

    The CDFs are compared at the bin edges only, so the statistic is a lower bound of the
    raw-sample one, equal to it when each distinct value has its own bin. The p-value uses the
    total counts as sample sizes.
    """
    reference, current = _count_pair(reference_counts, current_counts)
    n = float(reference.sum())
    m = float(current.sum())
    gaps = np.abs(np.cumsum(reference) / n - np.cumsum(current) / m)
    statistic = float(np.max(gaps))
    return KsResult(statistic, _ks_pvalue(statistic, n, m))


def _lower_gamma_series(a: float, x: float) -> float:
    """``P(a, x)`` from ``gamma(a, x) = x^a e^-x sum_{n>=0} x^n / (a (a+1) ... (a+n))``."""
    term = 1.0 / a
    total = term
    denominator = a
    for _ in range(_MAX_TERMS):
        denominator += 1.0
        term *= x / denominator
        total += term
        if abs(term) < abs(total) * 1e-16:
            return total * math.exp(a * math.log(x) - x - math.lgamma(a))
    raise ArithmeticError(f"incomplete gamma series did not converge for a={a}, x={x}")


def _upper_gamma_fraction(a: float, x: float) -> float:
    """``Q(a, x)`` from the continued fraction for ``Gamma(a, x) e^x x^-a``:
    ``1 / (x + 1 - a - 1(1 - a) / (x + 3 - a - 2(2 - a) / (x + 5 - a - ...)))``,
    evaluated front to back with the modified Lentz method."""
    b = x + 1.0 - a
    c = 1.0 / _TINY
    # b >= 2 here: the fraction is only used for x >= a + 1.
    d = 1.0 / b
    value = d
    for i in range(1, _MAX_TERMS):
        partial = -i * (i - a)
        b += 2.0
        d = partial * d + b
        if abs(d) < _TINY:
            d = _TINY
        c = b + partial / c
        if abs(c) < _TINY:
            c = _TINY
        d = 1.0 / d
        step = c * d
        value *= step
        if abs(step - 1.0) < 1e-16:
            return value * math.exp(a * math.log(x) - x - math.lgamma(a))
    raise ArithmeticError(f"incomplete gamma continued fraction did not converge for a={a}, x={x}")


def regularized_gamma_q(a: float, x: float) -> float:
    """Upper regularised incomplete gamma ``Q(a, x) = Gamma(a, x) / Gamma(a)``, ``a > 0, x >= 0``.

    Below ``x = a + 1`` the power series for ``P = 1 - Q`` converges fast and ``Q`` is not small,
    so ``1 - P`` loses nothing; above it the continued fraction gives ``Q`` directly, keeping
    full relative precision deep in the tail.
    """
    if math.isnan(a) or math.isnan(x) or a <= 0 or x < 0:
        raise ValueError(f"regularized_gamma_q needs a > 0 and x >= 0, got a={a}, x={x}")
    if x == 0:
        return 1.0
    if math.isinf(x):
        return 0.0
    if x < a + 1.0:
        return min(1.0, max(0.0, 1.0 - _lower_gamma_series(a, x)))
    return min(1.0, max(0.0, _upper_gamma_fraction(a, x)))


def chi2_sf(x: float, dof: float) -> float:
    """``P(X > x)`` for a chi-squared variable with ``dof > 0`` degrees of freedom."""
    if math.isnan(x) or math.isnan(dof) or dof <= 0:
        raise ValueError(f"chi2_sf needs dof > 0 and x not NaN, got x={x}, dof={dof}")
    if x <= 0:
        return 1.0
    return regularized_gamma_q(dof / 2.0, x / 2.0)


def chi_squared_from_counts(
    reference_counts: npt.ArrayLike, current_counts: npt.ArrayLike
) -> ChiSquaredResult:
    """Pearson's chi-squared homogeneity test on the 2 x k table of category counts.

    No continuity correction. Categories empty on both sides are dropped (their expected count
    is 0 and they carry no evidence); if fewer than two remain, the sides cannot differ and the
    result is ``statistic=0, dof=0, pvalue=1``.
    """
    reference, current = _count_pair(reference_counts, current_counts)
    table = np.stack([reference, current])
    table = table[:, table.sum(axis=0) > 0]
    dof = table.shape[1] - 1
    if dof == 0:
        return ChiSquaredResult(0.0, 0, 1.0)
    expected = np.outer(table.sum(axis=1), table.sum(axis=0)) / table.sum()
    statistic = float(np.sum((table - expected) ** 2 / expected))
    return ChiSquaredResult(statistic, dof, chi2_sf(statistic, dof))


def counts_quantile(edges: npt.ArrayLike, counts: npt.ArrayLike, q: float) -> float:
    """Approximate ``q``-quantile of the data behind a histogram over ``edges``.

    The target rank ``q * total`` is located in the cumulative counts and interpolated linearly
    inside its bin, treating the bin's values as evenly spread. The two outer bins are unbounded,
    so a quantile landing there is reported as the nearest edge: the answer is then a bound
    (at most ``edges[0]``, at least ``edges[-1]``), not an estimate.
    """
    cuts = np.asarray(edges, dtype=np.float64)
    if cuts.ndim != 1 or cuts.size == 0:
        raise ValueError("counts_quantile needs at least one edge")
    if not np.isfinite(cuts).all() or (np.diff(cuts) <= 0).any():
        raise ValueError("edges must be finite and strictly increasing")
    if math.isnan(q) or not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    weights = _counts(counts, "counts")
    if weights.size != cuts.size + 1:
        raise ValueError(f"{cuts.size} edges make {cuts.size + 1} bins, got {weights.size} counts")
    cumulative = np.cumsum(weights)
    target = q * cumulative[-1]
    # The first bin whose cumulative count reaches the target; for q = 0 that could be an empty
    # leading bin, so the first non-empty bin is the floor.
    first_filled = int(np.flatnonzero(weights > 0)[0])
    index = max(int(np.searchsorted(cumulative, target, side="left")), first_filled)
    if index == 0:
        return float(cuts[0])
    if index == cuts.size:
        return float(cuts[-1])
    below = cumulative[index - 1]
    fraction = min(1.0, max(0.0, (target - below) / weights[index]))
    return float(cuts[index - 1] + fraction * (cuts[index] - cuts[index - 1]))


def _labels_and_probabilities(
    labels: npt.ArrayLike, probabilities: npt.ArrayLike
) -> tuple[Floats, Floats]:
    y = _sample(labels, "labels")
    p = _sample(probabilities, "probabilities")
    if y.shape != p.shape:
        raise ValueError(f"{y.size} labels but {p.size} probabilities")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    if ((p < 0) | (p > 1)).any():
        raise ValueError("probabilities must lie in [0, 1]")
    return y, p


def binary_log_loss(
    labels: npt.ArrayLike, probabilities: npt.ArrayLike, clip: float = 1e-12
) -> float:
    """Mean ``-ln(probability given to the true class)``, i.e. ``-(y ln p + (1 - y) ln(1 - p))``.

    That probability is floored at ``clip``, so a confidently wrong prediction costs exactly
    ``-ln(clip)`` (about 27.6) rather than infinity.
    """
    if not 0 < clip < 0.5:
        raise ValueError(f"clip must be in (0, 0.5), got {clip}")
    y, p = _labels_and_probabilities(labels, probabilities)
    # Flooring the true class's probability, rather than clipping p to [clip, 1 - clip], keeps
    # the cost of a mistake symmetric: 1 - clip is not exact in floating point.
    truth = np.where(y == 1.0, p, 1.0 - p)
    return float(-np.mean(np.log(np.maximum(truth, clip))))


def accuracy(labels: npt.ArrayLike, probabilities: npt.ArrayLike, threshold: float = 0.5) -> float:
    """Share of predictions whose class, positive when ``p >= threshold``, matches the label."""
    y, p = _labels_and_probabilities(labels, probabilities)
    predicted = (p >= threshold).astype(np.float64)
    return float(np.mean(predicted == y))
