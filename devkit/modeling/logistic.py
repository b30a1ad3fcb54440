"""L2-regularised logistic regression fitted by Newton's method, with exact attributions.

Heavy-tailed inputs (amounts, tenures) enter as ``log1p``; every input is then standardised
with the training mean and standard deviation: ``z_i = (phi_i(x_i) - mean_i) / scale_i`` and
``logit = coef . z + intercept``. Being linear in ``z``, the model has exact attributions
against a baseline invoice whose transformed features are the training means:
``coef_i * (phi_i(x_i) - phi_i(baseline_i)) / scale_i``. They add up to
``logit(x) - logit(baseline)`` with no approximation, and ``logit(baseline) = intercept``.

Newton's method on eight features converges in a handful of iterations and, unlike stochastic
gradient descent, has no sampling: the same data always gives bit-identical weights.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.float64]

_FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class LinearModel:
    feature_names: tuple[str, ...]
    log_features: npt.NDArray[np.bool_]
    """Which inputs enter as ``log1p(max(x, 0))``."""
    mean: Floats
    scale: Floats
    coef: Floats
    intercept: float
    baseline: Floats
    """The input that attributions are measured from: the invoice whose transformed features
    are the training means (a geometric mean for logged features)."""

    def transform(self, x: Floats) -> Floats:
        result = np.array(x, dtype=np.float64, copy=True)
        result[..., self.log_features] = np.log1p(np.maximum(result[..., self.log_features], 0.0))
        return result

    def logit(self, x: Floats) -> Floats:
        result: Floats = ((self.transform(x) - self.mean) / self.scale) @ self.coef
        return result + self.intercept

    def predict_proba(self, x: Floats) -> Floats:
        result: Floats = 1.0 / (1.0 + np.exp(-self.logit(x)))
        return result

    def attributions(self, x: Floats) -> Floats:
        """Per-feature contributions; each row sums to ``logit(x) - logit(baseline)``."""
        gap = self.transform(x) - self.transform(self.baseline)
        result: Floats = self.coef * gap / self.scale
        return result

    def save(self, path: Path) -> None:
        """Write an ``.npz`` that is byte-identical for identical weights (no zip timestamps)."""
        arrays = {
            "log_features": self.log_features,
            "mean": self.mean,
            "scale": self.scale,
            "coef": self.coef,
            "intercept": np.array(self.intercept),
            "baseline": self.baseline,
            "feature_names": np.array(self.feature_names),
        }
        write_npz(path, arrays)

    @classmethod
    def load(cls, path: Path) -> LinearModel:
        with np.load(path, allow_pickle=False) as weights:
            return cls(
                feature_names=tuple(str(name) for name in weights["feature_names"]),
                log_features=weights["log_features"].astype(bool),
                mean=weights["mean"].astype(np.float64),
                scale=weights["scale"].astype(np.float64),
                coef=weights["coef"].astype(np.float64),
                intercept=float(weights["intercept"]),
                baseline=weights["baseline"].astype(np.float64),
            )


def write_npz(path: Path, arrays: Mapping[str, npt.ArrayLike]) -> None:
    """Like ``np.savez``, but byte-identical for identical arrays (fixed zip timestamps)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", _FIXED_ZIP_TIME), buffer.getvalue())


def train(
    x: Floats,
    y: npt.NDArray[np.int64],
    feature_names: Sequence[str],
    log_features: Sequence[str] = (),
    *,
    l2: float = 1.0,
    iterations: int = 25,
    tolerance: float = 1e-10,
) -> LinearModel:
    """Fit by Newton's method (iteratively reweighted least squares); the intercept is not
    penalised. Stops when no weight moves by more than ``tolerance``."""
    if x.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[1] != len(feature_names):
        raise ValueError(f"x {x.shape} does not fit y {y.shape} and {len(feature_names)} names")
    unknown = set(log_features) - set(feature_names)
    if unknown:
        raise ValueError(f"log_features {sorted(unknown)} are not features")
    logged = np.array([name in log_features for name in feature_names])
    transformed = x.astype(np.float64, copy=True)
    transformed[:, logged] = np.log1p(np.maximum(transformed[:, logged], 0.0))
    mean = transformed.mean(axis=0)
    scale = transformed.std(axis=0)
    scale = np.where(scale > 0.0, scale, 1.0)
    design = np.column_stack([np.ones(len(x)), (transformed - mean) / scale])
    penalty = np.full(design.shape[1], l2)
    penalty[0] = 0.0
    weights = np.zeros(design.shape[1])
    target = y.astype(np.float64)
    for _ in range(iterations):
        probability = 1.0 / (1.0 + np.exp(-(design @ weights)))
        gradient = design.T @ (probability - target) + penalty * weights
        curvature = probability * (1.0 - probability)
        hessian = (design * curvature[:, None]).T @ design + np.diag(penalty)
        step = np.linalg.solve(hessian, gradient)
        weights = weights - step
        if np.max(np.abs(step)) < tolerance:
            break
    baseline = mean.copy()
    baseline[logged] = np.expm1(mean[logged])
    return LinearModel(
        feature_names=tuple(feature_names),
        log_features=logged,
        mean=mean,
        scale=scale,
        coef=weights[1:],
        intercept=float(weights[0]),
        baseline=baseline,
    )
