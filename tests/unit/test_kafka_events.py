"""decode_records: follow's skipping for readers that consume batches themselves (the
connectors' writeback, which commits a batch's offsets after writing it)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import schemas
from pipeline.kafka.events import decode_records
from schemas.models import ControlAction, ControlEvent, InferenceResult, ResultStatus
from tests.unit.fakes import FakeMessage


@dataclass
class _FailedRecord(FakeMessage):
    def error(self) -> str:  # type: ignore[override]
        return "_PARTITION_EOF"


def _result(n: int) -> InferenceResult:
    return InferenceResult(
        request_id=uuid.UUID(int=n), status=ResultStatus.OK, model="scaler", model_version="1"
    )


def test_events_come_in_order_and_what_is_no_such_event_is_counted_not_raised() -> None:
    control = ControlEvent(
        event_id=uuid.UUID(int=9),
        model="scaler",
        action=ControlAction.ROLLBACK,
        to_version="1",
        reason="test",
        issued_at=datetime(2026, 1, 1, tzinfo=UTC),
        issued_by="test",
    )
    records = [
        FakeMessage(schemas.encode(_result(1))),
        FakeMessage(b"\x00\x00garbage"),  # hostile: framed like Avro, decodes to nothing
        FakeMessage(b"x" * 1_000_000),  # hostile: large and no event at all
        FakeMessage(schemas.encode(control)),  # another contract: not a result
        FakeMessage(None),  # a tombstone carries no event and is no failure
        _FailedRecord(schemas.encode(_result(3))),  # a consumer error is no record
        FakeMessage(schemas.encode(_result(2))),
    ]
    undecodable: list[bytes | None] = []
    events = decode_records(
        records,  # type: ignore[arg-type]
        InferenceResult,
        lambda message: undecodable.append(message.value()),
    )
    assert [event.request_id.int for event in events] == [1, 2]
    assert len(undecodable) == 3
