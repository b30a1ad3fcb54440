"""Memory stays bounded by what is in flight, not by what went through.

A worker runs for weeks; a structure that keeps one entry per record ever seen (a served
record's deadline, a completed offset, a reply topic once named) grows until it is killed.
Each test pushes a million records, or a hostile stream of names, through one structure and
checks its size at every step. The whole file runs in seconds.
"""

from __future__ import annotations

import random
import uuid

import numpy as np

from pipeline.backends import RowInput
from pipeline.batching import Lane, MicroBatcher, Pending
from pipeline.kafka.watermark import OffsetTracker, PartitionWatermark
from pipeline.settings import WorkerSettings
from schemas.models import InferenceRequest
from tests.unit.fakes import FakeClock, FakeMessage
from workers.inference.dispatch import Dispatcher
from workers.inference.intake import Record
from workers.inference.sink import REPLY_TOPIC_MISSING_S, ReplyTopics

MILLION = 1_000_000
BATCH = 64
DAY_S = 86_400.0


def _index_bound(batcher: MicroBatcher[str, int]) -> int:
    return 2 * len(batcher) + BATCH


def test_a_million_served_records_leave_the_deadline_index_empty() -> None:
    clock = FakeClock()
    batcher: MicroBatcher[str, int] = MicroBatcher(BATCH, 0.005, clock)
    add, take = batcher.add, batcher.take_due
    deadline = clock.now + DAY_S
    backlog = 10_048  # a standing queue, as under load (a million minus it is whole batches)
    for item in range(backlog):
        add("scaler", item, lane=Lane.BULK, deadline=deadline)
    for start in range(backlog, MILLION, BATCH):
        for item in range(start, start + BATCH):
            add("scaler", item, lane=Lane.BULK, deadline=deadline)
        batches, expired = take(limit=1)
        assert len(batches) == 1
        assert len(batches[0]) == BATCH
        assert expired == []
        assert batcher.deadline_index_size <= _index_bound(batcher)
    assert len(batcher) == backlog
    while len(batcher):  # drain: by flush, and by the wait running out
        clock.advance(0.01)
        batches, expired = take(limit=8, flush=len(batcher) % 2 == 0)
        assert batches
        assert expired == []
        assert batcher.deadline_index_size <= _index_bound(batcher)
    assert batcher.deadline_index_size <= BATCH


def test_requeueing_the_same_items_a_thousand_times_keeps_the_index_bounded() -> None:
    clock = FakeClock()
    batcher: MicroBatcher[str, int] = MicroBatcher(BATCH, 0.005, clock)
    for item in range(3 * BATCH):
        batcher.add("scaler", item, deadline=clock.now + DAY_S)
    for _ in range(1000):
        (batch,), _ = batcher.take_due(limit=1, flush=True)
        assert batcher.deadline_index_size <= _index_bound(batcher)
        batcher.requeue("scaler", batch.items)
        assert len(batcher) == 3 * BATCH
        assert batcher.deadline_index_size <= _index_bound(batcher)
    # Requeued items keep their deadlines: each expires exactly once, when its time comes.
    clock.advance(DAY_S + 1)
    batches, expired = batcher.take_due()
    assert batches == []
    assert sorted(p.item for p in expired) == list(range(3 * BATCH))
    assert (len(batcher), batcher.deadline_index_size) == (0, 0)


def test_discarding_a_revoked_partition_compacts_the_index() -> None:
    clock = FakeClock()
    batcher: MicroBatcher[str, int] = MicroBatcher(BATCH, 0.005, clock)
    for item in range(100_000):
        batcher.add("scaler", item, deadline=clock.now + DAY_S)
    removed = batcher.discard(lambda item: item % 100 != 0)
    assert len(removed) == 99_000
    assert len(batcher) == 1000
    assert batcher.deadline_index_size <= _index_bound(batcher)


def test_a_million_offsets_completed_in_order_leave_nothing_behind() -> None:
    tracker = OffsetTracker()
    track, complete = tracker.track, tracker.complete
    for offset in range(MILLION):
        track("requests", 0, offset)
        complete("requests", 0, offset)
    assert tracker.in_flight() == 0
    assert tracker.pending_commits() == {("requests", 0): MILLION}
    tracker.mark_committed(tracker.pending_commits())
    watermark = tracker._partitions[("requests", 0)]
    assert (len(watermark._in_order), len(watermark._completed)) == (0, 0)


def test_a_million_offsets_completed_out_of_order_stay_bounded_by_the_window() -> None:
    rng = random.Random(7)
    tracker = OffsetTracker()
    window = 4096  # the worker's max_in_flight_records
    watermark: PartitionWatermark | None = None
    offsets = list(range(0, 2 * MILLION, 2))  # every other offset: compacted gaps
    for start in range(0, len(offsets), window):
        block = offsets[start : start + window]
        for offset in block:
            tracker.track("requests", 3, offset)
        watermark = tracker._partitions[("requests", 3)]
        assert tracker.in_flight() == len(block)
        rng.shuffle(block)
        for position, offset in enumerate(block):
            tracker.complete("requests", 3, offset)
            assert len(watermark._completed) <= window
            if position % 512 == 0:
                assert tracker.in_flight() == len(block) - position - 1
        commits = tracker.pending_commits()
        assert commits == {("requests", 3): max(block) + 1}
        tracker.mark_committed(commits)
        assert (len(watermark._in_order), len(watermark._completed)) == (0, 0)
    assert watermark is not None
    assert watermark.committable == 2 * MILLION - 1
    assert tracker.in_flight() == 0


def test_completions_of_offsets_not_in_flight_change_nothing() -> None:
    tracker = OffsetTracker()
    for offset in range(10, 20):
        tracker.track("requests", 0, offset)
    for offset in range(10, 15):
        tracker.complete("requests", 0, offset)
    watermark = tracker._partitions[("requests", 0)]
    for _ in range(1000):  # a duplicate outcome, a late one of an earlier assignment
        tracker.complete("requests", 0, 12)
        tracker.complete("requests", 0, 3)
        tracker.complete("requests", 0, 10_000)
    assert tracker.in_flight() == 5
    assert len(watermark._completed) == 0
    assert watermark.committable == 15
    for offset in range(15, 20):
        tracker.complete("requests", 0, offset)
    assert (tracker.in_flight(), watermark.committable, len(watermark._completed)) == (0, 20, 0)
    tracker.complete("requests", 0, 19)  # once more, after everything is done
    assert (tracker.in_flight(), len(watermark._completed)) == (0, 0)
    tracker.track("requests", 0, 20)
    tracker.complete("requests", 0, 20)
    assert watermark.committable == 21


def test_ten_thousand_reply_topics_stay_within_the_cache() -> None:
    clock = FakeClock()
    asked: list[str] = []

    def exists(topic: str) -> bool:
        asked.append(topic)
        if topic.endswith("7"):
            raise RuntimeError("metadata request timed out")
        return topic.endswith(("0", "2", "4"))

    replies = ReplyTopics(exists, clock, capacity=1024)
    for index in range(10_000):
        topic = f"inference.replies.client-{index}"
        assert replies.cached(topic) is None
        assert replies.look_up(topic) is topic.endswith(("0", "2", "4"))
        assert len(replies) <= 1024
        clock.advance(0.001)
    assert len(replies) == 1024
    assert len(asked) == 10_000
    # The newest are remembered, the oldest forgotten; a forgotten one is asked again.
    assert replies.cached("inference.replies.client-9990") is True
    assert replies.cached("inference.replies.client-9991") is False
    assert replies.cached("inference.replies.client-0") is None
    clock.advance(REPLY_TOPIC_MISSING_S)
    assert replies.cached("inference.replies.client-9991") is None  # a missing topic expires
    assert replies.cached("inference.replies.client-9990") is True


def _record(offset: int, partition: int) -> Record:
    request = InferenceRequest.model_validate(
        {"request_id": str(uuid.uuid4()), "model": "scaler", "inputs": {"features": {"f": 1}}}
    )
    return Record(
        message=FakeMessage(b"", partition_number=partition, offset_number=offset),
        request=request,
        row=RowInput(tensors={"x": np.zeros((1, 4), np.float32)}),
        model="scaler",
        version="1",
        lane=Lane.REALTIME,
        received_at=0.0,
        reply_to=None,
        epoch=partition,
    )


def test_dispatcher_requeue_drops_records_of_partitions_that_moved_on() -> None:
    clock = FakeClock()
    dispatcher = Dispatcher(WorkerSettings(max_batch_size=8), {"scaler": "triton"}, clock)
    for offset in range(8):
        dispatcher.add(_record(offset, partition=offset % 2), deadline=clock.now + DAY_S)
    (dispatch,), expired = dispatcher.take(lambda _: False)
    assert expired == []
    assert dispatcher.in_flight == {"triton": 1}
    dispatcher.finished(dispatch)
    kept = dispatcher.requeue(
        dispatch.batch.key, dispatch.batch.items, current=lambda r: r.partition_key[1] == 0
    )
    assert kept == 4
    assert len(dispatcher) == 4
    assert dispatcher.batcher.deadline_index_size <= 2 * 4 + BATCH
    (again,), _ = dispatcher.take(lambda _: False, flush=True)
    assert sorted(p.item.offset for p in again.batch.items) == [0, 2, 4, 6]
    assert dispatcher.requeue(again.batch.key, again.batch.items, current=lambda _: False) == 0
    assert len(dispatcher) == 0
    items: tuple[Pending[Record], ...] = ()
    assert dispatcher.requeue(("scaler", "1"), items, current=lambda _: True) == 0
