from __future__ import annotations

import pytest

from pipeline.batching import Lane, MicroBatcher
from tests.unit.fakes import FakeClock


def _batcher(clock: FakeClock, size: int = 4, wait_s: float = 0.01) -> MicroBatcher[str, str]:
    return MicroBatcher(max_batch_size=size, max_wait_s=wait_s, clock=clock)


def _items(batcher: MicroBatcher[str, str], flush: bool = False) -> list[list[str]]:
    batches, _ = batcher.take_due(flush=flush)
    return [[p.item for p in batch.items] for batch in batches]


def test_urgent_requests_are_batched_before_earlier_ordinary_ones() -> None:
    clock = FakeClock()
    batcher = _batcher(clock)
    for i in range(6):
        batcher.add("m", f"p0-{i}", priority=0)
    for i in range(3):
        batcher.add("m", f"p9-{i}", priority=9)
    batcher.add("m", "p5-0", priority=5)
    assert _items(batcher, flush=True) == [
        ["p9-0", "p9-1", "p9-2", "p5-0"],
        ["p0-0", "p0-1", "p0-2", "p0-3"],
        ["p0-4", "p0-5"],
    ]


def test_equal_priorities_keep_their_arrival_order() -> None:
    clock = FakeClock()
    batcher = _batcher(clock, size=10)
    for i, priority in enumerate([3, 7, 3, 7, 0, 3]):
        batcher.add("m", f"{priority}-{i}", priority=priority)
    assert _items(batcher, flush=True) == [["7-1", "7-3", "3-0", "3-2", "3-5", "0-4"]]


def test_real_time_still_goes_ahead_of_urgent_bulk_items() -> None:
    clock = FakeClock()
    batcher = _batcher(clock)
    batcher.add("m", "bulk-9", lane=Lane.BULK, priority=9)
    batcher.add("m", "rt-0", priority=0)
    assert _items(batcher, flush=True) == [["rt-0"], ["bulk-9"]]


def test_a_waiting_ordinary_request_is_due_by_its_own_wait_not_the_newcomers() -> None:
    clock = FakeClock()
    batcher = _batcher(clock, size=8, wait_s=0.5)
    batcher.add("m", "old-0", priority=0)
    clock.advance(0.375)
    batcher.add("m", "new-9", priority=9)  # now at the head of the queue, younger
    assert batcher.next_due_in() == pytest.approx(0.125)
    assert _items(batcher) == []
    clock.advance(0.125)
    assert _items(batcher) == [["new-9", "old-0"]]


def test_requeued_items_go_back_ahead_of_their_equals_but_behind_more_urgent_newcomers() -> None:
    clock = FakeClock()
    batcher = _batcher(clock, size=2)
    for name in ("a", "b", "c"):
        batcher.add("m", name, priority=4)
    batches, _ = batcher.take_due()
    assert [p.item for p in batches[0].items] == ["a", "b"]
    batcher.add("m", "urgent", priority=8)
    batcher.requeue("m", batches[0].items)
    assert _items(batcher, flush=True) == [["urgent", "a"], ["b", "c"]]


def test_expired_items_are_found_wherever_their_priority_put_them() -> None:
    clock = FakeClock()
    batcher = _batcher(clock, size=10, wait_s=1.0)
    batcher.add("m", "late-0", priority=0, deadline=clock() + 0.05)
    batcher.add("m", "late-9", priority=9, deadline=clock() + 0.05)
    batcher.add("m", "fine-5", priority=5, deadline=clock() + 10)
    clock.advance(0.1)
    batches, expired = batcher.take_due(flush=True)
    assert sorted(p.item for p in expired) == ["late-0", "late-9"]
    assert [[p.item for p in b.items] for b in batches] == [["fine-5"]]
