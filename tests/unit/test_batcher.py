from __future__ import annotations

import pytest

from pipeline.batching import Lane, MicroBatcher
from tests.unit.fakes import FakeClock


def _batcher(clock: FakeClock, size: int = 4, wait_s: float = 0.01) -> MicroBatcher[str, int]:
    return MicroBatcher(max_batch_size=size, max_wait_s=wait_s, clock=clock)


def test_flushes_when_the_batch_is_full() -> None:
    clock = FakeClock()
    batcher = _batcher(clock)
    for i in range(9):
        batcher.add("m:1", i)
    batches, expired = batcher.take_due()
    assert [[p.item for p in b.items] for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert expired == []
    assert len(batcher) == 1
    assert batcher.next_due_in() == pytest.approx(0.01)


def test_flushes_a_partial_batch_after_the_wait() -> None:
    clock = FakeClock()
    batcher = _batcher(clock)
    batcher.add("m:1", 1)
    clock.advance(0.005)
    batcher.add("m:1", 2)
    assert batcher.take_due() == ([], [])
    assert batcher.next_due_in() == pytest.approx(0.005)
    clock.advance(0.006)
    batches, _ = batcher.take_due()
    assert [p.item for p in batches[0].items] == [1, 2]
    assert batcher.next_due_in() is None


def test_keys_are_batched_separately_and_the_longest_waiting_goes_first() -> None:
    clock = FakeClock()
    batcher = _batcher(clock)
    batcher.add("m:2", 20)
    clock.advance(0.001)
    batcher.add("m:1", 10)
    clock.advance(0.02)
    batches, _ = batcher.take_due(limit=1)
    assert [(b.key, [p.item for p in b.items]) for b in batches] == [("m:2", [20])]
    batches, _ = batcher.take_due()
    assert [(b.key, [p.item for p in b.items]) for b in batches] == [("m:1", [10])]


def test_realtime_items_go_ahead_of_bulk_items_in_batches_of_their_own() -> None:
    clock = FakeClock()
    batcher = _batcher(clock, size=3)
    for i in range(3):
        batcher.add("m:1", 100 + i, lane=Lane.BULK)
    batcher.add("m:1", 1)
    batcher.add("m:1", 2)
    batches, _ = batcher.take_due()
    assert [[p.item for p in b.items] for b in batches] == [[1, 2], [100, 101, 102]]
    assert [p.lane for p in batches[0].items] == [Lane.REALTIME, Lane.REALTIME]


def test_bulk_only_batches_wait_when_refused_while_real_time_ones_go() -> None:
    clock = FakeClock()
    batcher = _batcher(clock, size=2)
    for i in range(4):
        batcher.add("m:1", 100 + i, lane=Lane.BULK)
    batcher.add("m:1", 1)
    batches, _ = batcher.take_due(accept_bulk_only=lambda key: False)
    assert [[p.item for p in b.items] for b in batches] == [[1]]
    batches, _ = batcher.take_due(accept_bulk_only=lambda key: False)
    assert batches == []
    batches, _ = batcher.take_due(accept_bulk_only=lambda key: True)
    assert [[p.item for p in b.items] for b in batches] == [[100, 101], [102, 103]]


def test_a_refused_partial_batch_keeps_gathering_while_full_batches_go() -> None:
    clock = FakeClock()
    batcher = _batcher(clock, size=3)
    asked: list[tuple[str, Lane]] = []

    def refuse_partial(key: str, lane: Lane) -> bool:
        asked.append((key, lane))
        return False

    for i in range(4):
        batcher.add("m:1", i)
    clock.advance(0.02)
    batches, _ = batcher.take_due(accept_partial=refuse_partial)
    assert [[p.item for p in b.items] for b in batches] == [[0, 1, 2]]
    assert asked == [("m:1", Lane.REALTIME)]
    batcher.add("m:1", 4)
    assert batcher.take_due(accept_partial=refuse_partial) == ([], [])
    batches, _ = batcher.take_due(accept_partial=lambda key, lane: True)
    assert [[p.item for p in b.items] for b in batches] == [[3, 4]]


def test_a_partial_batch_is_judged_by_the_lane_it_comes_from() -> None:
    clock = FakeClock()
    batcher = _batcher(clock, size=3)
    for i in range(3):
        batcher.add("m:1", 100 + i, lane=Lane.BULK)
    batcher.add("m:1", 1)
    clock.advance(0.02)
    only_bulk = {Lane.BULK: True, Lane.REALTIME: False}
    batches, _ = batcher.take_due(accept_partial=lambda key, lane: only_bulk[lane])
    assert batches == []  # the real-time batch (1 item) is next and partial: it waits
    batches, _ = batcher.take_due(flush=True, accept_partial=lambda key, lane: False)
    assert [[p.item for p in b.items] for b in batches] == [[1], [100, 101, 102]]


def test_expired_items_are_handed_back_and_never_batched() -> None:
    clock = FakeClock()
    batcher = _batcher(clock, size=2)
    batcher.add("m:1", 1, deadline=clock.now + 0.001)
    batcher.add("m:1", 2, deadline=clock.now + 10)
    clock.advance(0.002)
    batcher.add("m:1", 3)
    batches, expired = batcher.take_due()
    assert [p.item for p in expired] == [1]
    assert [p.item for p in batches[0].items] == [2, 3]


def test_in_flight_limit_and_flush_on_drain() -> None:
    clock = FakeClock()
    batcher = _batcher(clock, size=2, wait_s=60)
    for i in range(5):
        batcher.add("m:1", i)
    batches, _ = batcher.take_due(limit=1)
    assert len(batches) == 1
    batches, _ = batcher.take_due(flush=True)
    assert [[p.item for p in b.items] for b in batches] == [[2, 3], [4]]
    assert len(batcher) == 0


@pytest.mark.parametrize(("size", "wait"), [(0, 0.1), (1, -1.0)])
def test_invalid_settings_are_refused(size: int, wait: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        MicroBatcher(size, wait)


def test_keys_not_accepted_wait_and_requeued_items_go_first() -> None:
    clock = FakeClock()
    batcher = _batcher(clock, size=2)
    for i in range(3):
        batcher.add("open-breaker", i)
    batcher.add("fine", 10)
    batcher.add("fine", 11)
    batches, _ = batcher.take_due(accept=lambda key: key != "open-breaker")
    assert [b.key for b in batches] == ["fine"]
    batches, _ = batcher.take_due(limit=1)
    assert [p.item for p in batches[0].items] == [0, 1]
    batcher.requeue(batches[0].key, batches[0].items)
    batches, _ = batcher.take_due(flush=True)
    assert [[p.item for p in b.items] for b in batches] == [[0, 1], [2]]


def test_discard_removes_items_of_revoked_partitions() -> None:
    clock = FakeClock()
    batcher = _batcher(clock, size=10)
    for i in range(6):
        batcher.add("m:1", i)
    removed = batcher.discard(lambda item: item % 2 == 0)
    assert [p.item for p in removed] == [0, 2, 4]
    batches, _ = batcher.take_due(flush=True)
    assert [p.item for p in batches[0].items] == [1, 3, 5]
