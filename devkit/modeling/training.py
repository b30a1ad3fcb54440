"""Train the demo model's two versions into the Triton model repository.

Version 1 is trained on the reference distribution. Version 2 is the plausible regression: it
was trained on an extract taken after an upstream interface started delivering amounts in cents,
so on real (EUR) traffic its amount feature sits far below anything it saw, and its scores
shift and lose discrimination. Both are evaluated on the same reference hold-out, and the
figures go beside the weights in ``metrics.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from devkit.modeling.invoices import FEATURES, Shift, generate
from devkit.modeling.logistic import LinearModel, train, write_npz
from devkit.modeling.metrics import (
    calibration_table,
    expected_calibration_error,
    log_loss,
    roc_auc,
)
from workers.monitor.references import REFERENCE_SAMPLE

DEMO_MODEL = "invoice_risk"
VERSIONS: dict[str, Shift | None] = {"1": None, "2": "amount_cents"}
"""Version -> the distribution shift of its training extract."""
REFERENCE_VERSION = "1"
"""Reference-distribution invoices the drift monitor compares live traffic against."""
REFERENCE_SAMPLE_ROWS = 5_000
L2 = 1.0
LOG_FEATURES = ("amount_eur", "vendor_tenure_days")
"""Heavy-tailed inputs the model takes as ``log1p``."""


def _evaluate(model: LinearModel, seed: int, rows: int) -> dict[str, Any]:
    holdout = generate(rows, seed=seed + 1_000)
    probability = model.predict_proba(holdout.x)
    return {
        "auc": roc_auc(holdout.y, probability),
        "log_loss": log_loss(holdout.y, probability),
        "ece": expected_calibration_error(holdout.y, probability),
        "mean_predicted": float(probability.mean()),
        "observed_rate": float(holdout.y.mean()),
        "evaluated_on": f"{rows} reference invoices (seed {seed + 1_000})",
        "calibration": [vars(b) for b in calibration_table(holdout.y, probability)],
    }


def train_versions(out_dir: Path, seed: int = 7, n: int = 50_000) -> dict[str, dict[str, Any]]:
    """Write ``<out_dir>/<version>/weights.npz`` and ``metrics.json`` for every version, and
    the reference sample; return each version's metrics. Deterministic for a given seed."""
    figures: dict[str, dict[str, Any]] = {}
    models: dict[str, LinearModel] = {}
    for offset, (version, shift) in enumerate(VERSIONS.items()):
        data = generate(n, seed=seed + offset, shift=shift)
        model = models[version] = train(data.x, data.y, FEATURES, LOG_FEATURES, l2=L2)
        model.save(out_dir / version / "weights.npz")
        metrics = {
            "model": DEMO_MODEL,
            "version": version,
            "seed": seed,
            "training_rows": n,
            "training_shift": shift or "none (reference distribution)",
            "positive_rate": float(data.y.mean()),
            **_evaluate(model, seed, max(n // 2, 1_000)),
        }
        (out_dir / version / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        figures[version] = metrics
    reference = generate(REFERENCE_SAMPLE_ROWS, seed=seed + 2_000)
    write_npz(
        out_dir / REFERENCE_SAMPLE,
        {
            "x": reference.x,
            "y": reference.y,
            # What a healthy model predicts on reference traffic: the monitor's score baseline.
            "scores": models[REFERENCE_VERSION].predict_proba(reference.x),
            "feature_names": list(FEATURES),
        },
    )
    return figures


def is_trained(model_dir: Path) -> bool:
    """Weights for every version and a reference sample with the monitor's score baseline."""
    sample = model_dir / REFERENCE_SAMPLE
    if not sample.is_file() or not all(
        (model_dir / version / "weights.npz").is_file() for version in VERSIONS
    ):
        return False
    with np.load(sample, allow_pickle=False) as arrays:
        return "scores" in arrays.files


def ensure_trained(model_repository: Path, progress: Callable[[str], None]) -> None:
    """Train the demo model unless its weights are already in the repository."""
    model_dir = model_repository / DEMO_MODEL
    if is_trained(model_dir):
        return
    progress(f"training {DEMO_MODEL} v1 and v2 into {model_dir} (seeded, a few seconds)")
    figures = train_versions(model_dir)
    summary = ", ".join(
        f"v{v} AUC {m['auc']:.3f} log-loss {m['log_loss']:.3f} ECE {m['ece']:.3f}"
        for v, m in figures.items()
    )
    progress(f"trained {DEMO_MODEL}: {summary} on reference data")
