"""Deadlines and priorities against a real Triton made slow for real: a Triton of this test's
own serving a python model that sleeps (or, for a gated request, waits until the test opens
its gate), whose dynamic batcher has two priority levels and a queue policy that lets a
request set its own timeout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from pipeline.backends import BackendError, RowInput, RowOutput
from pipeline.backends.triton import TritonBackend
from tests.integration import scrape
from tests.integration.test_health_endpoints import OwnTriton
from tests.integration.waiting import wait_until

MODEL = "slow_echo"
SLEEP_S = 0.5
"""What one execution of the model takes."""
CEILING_S = 10.0
MARGIN_S = 2.0
"""How late a cut-short call may end: as in test_deadlines.py, wide enough for a loaded
machine and far below the ceiling a call without its deadline would wait for."""
GATED = -1.0
"""An input whose first value is this waits for the gate instead of sleeping."""

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
parameters {{ key: "gate_dir" value: {{ string_value: "GATE_DIR" }} }}
"""

MODEL_PY = """
import json
import pathlib
import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"])["parameters"]
        self.sleep_s = float(parameters["sleep_s"]["string_value"])
        self.gate = pathlib.Path(parameters["gate_dir"]["string_value"])

    def execute(self, requests):
        inputs = [pb_utils.get_input_tensor_by_name(r, "x").as_numpy() for r in requests]
        if any(x.flat[0] == GATED for x in inputs):
            (self.gate / "started").touch()
            deadline = time.monotonic() + 120
            while not (self.gate / "open").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        else:
            time.sleep(self.sleep_s)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("y", x)]) for x in inputs]
"""


@pytest.fixture(scope="module")
def slow_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("slow-triton")
    model_dir = root / "models" / MODEL / "1"
    model_dir.mkdir(parents=True)
    gate = root / "gate"
    gate.mkdir()
    (model_dir.parent / "config.pbtxt").write_text(CONFIG.replace("GATE_DIR", str(gate)))
    (model_dir / "model.py").write_text(MODEL_PY.replace("GATED", repr(GATED)))
    triton = OwnTriton(root, model_repository=root / "models")
    triton.start()
    try:
        yield {
            "grpc": triton.grpc_url,
            "http": triton.http_url,
            "metrics": str(triton.metrics_port),
            "gate": str(gate),
        }
    finally:
        (gate / "open").touch()  # never leave an execution waiting on a stopped test
        triton.stop()


def pending_requests(metrics_port: int) -> float:
    """Triton's own count of requests waiting in the model's queue (not executing)."""
    return scrape.sample_total(metrics_port, "nv_inference_pending_request_count", model=MODEL)


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
    with pytest.raises(BackendError) as raised:
        asyncio.run(call())
    assert raised.value.transient
    took_s = time.monotonic() - started
    print(f"{protocol}: {raised.value.reason} after {took_s:.3f}s")
    assert raised.value.reason in {"backend_timeout", "backend_unavailable"}
    assert took_s < 0.2 + MARGIN_S


def test_an_urgent_call_overtakes_an_ordinary_one_in_tritons_queue(
    slow_triton: dict[str, str],
) -> None:
    """One execution at a time: while a first call is held executing, a priority-0 call and
    then a priority-9 call wait in Triton's queue (each seen there in Triton's own metrics
    before the next is sent); the priority-9 one (level 1) is served first."""
    finished: list[str] = []
    gate = Path(slow_triton["gate"])

    def queued(count: int) -> Awaitable[None]:
        return asyncio.to_thread(
            wait_until,
            lambda: pending_requests(int(slow_triton["metrics"])) == count,
            60,
            f"{count} request(s) waiting in Triton's queue",
        )

    async def scene() -> list[RowOutput | BackendError]:
        backend = TritonBackend(slow_triton["grpc"], "grpc", timeout_s=120)

        async def send(name: str, priority: int, value: float) -> list[RowOutput | BackendError]:
            outputs = await backend.infer(MODEL, None, _rows(value), priority=priority)
            finished.append(name)
            return outputs

        try:
            await backend.describe(MODEL)  # reads the priority levels
            await queued(0)  # an earlier test's call may still be running
            first = asyncio.create_task(send("first", 0, GATED))
            await asyncio.to_thread(
                wait_until, (gate / "started").exists, 60, "the first call to execute"
            )
            ordinary = asyncio.create_task(send("ordinary", 0, 0.0))
            await queued(1)
            urgent = asyncio.create_task(send("urgent", 9, 9.0))
            await queued(2)
            (gate / "open").touch()
            answers = await asyncio.gather(first, ordinary, urgent)
        finally:
            await backend.close()
        return [row for answer in answers for row in answer]

    rows = asyncio.run(scene())
    assert all(isinstance(row, RowOutput) for row in rows)
    assert finished == ["first", "urgent", "ordinary"]
