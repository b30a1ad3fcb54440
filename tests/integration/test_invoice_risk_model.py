"""The trained demo model in the real Triton: scores, faithful attributions, two versions."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pytest

from devkit.modeling.invoices import generate
from devkit.modeling.logistic import LinearModel
from devkit.modeling.training import DEMO_MODEL
from devkit.settings import load_local_settings
from devkit.stack.services import resolve
from pipeline.backends import BackendError, RowInput, RowOutput
from pipeline.backends.triton import TritonBackend
from pipeline.settings import Settings
from tests.integration.endpoints import Endpoints

SAMPLE_ROWS = 200


def _served(
    settings: Settings,
    version: str,
    rows: Sequence[RowInput],
    protocol: Literal["grpc", "http"] = "grpc",
) -> list[RowOutput]:
    triton = settings.backends.triton

    async def run() -> list[RowOutput | BackendError]:
        backend = TritonBackend(
            triton.grpc_url if protocol == "grpc" else triton.http_url,
            protocol,
            explaining_models=[DEMO_MODEL],
        )
        try:
            return await backend.infer(DEMO_MODEL, version, rows)
        finally:
            await backend.close()

    outputs = asyncio.run(run())
    assert all(isinstance(output, RowOutput) for output in outputs), outputs
    return [output for output in outputs if isinstance(output, RowOutput)]


def _weights(version: str) -> LinearModel:
    folder = resolve(load_local_settings().stack.model_repository) / DEMO_MODEL / version
    return LinearModel.load(folder / "weights.npz")


def _sample(explain: bool) -> tuple[np.ndarray, list[RowInput]]:
    x = generate(SAMPLE_ROWS, seed=99).x.astype(np.float32)
    # Requests of one, two and three rows, as the worker's stacking produces them.
    rows, start = [], 0
    for size in [1, 2, 3] * (SAMPLE_ROWS // 6) + [1, 1]:
        rows.append(RowInput(tensors={"x": x[start : start + size]}, explain=explain))
        start += size
    assert start == SAMPLE_ROWS
    return x, rows


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_attributions_are_complete_and_scores_match_the_trained_weights(
    settings: Settings, protocol: Literal["grpc", "http"]
) -> None:
    x, rows = _sample(explain=True)
    outputs = _served(settings, "1", rows, protocol)
    score = np.concatenate([o.tensors["score"] for o in outputs]).reshape(-1)
    attributions = np.concatenate([o.tensors["attributions"] for o in outputs])
    model = _weights("1")
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(score, model.predict_proba(x64), atol=1e-5)
    # Completeness: the attributions add up to the logit's distance from the baseline's.
    baseline_logit = model.logit(model.baseline.reshape(1, -1))[0]
    np.testing.assert_allclose(
        attributions.sum(axis=1), model.logit(x64) - baseline_logit, atol=1e-3
    )
    assert attributions.shape == (SAMPLE_ROWS, len(model.feature_names))


def _attribution_rows(endpoints: Endpoints, version: str) -> int:
    """The model's own counter of rows it computed attributions for, from Triton's metrics."""
    with urllib.request.urlopen(f"http://{endpoints.triton_metrics}/metrics", timeout=10) as page:
        text = page.read().decode()
    pattern = (
        rf'^sluiceway_attribution_rows\{{(?=[^}}]*model="{DEMO_MODEL}")'
        rf'(?=[^}}]*version="{version}")[^}}]*\}} (\S+)$'
    )
    found = re.search(pattern, text, re.MULTILINE)
    return int(float(found.group(1))) if found else 0


def test_attributions_are_computed_only_for_the_rows_that_ask(
    settings: Settings, endpoints: Endpoints
) -> None:
    _, rows = _sample(explain=False)
    before = _attribution_rows(endpoints, "1")
    outputs = _served(settings, "1", rows)
    assert all(set(o.tensors) == {"score"} for o in outputs)
    assert _attribution_rows(endpoints, "1") == before
    # A mixed batch: every third request asks; only its rows are explained.
    mixed = [
        RowInput(tensors=row.tensors, explain=index % 3 == 0) for index, row in enumerate(rows)
    ]
    outputs = _served(settings, "1", mixed)
    for request, output in zip(mixed, outputs, strict=True):
        expected = {"score", "attributions"} if request.explain else {"score"}
        assert set(output.tensors) == expected
        if request.explain:
            assert output.tensors["attributions"].shape == (request.rows, 8)
    asked_rows = sum(request.rows for request in mixed if request.explain)
    assert 0 < asked_rows < SAMPLE_ROWS
    assert _attribution_rows(endpoints, "1") - before == asked_rows


def test_version_two_scores_reference_traffic_differently(settings: Settings) -> None:
    x, rows = _sample(explain=False)
    v1 = np.concatenate([o.tensors["score"] for o in _served(settings, "1", rows)]).reshape(-1)
    v2 = np.concatenate([o.tensors["score"] for o in _served(settings, "2", rows)]).reshape(-1)
    np.testing.assert_allclose(v2, _weights("2").predict_proba(x.astype(np.float64)), atol=1e-5)
    assert np.mean(np.abs(v1 - v2)) > 0.02
