"""A request's deadline bounds the backend call itself, against a backend made slow for real."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from pipeline.backends import BackendError, RowInput, RowOutput
from pipeline.backends.triton import TritonBackend
from pipeline.settings import Settings
from schemas.models import ResultStatus
from tests.integration.slow_llm import SlowLlmScene, slow_llm_scene, text_request

CEILING_S = 10.0
"""The backend's configured timeout: what a slow call took before deadlines reached it."""
MARGIN_S = 2.0
"""Outcome after the deadline: a poll, a produce and the worker's loop, far below the ceiling."""


@pytest.fixture
def scene(settings: Settings, tmp_path: Path) -> Iterator[SlowLlmScene]:
    with slow_llm_scene(
        settings, tmp_path, SLUICEWAY_BACKENDS__VLLM__TIMEOUT_S=str(CEILING_S)
    ) as running:
        yield running


def test_a_request_with_200_ms_left_is_answered_expired_near_its_deadline_not_at_the_ceiling(
    scene: SlowLlmScene,
) -> None:
    scene.server.latency_s = 30.0  # every answer from now on comes far too late
    deadline = datetime.now(UTC) + timedelta(milliseconds=200)
    request = text_request(1, deadline=deadline)
    scene.publish(request)

    [outcome] = scene.outcomes(1, timeout_s=CEILING_S * 3)

    late_by_s = outcome.produced_at - deadline.timestamp()
    print(f"outcome {outcome.result.status} {late_by_s:+.3f}s after the deadline")
    assert outcome.result.request_id == request.request_id
    assert outcome.result.status is ResultStatus.EXPIRED, scene.logs()
    assert outcome.result.error_code == "deadline_exceeded"
    assert scene.server.requests_total == 1  # the call was made, then cut at the deadline
    assert late_by_s < MARGIN_S, scene.logs()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_tritons_call_is_bounded_by_the_time_left(
    settings: Settings, protocol: Literal["grpc", "http"]
) -> None:
    """Real Triton, a deadline too close to meet: the client gives up at once (gRPC deadline,
    HTTP bound), and a roomy deadline is served."""
    triton = settings.backends.triton
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    rows = [RowInput(tensors={"x": np.ones((2, 4), "f4")})]

    async def call(time_left_s: float) -> list[RowOutput | BackendError]:
        backend = TritonBackend(url, protocol, timeout_s=CEILING_S, timeout_floor_s=0.0)
        try:
            return await backend.infer("scaler", "1", rows, time_left_s=time_left_s, priority=9)
        finally:
            await backend.close()

    started = time.monotonic()
    with pytest.raises(BackendError) as raised:
        asyncio.run(call(1e-6))
    assert raised.value.transient
    assert raised.value.reason == "backend_timeout"
    assert time.monotonic() - started < CEILING_S
    [served] = asyncio.run(call(5.0))
    assert isinstance(served, RowOutput)
    np.testing.assert_array_equal(served.tensors["y"], np.full((2, 4), 2.0, "f4"))
