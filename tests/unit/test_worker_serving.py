"""BatchServer against a backend that refuses, fails, lies and is unavailable.

The fake backend behaves like Triton: one call per micro-batch, and a malformed row fails the
whole call (a 400 for the batch), so only bisection finds which rows were bad.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Callable, Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.backends import BackendError, RowInput, RowOutput
from pipeline.backends.base import stack_rows
from pipeline.backends.signature import ModelSignature
from pipeline.batching import Batch, Lane, Pending
from pipeline.resilience import BreakerConfig, BreakerState, CircuitBreaker, RetryPolicy
from schemas.models import InferenceRequest
from tests.unit.fakes import FakeClock, FakeMessage
from workers.inference.intake import Record
from workers.inference.serving import BatchOutcome, BatchServer

POISON = -1.0
"""A row whose first value is this is one the backend refuses."""
FAST_RETRY = RetryPolicy(max_attempts=3, base_delay_s=0.001, max_delay_s=0.001)


def _record(index: int, *, poisoned: bool = False, columns: int = 4) -> Record:
    request = InferenceRequest.model_validate(
        {"request_id": str(uuid.uuid4()), "model": "scaler", "inputs": {"features": {"i": index}}}
    )
    row = np.full((1, columns), float(index), dtype=np.float32)
    if poisoned:
        row[0, 0] = POISON
    return Record(
        message=FakeMessage(b"", offset_number=index),
        request=request,
        row=RowInput(tensors={"x": row}),
        model="scaler",
        version="1",
        lane=Lane.REALTIME,
        received_at=0.0,
        reply_to=None,
    )


def _batch(
    size: int,
    poisoned: Sequence[int] = (),
    *,
    model: str = "scaler",
    deadline: float | None = None,
    mismatched: bool = False,
) -> Batch[tuple[str, str | None], Record]:
    items = tuple(
        Pending(
            _record(
                i,
                poisoned=i in poisoned and not mismatched,
                columns=5 if mismatched and i in poisoned else 4,
            ),
            enqueued_at=0.0,
            deadline=deadline,
        )
        for i in range(size)
    )
    return Batch((model, "1"), items, 0.0)


def _index(record: Record) -> int:
    return record.offset


class FakeBackend:
    """Serves rows like Triton: one stacked call per batch, one output per row."""

    endpoint = "fake@test"

    def __init__(
        self,
        *,
        stack: bool = False,
        fail: Callable[[int], BackendError | None] | None = None,
        per_row: Callable[[int], RowOutput | BackendError] | None = None,
        outputs_for: Callable[[int], int] | None = None,
    ) -> None:
        self.calls: list[list[int]] = []
        self._stack = stack
        self._fail = fail
        self._per_row = per_row
        self._outputs_for = outputs_for

    async def infer(
        self,
        model: str,
        version: str | None,
        rows: Sequence[RowInput],
        *,
        time_left_s: float | None = None,
        priority: int | None = None,
    ) -> list[RowOutput | BackendError]:
        call = len(self.calls)
        self.calls.append([int(row.tensors["x"][0, 1]) for row in rows])
        await asyncio.sleep(0)  # a real call yields: concurrent halves interleave
        # Rows of different widths: numpy's ValueError in the client, before any call; a lone
        # row of the wrong width reaches the server, which refuses it.
        if self._stack and stack_rows(rows)["x"].shape[1] != 4:
            raise BackendError("unexpected shape", reason="backend_bad_request")
        if self._fail is not None and (error := self._fail(call)) is not None:
            raise error
        if any(row.tensors["x"][0, 0] == POISON for row in rows):
            raise BackendError("inference request is malformed", reason="backend_bad_request")
        if self._outputs_for is not None:
            return [_output(rows[i % len(rows)]) for i in range(self._outputs_for(len(rows)))]
        return [
            self._per_row(int(row.tensors["x"][0, 1])) if self._per_row else _output(row)
            for row in rows
        ]

    async def describe(self, model: str) -> ModelSignature:
        return ModelSignature()

    async def close(self) -> None:
        return None


def _output(row: RowInput) -> RowOutput:
    return RowOutput(tensors={"score": row.tensors["x"][:, :1] * 2})


class Breakers:
    def __init__(self, clock: FakeClock, config: BreakerConfig | None = None) -> None:
        self.clock = clock
        self.config = config
        self.made: dict[str, CircuitBreaker] = {}

    def __call__(self, model: str) -> CircuitBreaker:
        if model not in self.made:
            self.made[model] = CircuitBreaker(model, self.config, self.clock)
        return self.made[model]


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def _serve(
    backend: FakeBackend,
    batch: Batch[tuple[str, str | None], Record],
    *,
    breakers: Breakers | None = None,
    retry: RetryPolicy = FAST_RETRY,
    sleeps: Sleeps | None = None,
    retries: list[tuple[str, int, float, str]] | None = None,
) -> BatchOutcome:
    clock = FakeClock()
    server = BatchServer(
        backend,
        breakers or Breakers(clock),
        retry,
        clock,
        sleep=sleeps or Sleeps(),
        on_retry=None if retries is None else lambda *args: retries.append(args),
    )
    outcome = asyncio.run(server.serve(batch))
    served = [_index(record) for record, _ in outcome.served]
    failed = [_index(failure.record) for failure in outcome.failed]
    waiting = [_index(pending.item) for pending in outcome.waiting]
    # Every record has exactly one outcome.
    assert sorted(served + failed + waiting) == list(range(len(batch)))
    return outcome


def _bisection_bound(size: int, poisoned: int) -> int:
    """Calls bisection may make: the first, then two per failing batch on each poison's path."""
    return 1 + 2 * poisoned * math.ceil(math.log2(max(size, 2)))


def test_two_poisoned_rows_are_found_and_their_neighbours_served() -> None:
    backend = FakeBackend()
    outcome = _serve(backend, _batch(16, poisoned=(3, 12)))
    assert sorted(_index(r) for r, _ in outcome.served) == [
        i for i in range(16) if i not in (3, 12)
    ]
    for record, output in outcome.served:
        assert output.tensors["score"][0, 0] == 2 * _index(record)
    assert sorted(_index(f.record) for f in outcome.failed) == [3, 12]
    for failure in outcome.failed:
        assert (failure.reason, failure.error_class) == (
            "backend_bad_request",
            "BackendError",
        )
        assert failure.attempts == 1
    assert outcome.waiting == []
    assert outcome.splits == 7  # 16, both 8s, two 4s, two 2s
    assert len(backend.calls) == 15
    assert len(backend.calls) <= _bisection_bound(16, 2)


def test_bisection_stays_logarithmic_in_a_large_batch() -> None:
    backend = FakeBackend()
    outcome = _serve(backend, _batch(1024, poisoned=(0, 511, 1023)))
    assert sorted(_index(f.record) for f in outcome.failed) == [0, 511, 1023]
    assert len(outcome.served) == 1021
    assert len(backend.calls) <= _bisection_bound(1024, 3)
    assert sum(len(call) for call in backend.calls) <= 1024 * (1 + 10)


def test_a_batch_of_only_poison_ends_in_single_failures() -> None:
    backend = FakeBackend()
    outcome = _serve(backend, _batch(8, poisoned=range(8)))
    assert len(outcome.failed) == 8
    assert len(backend.calls) == 15  # 2n - 1: every sub-batch of the tree, once
    assert outcome.splits == 7


def test_rows_that_cannot_be_stacked_are_bisected_to_the_odd_one() -> None:
    backend = FakeBackend(stack=True)
    outcome = _serve(backend, _batch(16, poisoned=(9,), mismatched=True))
    assert len(outcome.served) == 15
    (failure,) = outcome.failed
    assert _index(failure.record) == 9
    assert (failure.reason, failure.error_class) == ("backend_bad_request", "BackendError")
    assert outcome.splits == 4
    assert len(backend.calls) <= _bisection_bound(16, 1)


def test_a_lone_poisoned_record_is_refused_without_a_split() -> None:
    backend = FakeBackend()
    outcome = _serve(backend, _batch(1, poisoned=(0,)))
    assert [f.reason for f in outcome.failed] == ["backend_bad_request"]
    assert (outcome.splits, len(backend.calls)) == (0, 1)


def test_unknown_model_refuses_the_whole_batch_without_splitting() -> None:
    backend = FakeBackend(
        fail=lambda _: BackendError("model 'scaler' is not loaded", reason="unknown_model")
    )
    outcome = _serve(backend, _batch(16, poisoned=(2,)))
    assert len(outcome.failed) == 16
    assert {f.reason for f in outcome.failed} == {"unknown_model"}
    assert (outcome.splits, len(backend.calls)) == (0, 1)


def test_transient_errors_are_retried_then_the_batch_waits() -> None:
    sleeps, retries = Sleeps(), []
    backend = FakeBackend(
        fail=lambda _: BackendError("UNAVAILABLE", reason="backend_unavailable", transient=True)
    )
    outcome = _serve(backend, _batch(8), sleeps=sleeps, retries=retries)
    assert len(outcome.waiting) == 8
    assert (outcome.served, outcome.failed, outcome.splits) == ([], [], 0)
    assert len(backend.calls) == FAST_RETRY.max_attempts
    assert len(sleeps.delays) == FAST_RETRY.max_attempts - 1
    assert all(0 <= delay <= FAST_RETRY.max_delay_s for delay in sleeps.delays)
    assert [(model, attempt, reason) for model, attempt, _, reason in retries] == [
        ("scaler", 1, "backend_unavailable"),
        ("scaler", 2, "backend_unavailable"),
    ]


def test_a_transient_error_that_clears_is_served_on_retry() -> None:
    backend = FakeBackend(
        fail=lambda call: (
            BackendError("timeout", reason="backend_timeout", transient=True) if call < 2 else None
        )
    )
    outcome = _serve(backend, _batch(8, poisoned=(5,)))
    assert len(outcome.served) == 7
    assert [_index(f.record) for f in outcome.failed] == [5]
    assert len(backend.calls) <= 2 + _bisection_bound(8, 1)


def test_retry_after_is_a_floor_for_the_wait() -> None:
    sleeps = Sleeps()
    backend = FakeBackend(
        fail=lambda call: (
            BackendError("429", reason="backend_busy", retry_after_s=0.5, transient=True)
            if call == 0
            else None
        )
    )
    retry = RetryPolicy(max_attempts=3, base_delay_s=0.001, max_delay_s=0.001, max_elapsed_s=10)
    outcome = _serve(backend, _batch(4), retry=retry, sleeps=sleeps)
    assert len(outcome.served) == 4
    assert sleeps.delays == [0.5]


def test_no_retry_is_made_past_a_deadline() -> None:
    sleeps = Sleeps()
    backend = FakeBackend(
        fail=lambda _: BackendError("timeout", reason="backend_timeout", transient=True)
    )
    outcome = _serve(backend, _batch(4, deadline=FakeClock().now - 1.0), sleeps=sleeps)
    assert len(outcome.waiting) == 4
    assert (len(backend.calls), sleeps.delays) == (1, [])


def test_an_open_breaker_makes_the_batch_wait_without_a_call() -> None:
    clock = FakeClock()
    breakers = Breakers(clock, BreakerConfig(window_size=1, minimum_calls=1, open_wait_s=60))
    breakers("scaler").record_failure(0.1)
    assert breakers("scaler").state is BreakerState.OPEN
    backend = FakeBackend()
    outcome = _serve(backend, _batch(16, poisoned=(1,)), breakers=breakers)
    assert len(outcome.waiting) == 16
    assert (outcome.served, outcome.failed, backend.calls) == ([], [], [])


def test_transient_failures_open_the_breaker_and_the_rest_waits() -> None:
    clock = FakeClock()
    breakers = Breakers(clock, BreakerConfig(window_size=2, minimum_calls=2, open_wait_s=60))
    backend = FakeBackend(
        fail=lambda _: BackendError("down", reason="backend_down", transient=True)
    )
    retry = RetryPolicy(max_attempts=10, base_delay_s=0.001, max_delay_s=0.001)
    outcome = _serve(backend, _batch(4), breakers=breakers, retry=retry)
    assert len(outcome.waiting) == 4
    assert len(backend.calls) == 2  # the breaker opened after two failures
    assert breakers("scaler").state is BreakerState.OPEN


def test_refused_rows_do_not_open_the_breaker() -> None:
    clock = FakeClock()
    breakers = Breakers(clock, BreakerConfig(window_size=4, minimum_calls=2, open_wait_s=60))
    backend = FakeBackend()
    outcome = _serve(backend, _batch(16, poisoned=range(16)), breakers=breakers)
    assert len(outcome.failed) == 16
    assert breakers("scaler").state is BreakerState.CLOSED


def test_a_half_open_breaker_lets_only_its_probes_through() -> None:
    clock = FakeClock()
    config = BreakerConfig(window_size=1, minimum_calls=1, open_wait_s=1.0, probe_calls=2)
    breakers = Breakers(clock, config)
    breakers("scaler").record_failure(0.1)
    clock.advance(2.0)
    backend = FakeBackend()
    outcome = _serve(backend, _batch(16, poisoned=(0, 15)), breakers=breakers)
    # The whole batch was probe 1 (refused: split), its first half probe 2; the second half
    # found no probe left and waits, while the first half is bisected once probe 2 closed it.
    assert sorted(_index(p.item) for p in outcome.waiting) == list(range(8, 16))
    assert [_index(f.record) for f in outcome.failed] == [0]
    assert sorted(_index(r) for r, _ in outcome.served) == list(range(1, 8))
    assert breakers("scaler").state is BreakerState.CLOSED


def test_per_row_errors_are_split_into_failed_waiting_and_served() -> None:
    def per_row(index: int) -> RowOutput | BackendError:
        if index % 4 == 1:
            return BackendError("prompt too long", reason="context_length")
        if index % 4 == 2:
            return BackendError("rate limited", reason="backend_busy", transient=True)
        return RowOutput(text=f"answer {index}")

    backend = FakeBackend(per_row=per_row)
    outcome = _serve(backend, _batch(12))
    assert sorted(_index(r) for r, _ in outcome.served) == [0, 3, 4, 7, 8, 11]
    assert outcome.served[0][1].text == "answer 0"
    assert sorted(_index(f.record) for f in outcome.failed) == [1, 5, 9]
    assert {f.reason for f in outcome.failed} == {"context_length"}
    assert sorted(_index(p.item) for p in outcome.waiting) == [2, 6, 10]
    assert (outcome.splits, len(backend.calls)) == (0, 1)


@pytest.mark.parametrize("answer", [lambda n: n - 1, lambda n: n + 1, lambda n: 0])
def test_a_backend_answering_the_wrong_number_of_outputs_ends_in_single_failures(
    answer: Callable[[int], int],
) -> None:
    backend = FakeBackend(outputs_for=answer)
    outcome = _serve(backend, _batch(8))
    assert len(outcome.failed) == 8
    assert {(f.reason, f.error_class) for f in outcome.failed} == {("unprocessable", "ValueError")}
    assert len(backend.calls) == 15


def test_a_backend_wrong_only_for_batches_serves_every_row_alone() -> None:
    backend = FakeBackend(outputs_for=lambda n: 1 if n == 1 else n - 1)
    outcome = _serve(backend, _batch(8))
    assert len(outcome.served) == 8
    assert outcome.failed == []


def test_an_unforeseen_exception_is_bisected_like_a_refusal() -> None:
    backend = FakeBackend(fail=lambda call: RuntimeError("boom") if call == 0 else None)
    outcome = _serve(backend, _batch(4))
    assert len(outcome.served) == 4
    assert (outcome.splits, len(backend.calls)) == (1, 3)


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 64),
    poisoned=st.sets(st.integers(0, 63), max_size=6),
)
def test_bisection_finds_exactly_the_poisoned_rows(size: int, poisoned: set[int]) -> None:
    bad = {i for i in poisoned if i < size}
    backend = FakeBackend()
    outcome = _serve(backend, _batch(size, poisoned=tuple(bad)))
    assert {_index(f.record) for f in outcome.failed} == bad
    assert len(outcome.served) == size - len(bad)
    assert outcome.waiting == []
    assert len(backend.calls) <= _bisection_bound(size, len(bad))
    assert outcome.splits == len(backend.calls) // 2
