"""Test doubles for pure logic: a clock that only moves when told, a consumed message."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@dataclass
class FakeMessage:
    """A consumed Kafka record as the worker reads it (confluent-kafka's ``Message`` fits).

    ``headers`` may be a callable, to stand in for a client whose ``headers()`` raises.
    """

    value_bytes: bytes | None
    topic_name: str | None = "inference.scaler.requests"
    partition_number: int | None = 0
    offset_number: int | None = 0
    key_data: str | bytes | None = None
    header_data: Any = None
    timestamp_ms: int = 1_764_000_000_000

    def topic(self) -> str | None:
        return self.topic_name

    def partition(self) -> int | None:
        return self.partition_number

    def offset(self) -> int | None:
        return self.offset_number

    def key(self) -> str | bytes | None:
        return self.key_data

    def value(self) -> bytes | None:
        return self.value_bytes

    def headers(self) -> Any:
        return self.header_data() if callable(self.header_data) else self.header_data

    def timestamp(self) -> tuple[int, int]:
        return (1, self.timestamp_ms)

    def error(self) -> None:
        return None
