"""Dispatcher: accepted records in, micro-batches that may be sent now out.

Pure and clock-driven. It owns the micro-batcher, the count of backend calls in flight per
backend (real-time and batch-job), and the governor that paces batch-job work by real-time
latency. Which batches go out is its whole policy:

1. at most ``workers.max_in_flight_batches`` calls per backend, none to an open breaker;
2. batch-job batches only within their own cap and when the governor allows (caps that
   apply only while real-time traffic flows: a batch job alone gets the whole worker);
3. optionally, at most ``workers.max_in_flight_partial_batches`` real-time calls not full.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from pipeline.batching import Batch, Lane, MicroBatcher, Pending
from pipeline.batching.governor import BulkGovernor
from pipeline.settings import WorkerSettings
from workers.inference.intake import Record

BatchKey = tuple[str, str | None]
"""(model, version)."""
REALTIME_ACTIVE_S = 1.0
"""Real-time traffic counts as flowing for this long after its last record arrived."""


@dataclass(frozen=True, slots=True)
class Dispatch:
    """A batch sent to a backend: release it with :meth:`Dispatcher.finished` when done."""

    batch: Batch[BatchKey, Record]
    backend: str
    bulk_only: bool


class Dispatcher:
    def __init__(
        self,
        settings: WorkerSettings,
        backend_of: Mapping[str, str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._backend_of = dict(backend_of)
        self._clock = clock
        self.batcher: MicroBatcher[BatchKey, Record] = MicroBatcher(
            settings.max_batch_size, settings.max_wait_ms / 1000.0, clock
        )
        self.governor = BulkGovernor(
            clock,
            target_s=settings.realtime_latency_target_ms / 1000.0,
            active_window_s=REALTIME_ACTIVE_S,
        )
        backends = set(self._backend_of.values())
        self.in_flight: dict[str, int] = dict.fromkeys(backends, 0)
        self.in_flight_bulk: dict[str, int] = dict.fromkeys(backends, 0)

    def __len__(self) -> int:
        return len(self.batcher)

    def add(self, record: Record, deadline: float | None) -> None:
        if record.lane is Lane.REALTIME:
            self.governor.realtime_arrived()
        self.batcher.add(
            (record.model, record.version),
            record,
            lane=record.lane,
            deadline=deadline,
            priority=record.request.priority or 0,
        )

    def next_due_in(self) -> float | None:
        return self.batcher.next_due_in()

    def realtime_waiting(self) -> bool:
        return self.batcher.has_lane(Lane.REALTIME)

    def take(
        self, breaker_open: Callable[[str], bool], *, flush: bool = False
    ) -> tuple[list[Dispatch], list[Record]]:
        """Every batch that may go out now (slots taken), and every record that expired."""
        limit = self._settings.max_in_flight_batches
        partial_limit = self._settings.max_in_flight_partial_batches
        bulk_limit = self._bulk_batch_limit()

        def servable(key: BatchKey) -> bool:
            return self.in_flight[self._backend_of[key[0]]] < limit and not breaker_open(key[0])

        def partial_servable(key: BatchKey, lane: Lane) -> bool:
            if lane is Lane.BULK:
                return True  # batch-job calls have their own limit (bulk_servable)
            backend = self._backend_of[key[0]]
            realtime_calls = self.in_flight[backend] - self.in_flight_bulk[backend]
            return partial_limit is None or realtime_calls < partial_limit

        def bulk_servable(key: BatchKey) -> bool:
            return (
                self.in_flight_bulk[self._backend_of[key[0]]] < bulk_limit
                and self.governor.bulk_wait_s() == 0.0
            )

        dispatches: list[Dispatch] = []
        expired: list[Record] = []
        while True:
            batches, gone = self.batcher.take_due(
                limit=1,
                flush=flush,
                accept=servable,
                accept_bulk_only=bulk_servable,
                accept_partial=None if partial_limit is None else partial_servable,
            )
            expired.extend(pending.item for pending in gone)
            if not batches:
                return dispatches, expired
            batch = batches[0]
            backend = self._backend_of[batch.key[0]]
            bulk_only = all(pending.lane is Lane.BULK for pending in batch.items)
            self.in_flight[backend] += 1
            if bulk_only:
                self.in_flight_bulk[backend] += 1
                self.governor.bulk_dispatched()
            dispatches.append(Dispatch(batch, backend, bulk_only))

    def finished(self, dispatch: Dispatch) -> None:
        self.in_flight[dispatch.backend] -= 1
        if dispatch.bulk_only:
            self.in_flight_bulk[dispatch.backend] -= 1

    def requeue(
        self, key: BatchKey, items: Sequence[Pending[Record]], current: Callable[[Record], bool]
    ) -> int:
        """Put back items that could not be served now; drop those whose partition moved on.

        Returns how many were put back. A record of a revoked partition is never requeued:
        its new owner serves it, and serving it here too would answer it twice.
        """
        kept = [pending for pending in items if current(pending.item)]
        if kept:
            self.batcher.requeue(key, kept)
        return len(kept)

    def discard(self, partitions: Collection[tuple[str, int]]) -> list[Record]:
        """Remove every queued record of ``partitions`` (revoked or lost)."""
        wanted = set(partitions)
        removed = self.batcher.discard(lambda record: record.partition_key in wanted)
        return [pending.item for pending in removed]

    def bulk_record_cap(self) -> int | None:
        """Batch-job records that may be in flight: the fair ``max_in_flight_bulk_records``
        while real-time traffic flows; ``None`` (no cap of their own, only the worker's
        ``max_in_flight_records``) once none has arrived for ``REALTIME_ACTIVE_S``, so a batch
        job alone runs at the worker's full speed. The first real-time record brings the fair
        cap back at once."""
        if self.governor.realtime_active():
            return self._settings.max_in_flight_bulk_records
        return None

    def _bulk_batch_limit(self) -> int:
        settings = self._settings
        if self.governor.realtime_active():
            return settings.bulk_batches_beside_realtime
        return max(settings.max_in_flight_batches - settings.realtime_reserved_batches, 1)
