"""`follow`: the one reader of result and event topics (client, tails, feeds, connectors)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

import schemas
from pipeline.kafka.events import follow
from schemas.models import ControlAction, ControlEvent, InferenceResult, ResultStatus
from tests.unit.memory_kafka import MemoryMessage


@dataclass(frozen=True)
class ErrorMessage(MemoryMessage):
    def error(self) -> Any:  # type: ignore[override]
        return "_PARTITION_EOF"


@dataclass
class ScriptedSource:
    """Hands out one scripted batch per read and records what each read asked for."""

    batches: list[list[MemoryMessage]]
    reads: list[tuple[int, float]] = field(default_factory=list)

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[MemoryMessage]:
        self.reads.append((num_messages, timeout))
        return self.batches.pop(0) if self.batches else []


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _result() -> InferenceResult:
    return InferenceResult(
        request_id=uuid.uuid4(), status=ResultStatus.ERROR, model="m", error_code="x"
    )


def _message(value: bytes | None, offset: int = 0) -> MemoryMessage:
    return MemoryMessage("t", 0, offset, value)


def test_only_decodable_events_of_the_kind_come_out_in_order() -> None:
    first, second = _result(), _result()
    control = ControlEvent(
        event_id=uuid.uuid4(),
        model="m",
        action=ControlAction.PROMOTE,
        to_version="2",
        reason="r",
        issued_at=datetime.now(UTC),
        issued_by="t",
    )
    source = ScriptedSource(
        [
            [
                _message(schemas.encode(first)),
                _message(None),  # a tombstone
                _message(b""),
                ErrorMessage("t", 0, 3, b"ignored"),
                _message(b"\xc3\x01 not avro"),
                _message(schemas.encode(control)),  # another contract on the same topic
            ],
            [_message(schemas.encode(second))],
        ]
    )
    skipped: list[int] = []
    read = follow(
        source,
        InferenceResult,
        until=lambda: not source.batches,
        on_undecodable=lambda message: skipped.append(message.offset()),
    )
    assert [event.request_id for event in read] == [first.request_id, second.request_id]
    assert len(skipped) == 2  # the garbage and the control event; nothing raised


def test_until_is_asked_before_every_read_and_the_batch_size_is_passed_on() -> None:
    source = ScriptedSource([[_message(schemas.encode(_result()))]] * 5)
    seen: list[InferenceResult] = []
    for event in follow(source, InferenceResult, until=lambda: len(seen) >= 2, batch=1):
        seen.append(event)
    assert len(seen) == 2
    assert source.reads == [(1, 0.2), (1, 0.2)]


def test_idle_timeout_ends_the_read_only_after_that_long_without_messages() -> None:
    clock = FakeClock()
    batches: list[list[MemoryMessage]] = [[], [_message(schemas.encode(_result()))], [], [], []]

    class TickingSource(ScriptedSource):
        def consume(self, num_messages: int = 1, timeout: float = -1) -> list[MemoryMessage]:
            clock.now += 1.0
            return super().consume(num_messages, timeout)

    source = TickingSource(batches)
    events = list(
        follow(source, InferenceResult, until=lambda: False, idle_timeout_s=2.5, clock=clock)
    )
    assert len(events) == 1
    # Idle from t=2 (the last message) to t=5: the third empty read crosses 2.5 s.
    assert len(source.reads) == 5


@given(st.lists(st.binary(max_size=64), max_size=20))
def test_hostile_values_never_raise(values: list[bytes]) -> None:
    source = ScriptedSource([[_message(value, i) for i, value in enumerate(values)]])
    skipped: list[int] = []
    events = list(
        follow(
            source,
            InferenceResult,
            until=lambda: not source.batches,
            on_undecodable=lambda message: skipped.append(message.offset()),
        )
    )
    assert len(events) + len(skipped) == sum(1 for value in values if value)
