"""End offsets of a fresh topic: answers given while its leader settles are waited out."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from pipeline.kafka.admin import end_offsets_with
from pipeline.kafka.exceptions import TopicAdminError


@dataclass
class _Offset:
    offset: int


@dataclass
class _Topic:
    partitions: dict[int, object]


@dataclass
class _Metadata:
    topics: dict[str, _Topic]


@dataclass
class _SettlingAdmin:
    """Answers list_offsets with the given errors first, then with offset 7 per partition."""

    errors: list[int]
    calls: int = field(default=0)

    def list_topics(self, topic: str, timeout: float) -> _Metadata:
        return _Metadata({topic: _Topic({0: object(), 1: object()})})

    def list_offsets(self, requests: dict[Any, Any], request_timeout: float) -> dict[Any, Any]:
        self.calls += 1
        if self.errors:
            raise KafkaException(KafkaError(self.errors.pop(0)))
        answers = {}
        for partition in requests:
            future: Future[_Offset] = Future()
            future.set_result(_Offset(7))
            answers[partition] = future
        return answers


@pytest.mark.parametrize(
    "code",
    [
        KafkaError.UNKNOWN_LEADER_EPOCH,
        KafkaError.FENCED_LEADER_EPOCH,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
    ],
)
def test_a_settling_leader_is_waited_out(code: int) -> None:
    admin = _SettlingAdmin(errors=[code, code])
    assert end_offsets_with(admin, "t", timeout_s=5.0) == {0: 7, 1: 7}  # type: ignore[arg-type]
    assert admin.calls == 3


def test_a_lasting_refusal_is_a_typed_error() -> None:
    admin = _SettlingAdmin(errors=[KafkaError.TOPIC_AUTHORIZATION_FAILED])
    with pytest.raises(TopicAdminError, match="end offsets of 't'"):
        end_offsets_with(admin, "t", timeout_s=5.0)  # type: ignore[arg-type]
    assert admin.calls == 1
