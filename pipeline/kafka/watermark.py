"""Per-partition low watermarks: which offset is safe to commit when work finishes out of order.

Kafka's committed offset means "everything below this is done". Batches complete out of
order, so a partition's committable offset is the lowest offset still in flight (or one past
the last tracked offset when nothing is). Records are tracked in the order the consumer hands
them over, which Kafka guarantees is increasing within a partition; gaps (compacted records,
transaction markers) are fine.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

TopicPartitionKey = tuple[str, int]


@dataclass
class PartitionWatermark:
    _in_order: deque[int] = field(default_factory=deque)
    _completed: set[int] = field(default_factory=set)
    _next_commit: int | None = None

    def track(self, offset: int) -> None:
        if self._in_order and offset <= self._in_order[-1]:
            raise ValueError(f"offset {offset} tracked after {self._in_order[-1]}")
        if not self._in_order and self._next_commit is not None and offset < self._next_commit:
            raise ValueError(f"offset {offset} is below the committable {self._next_commit}")
        self._in_order.append(offset)

    def complete(self, offset: int) -> None:
        """Mark one tracked record as done (its outcome is durably acknowledged).

        An offset outside the records in flight (completed before, or a late outcome of an
        earlier assignment of the partition) changes nothing: kept, it would never leave
        ``_completed`` and would count against ``in_flight`` for good.
        """
        if not self._in_order or not self._in_order[0] <= offset <= self._in_order[-1]:
            return
        self._completed.add(offset)
        while self._in_order and self._in_order[0] in self._completed:
            done = self._in_order.popleft()
            self._completed.discard(done)
            self._next_commit = done + 1
        if not self._in_order:
            self._completed.clear()  # offsets in gaps that were never tracked

    @property
    def committable(self) -> int | None:
        """The offset to commit: every record below it is done; ``None`` before any is."""
        return self._next_commit

    @property
    def in_flight(self) -> int:
        """Records tracked but not yet completed."""
        return len(self._in_order) - len(self._completed)


class OffsetTracker:
    """Watermarks for every assigned partition, and which of them moved since the last commit."""

    def __init__(self) -> None:
        self._partitions: dict[TopicPartitionKey, PartitionWatermark] = {}
        self._committed: dict[TopicPartitionKey, int] = {}

    def track(self, topic: str, partition: int, offset: int) -> None:
        self._partitions.setdefault((topic, partition), PartitionWatermark()).track(offset)

    def complete(self, topic: str, partition: int, offset: int) -> None:
        watermark = self._partitions.get((topic, partition))
        if watermark is not None:  # a revoked partition's late outcome: nothing to commit
            watermark.complete(offset)

    def pending_commits(self) -> dict[TopicPartitionKey, int]:
        """Partitions whose committable offset moved past what was last committed."""
        moved = {}
        for key, watermark in self._partitions.items():
            offset = watermark.committable
            if offset is not None and offset != self._committed.get(key):
                moved[key] = offset
        return moved

    def mark_committed(self, commits: dict[TopicPartitionKey, int]) -> None:
        self._committed.update(commits)

    def in_flight(self, topic: str | None = None, partition: int | None = None) -> int:
        return sum(
            watermark.in_flight
            for (t, p), watermark in self._partitions.items()
            if topic in (None, t) and partition in (None, p)
        )

    def forget(self, keys: list[TopicPartitionKey]) -> None:
        """Drop revoked partitions: their new owner resumes from the last commit."""
        for key in keys:
            self._partitions.pop(key, None)
            self._committed.pop(key, None)
