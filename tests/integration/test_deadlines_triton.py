"""Deadlines and priorities against a real Triton made slow for real: a Triton of this test's
own serving a python model that sleeps, whose dynamic batcher has two priority levels and a
queue policy that lets a request set its own timeout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Literal

import numpy as np
import pytest

from pipeline.backends import BackendError, RowInput, RowOutput
from pipeline.backends.exceptions import TransientBackendError
from pipeline.backends.triton import TritonBackend
from tests.integration.test_health_endpoints import OwnTriton

MODEL = "slow_echo"
SLEEP_S = 0.5
"""What one execution of the model takes."""
CEILING_S = 10.0
MARGIN_S = 1.0

CONFIG = f"""
name: "{MODEL}"
backend: "python"
max_batch_size: 1
input [ {{ name: "x", data_type: TYPE_FP32, dims: [ 4 ] }} ]
output [ {{ name: "y", data_type: TYPE_FP32, dims: [ 4 ] }} ]
dynamic_batching {{
  priority_levels: 2
  default_priority_level: 2
  default_queue_policy {{ timeout_action: REJECT allow_timeout_override: true }}
}}
instance_group [ {{ kind: KIND_CPU, count: 1 }} ]
parameters {{ key: "sleep_s" value: {{ string_value: "{SLEEP_S}" }} }}
"""

MODEL_PY = """
import json
import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.sleep_s = float(config["parameters"]["sleep_s"]["string_value"])

    def execute(self, requests):
        time.sleep(self.sleep_s)
        inputs = [pb_utils.get_input_tensor_by_name(r, "x").as_numpy() for r in requests]
        return [pb_utils.InferenceResponse([pb_utils.Tensor("y", x)]) for x in inputs]
"""


@pytest.fixture(scope="module")
def slow_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("slow-triton")
    model_dir = root / "models" / MODEL / "1"
    model_dir.mkdir(parents=True)
    (model_dir.parent / "config.pbtxt").write_text(CONFIG)
    (model_dir / "model.py").write_text(MODEL_PY)
    triton = OwnTriton(root, model_repository=root / "models")
    triton.start()
    try:
        yield {"grpc": triton.grpc_url, "http": triton.http_url}
    finally:
        triton.stop()


def _rows(value: float) -> list[RowInput]:
    return [RowInput(tensors={"x": np.full((1, 4), value, "f4")})]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_call_with_200_ms_left_ends_at_its_deadline_not_at_the_ceiling(
    slow_triton: dict[str, str], protocol: Literal["grpc", "http"]
) -> None:
    async def call() -> None:
        backend = TritonBackend(slow_triton[protocol], protocol, timeout_s=CEILING_S)
        try:
            await backend.infer(MODEL, None, _rows(1.0), time_left_s=0.2)
        finally:
            await backend.close()

    started = time.monotonic()
    with pytest.raises(TransientBackendError) as raised:
        asyncio.run(call())
    took_s = time.monotonic() - started
    print(f"{protocol}: {raised.value.reason} after {took_s:.3f}s")
    assert raised.value.reason in {"backend_timeout", "backend_unavailable"}
    assert took_s < 0.2 + MARGIN_S


def test_an_urgent_call_overtakes_an_ordinary_one_in_tritons_queue(
    slow_triton: dict[str, str],
) -> None:
    """One execution at a time: while a first call runs, a priority-0 call and then a
    priority-9 call wait in Triton's queue; the priority-9 one (level 1) is served first."""
    finished: list[str] = []

    async def scene() -> list[RowOutput | BackendError]:
        backend = TritonBackend(slow_triton["grpc"], "grpc", timeout_s=CEILING_S)

        async def send(name: str, priority: int, after_s: float) -> list[RowOutput | BackendError]:
            await asyncio.sleep(after_s)  # the order of arrival this scene is about
            outputs = await backend.infer(MODEL, None, _rows(float(priority)), priority=priority)
            finished.append(name)
            return outputs

        try:
            await backend.describe(MODEL)  # reads the priority levels
            # Connected, and the model idle (an earlier test's call may still be running).
            await backend.infer(MODEL, None, _rows(0.0))
            answers = await asyncio.gather(
                send("first", 0, 0.0),
                send("ordinary", 0, SLEEP_S / 5),
                send("urgent", 9, SLEEP_S * 2 / 5),
            )
        finally:
            await backend.close()
        return [row for answer in answers for row in answer]

    rows = asyncio.run(scene())
    assert all(isinstance(row, RowOutput) for row in rows)
    assert finished == ["first", "urgent", "ordinary"]
