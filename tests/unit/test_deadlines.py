from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import pytest

from pipeline.backends import BackendError, RowInput, RowOutput, TextPrompt
from pipeline.backends.signature import ModelSignature
from pipeline.batching import Batch, Lane, Pending
from pipeline.deadlines import (
    backend_timeout_s,
    batch_priority,
    triton_priority_level,
    triton_timeout_us,
)
from pipeline.resilience import CircuitBreaker, RetryPolicy
from schemas.models import InferenceRequest, Inputs, TextInput
from tests.unit.fakes import FakeClock, FakeMessage
from workers.inference.intake import Record
from workers.inference.serving import BatchServer


def test_the_time_left_is_the_timeout_between_floor_and_ceiling() -> None:
    assert backend_timeout_s(0.2, floor_s=0.05, ceiling_s=10.0) == 0.2
    assert backend_timeout_s(0.01, floor_s=0.05, ceiling_s=10.0) == 0.05
    assert backend_timeout_s(-3.0, floor_s=0.05, ceiling_s=10.0) == 0.05
    assert backend_timeout_s(86_400.0, floor_s=0.05, ceiling_s=10.0) == 10.0


def test_no_deadline_or_nonsense_time_left_gets_the_ceiling() -> None:
    assert backend_timeout_s(None, floor_s=0.05, ceiling_s=10.0) == 10.0
    assert backend_timeout_s(float("nan"), floor_s=0.05, ceiling_s=10.0) == 10.0
    assert backend_timeout_s(float("inf"), floor_s=0.05, ceiling_s=10.0) == 10.0


def test_a_floor_above_the_ceiling_yields_the_ceiling() -> None:
    assert backend_timeout_s(0.0, floor_s=5.0, ceiling_s=1.0) == 1.0


@pytest.mark.parametrize(("floor_s", "ceiling_s"), [(0.05, 0.0), (-1.0, 10.0), (0.05, -1.0)])
def test_impossible_bounds_are_refused(floor_s: float, ceiling_s: float) -> None:
    with pytest.raises(ValueError, match="ceiling_s"):
        backend_timeout_s(1.0, floor_s=floor_s, ceiling_s=ceiling_s)


def test_a_batch_is_sent_with_its_most_urgent_priority() -> None:
    assert batch_priority([0, 9, None, 3]) == 9
    assert batch_priority([None, None]) is None
    assert batch_priority([]) is None


def test_priorities_spread_over_tritons_levels_with_level_one_first() -> None:
    assert [triton_priority_level(p, 2) for p in range(10)] == [2] * 5 + [1] * 5
    assert [triton_priority_level(p, 10) for p in range(10)] == list(range(10, 0, -1))
    assert triton_priority_level(9, 3) == 1
    assert triton_priority_level(0, 3) == 3


def test_models_without_levels_and_requests_without_priority_get_the_default() -> None:
    assert triton_priority_level(9, 0) == 0
    assert triton_priority_level(None, 4) == 0


def test_out_of_range_priorities_are_clamped_to_a_real_level() -> None:
    assert triton_priority_level(42, 4) == 1
    assert triton_priority_level(-7, 4) == 4


def test_tritons_timeout_is_whole_microseconds_and_never_zero() -> None:
    assert triton_timeout_us(0.2) == 200_000
    assert triton_timeout_us(0.0) == 1  # 0 would mean "no timeout"


class _RecordingBackend:
    """Answers every row and remembers what each call was given."""

    endpoint = "recording@test"

    def __init__(self) -> None:
        self.calls: list[tuple[float | None, int | None]] = []

    async def infer(
        self,
        model: str,
        version: str | None,
        rows: Sequence[RowInput],
        *,
        time_left_s: float | None = None,
        priority: int | None = None,
    ) -> list[RowOutput | BackendError]:
        self.calls.append((time_left_s, priority))
        return [RowOutput(text="ok") for _ in rows]

    async def describe(self, model: str) -> ModelSignature:
        return ModelSignature()

    async def close(self) -> None:
        return None


def _pending(offset: int, priority: int | None, deadline: float | None) -> Pending[Record]:
    request = InferenceRequest(
        request_id=uuid.uuid4(),
        model="m",
        inputs=Inputs(text=TextInput(prompt="hello")),
        priority=priority,
    )
    record = Record(
        message=FakeMessage(b"", offset_number=offset),
        request=request,
        row=RowInput(text=TextPrompt(prompt="hello")),
        model="m",
        version=None,
        lane=Lane.REALTIME,
        received_at=0.0,
        reply_to=None,
    )
    return Pending(record, enqueued_at=0.0, deadline=deadline, priority=priority or 0)


def test_the_worker_sends_a_batch_with_its_earliest_deadline_and_top_priority() -> None:
    clock = FakeClock()
    backend = _RecordingBackend()
    breaker = CircuitBreaker("recording", clock=clock)
    server = BatchServer(backend, lambda _model: breaker, RetryPolicy(), clock=clock)
    items = (
        _pending(0, None, clock() + 5.0),
        _pending(1, 7, clock() + 0.25),
        _pending(2, 2, None),
    )
    outcome = asyncio.run(server.serve(Batch(("m", None), items, clock())))
    assert len(outcome.served) == 3
    [(time_left_s, priority)] = backend.calls
    assert time_left_s == pytest.approx(0.25)
    assert priority == 7
    asyncio.run(server.serve(Batch(("m", None), (_pending(3, None, None),), clock())))
    assert backend.calls[1] == (None, None)
