from __future__ import annotations

import random

import pytest

from pipeline.kafka.watermark import OffsetTracker, PartitionWatermark


def test_commit_offset_waits_for_the_lowest_unfinished_record() -> None:
    watermark = PartitionWatermark()
    for offset in range(10, 15):
        watermark.track(offset)
    assert watermark.committable is None
    watermark.complete(12)
    watermark.complete(11)
    assert watermark.committable is None  # 10 is still in flight
    watermark.complete(10)
    assert watermark.committable == 13
    watermark.complete(14)
    assert watermark.committable == 13
    watermark.complete(13)
    assert watermark.committable == 15
    assert watermark.in_flight == 0


def test_gaps_in_offsets_do_not_block_the_watermark() -> None:
    watermark = PartitionWatermark()
    for offset in (3, 7, 8):  # 4..6 compacted away
        watermark.track(offset)
    for offset in (8, 3, 7):
        watermark.complete(offset)
    assert watermark.committable == 9


def test_offsets_must_be_tracked_in_increasing_order() -> None:
    watermark = PartitionWatermark()
    watermark.track(5)
    with pytest.raises(ValueError, match="tracked after"):
        watermark.track(5)


def test_random_completion_order_always_commits_a_contiguous_prefix() -> None:
    rng = random.Random(42)
    watermark = PartitionWatermark()
    offsets = list(range(500))
    for offset in offsets:
        watermark.track(offset)
    done: set[int] = set()
    for offset in rng.sample(offsets, len(offsets)):
        watermark.complete(offset)
        done.add(offset)
        committable = watermark.committable or 0
        assert all(o in done for o in range(committable))
        assert committable == len(offsets) or committable not in done
    assert watermark.committable == 500


def test_tracker_reports_only_partitions_that_moved_and_forgets_revoked_ones() -> None:
    tracker = OffsetTracker()
    for offset in range(3):
        tracker.track("requests", 0, offset)
        tracker.track("requests", 1, offset)
    tracker.complete("requests", 0, 0)
    tracker.complete("requests", 1, 1)
    assert tracker.pending_commits() == {("requests", 0): 1}
    tracker.mark_committed({("requests", 0): 1})
    assert tracker.pending_commits() == {}
    assert tracker.in_flight() == 4
    assert tracker.in_flight("requests", 1) == 2
    tracker.forget([("requests", 1)])
    tracker.complete("requests", 1, 0)  # a late outcome for a revoked partition
    assert tracker.pending_commits() == {}
    assert tracker.in_flight() == 2
