"""The micro-batcher: one queue per (model, version), flushed at a size or a wait, whichever first.

Pure and clock-driven: the worker adds items and asks which batches are due; nothing here
sleeps or does I/O. Real-time items always go ahead of bulk (batch-job) items for the same
key; within a lane, higher-priority items go first (first come, first served among equals);
and an item whose deadline has passed is handed back as expired instead of being sent.
"""

from __future__ import annotations

import bisect
import heapq
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Generic, TypeVar

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)


class Lane(IntEnum):
    """Lower value is served first."""

    REALTIME = 0
    BULK = 1


@dataclass(frozen=True)
class Pending(Generic[T]):
    item: T
    enqueued_at: float
    deadline: float | None = None
    """Monotonic time after which the item must not be sent; ``None`` for no deadline."""
    lane: Lane = Lane.REALTIME
    priority: int = 0
    """Higher is served first within its lane (``InferenceRequest.priority``, 0-9)."""


@dataclass(frozen=True)
class Batch(Generic[K, T]):
    key: K
    items: tuple[Pending[T], ...]
    formed_at: float

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class _Queues(Generic[T]):
    lanes: dict[Lane, deque[Pending[T]]] = field(
        default_factory=lambda: {lane: deque() for lane in Lane}
    )

    def __len__(self) -> int:
        return sum(len(queue) for queue in self.lanes.values())

    def oldest(self) -> float:
        return min(_oldest_in(queue) for queue in self.lanes.values() if queue)


class MicroBatcher(Generic[K, T]):
    """Collects items per key; :meth:`take_due` returns the batches ready to send.

    A key's batch is due when it holds ``max_batch_size`` items or its oldest item has waited
    ``max_wait_s``. Every returned batch holds at least one item and at most
    ``max_batch_size``.
    """

    def __init__(
        self,
        max_batch_size: int,
        max_wait_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._queues: dict[K, _Queues[T]] = {}
        # Items with a deadline, earliest first, so expiry costs nothing when none is due.
        self._deadlines: list[tuple[float, int, K, Pending[T]]] = []
        self._queued_with_deadline: set[int] = set()
        self._sequence = 0

    def __len__(self) -> int:
        return sum(len(queues) for queues in self._queues.values())

    @property
    def deadline_index_size(self) -> int:
        """Entries in the deadline index: at most about twice the queued items with deadlines."""
        return len(self._deadlines)

    def has_lane(self, lane: Lane) -> bool:
        """Whether any item of ``lane`` is waiting (bulk work yields while real-time waits)."""
        return any(queues.lanes[lane] for queues in self._queues.values())

    def add(
        self,
        key: K,
        item: T,
        *,
        lane: Lane = Lane.REALTIME,
        deadline: float | None = None,
        priority: int = 0,
    ) -> None:
        queues = self._queues.get(key)
        if queues is None:
            queues = self._queues[key] = _Queues()
        pending = Pending(item, self._clock(), deadline, lane, priority)
        queue = queues.lanes[lane]
        if not queue or queue[-1].priority >= priority:
            queue.append(pending)
        else:  # queues are kept in descending priority, first come first served among equals
            queue.insert(bisect.bisect_right(queue, -priority, key=_urgency), pending)
        self._watch_deadline(key, pending)

    def _watch_deadline(self, key: K, pending: Pending[T]) -> None:
        if pending.deadline is not None:
            self._sequence += 1
            heapq.heappush(self._deadlines, (pending.deadline, self._sequence, key, pending))
            self._queued_with_deadline.add(id(pending))

    def next_due_in(self) -> float | None:
        """Seconds until the next partial batch is due (0 if one is); ``None`` when empty."""
        now = self._clock()
        waits = [
            0.0 if len(queues) >= self.max_batch_size else queues.oldest() + self.max_wait_s - now
            for queues in self._queues.values()
            if len(queues)
        ]
        return max(0.0, min(waits)) if waits else None

    def take_due(
        self,
        limit: int | None = None,
        *,
        flush: bool = False,
        accept: Callable[[K], bool] | None = None,
        accept_bulk_only: Callable[[K], bool] | None = None,
        accept_partial: Callable[[K, Lane], bool] | None = None,
    ) -> tuple[list[Batch[K, T]], list[Pending[T]]]:
        """Remove and return up to ``limit`` due batches, plus every expired item found.

        ``flush`` treats every non-empty queue as due (used when draining on shutdown);
        ``accept`` skips keys that cannot be served now (their backend's breaker is open);
        ``accept_bulk_only`` additionally decides for keys whose next batch would hold bulk
        items only (no real-time item is waiting there); ``accept_partial`` for keys whose
        next batch would not be full (due by its wait, not its size), given that batch's lane.
        Keys whose oldest item waited longest go first, so no key starves another.
        """
        now = self._clock()
        expired = self._drop_expired(now)

        def acceptable(key: K, queues: _Queues[T]) -> bool:
            if accept is not None and not accept(key):
                return False
            if accept_partial is not None and not flush:
                lane, queued = self._next_lane(queues)
                if queued < self.max_batch_size and not accept_partial(key, lane):
                    return False
            bulk_next = not queues.lanes[Lane.REALTIME]
            return not bulk_next or accept_bulk_only is None or accept_bulk_only(key)

        due_keys = sorted(
            (
                key
                for key, queues in self._queues.items()
                if self._is_due(queues, now, flush) and acceptable(key, queues)
            ),
            key=lambda key: self._queues[key].oldest(),
        )
        batches: list[Batch[K, T]] = []
        for key in due_keys:
            queues = self._queues[key]
            while (
                self._is_due(queues, now, flush)
                and (limit is None or len(batches) < limit)
                and acceptable(key, queues)
            ):
                batches.append(Batch(key, self._pop(queues), now))
        self._queues = {key: queues for key, queues in self._queues.items() if len(queues)}
        return batches, expired

    def requeue(self, key: K, items: Sequence[Pending[T]]) -> None:
        """Put items of a batch that could not be served back at the front of their queue."""
        queues = self._queues.get(key)
        if queues is None:
            queues = self._queues[key] = _Queues()
        for pending in reversed(items):
            queue = queues.lanes[pending.lane]
            # Ahead of the items of its priority, as it was, yet behind more urgent newcomers.
            queue.insert(bisect.bisect_left(queue, -pending.priority, key=_urgency), pending)
            self._watch_deadline(key, pending)
        self._compact_deadlines()

    def discard(self, predicate: Callable[[T], bool]) -> list[Pending[T]]:
        """Remove and return every queued item matching ``predicate`` (revoked partitions)."""
        removed: list[Pending[T]] = []
        for queues in self._queues.values():
            for lane, queue in queues.lanes.items():
                removed.extend(p for p in queue if predicate(p.item))
                queues.lanes[lane] = deque(p for p in queue if not predicate(p.item))
        for pending in removed:
            self._queued_with_deadline.discard(id(pending))
        self._queues = {key: queues for key, queues in self._queues.items() if len(queues)}
        self._compact_deadlines()
        return removed

    def _is_due(self, queues: _Queues[T], now: float, flush: bool) -> bool:
        if not len(queues):
            return False
        return (
            flush or len(queues) >= self.max_batch_size or now - queues.oldest() >= self.max_wait_s
        )

    @staticmethod
    def _next_lane(queues: _Queues[T]) -> tuple[Lane, int]:
        """The lane the next batch comes from, and how many items wait in it."""
        return next((lane, len(queue)) for lane, queue in queues.lanes.items() if queue)

    def _pop(self, queues: _Queues[T]) -> tuple[Pending[T], ...]:
        """The next batch, from one lane only: real-time items first, never padded with bulk
        items, whose outcomes would have to be stored and produced before theirs."""
        queue = next(queue for queue in queues.lanes.values() if queue)
        taken: list[Pending[T]] = []
        while queue and len(taken) < self.max_batch_size:
            pending = queue.popleft()
            if pending.deadline is not None:
                self._queued_with_deadline.discard(id(pending))
            taken.append(pending)
        self._compact_deadlines()
        return tuple(taken)

    def _compact_deadlines(self) -> None:
        """Drop index entries of items no longer queued (served, discarded, requeued twice).

        Served items would otherwise stay in the index until their deadline passed; batch-job
        records carry a deadline a day away, so a day of served records would stay in memory.
        Rebuilding once stale entries outnumber live ones keeps the index at most about twice
        the queued items, at an amortised constant cost per item.
        """
        live = len(self._queued_with_deadline)
        if len(self._deadlines) <= 2 * live + 64:
            return
        kept: dict[int, tuple[float, int, K, Pending[T]]] = {}
        for entry in self._deadlines:  # a requeued item is indexed once more: keep one
            if id(entry[3]) in self._queued_with_deadline:
                kept.setdefault(id(entry[3]), entry)
        self._deadlines = list(kept.values())
        heapq.heapify(self._deadlines)

    def _drop_expired(self, now: float) -> list[Pending[T]]:
        expired: list[Pending[T]] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, key, pending = heapq.heappop(self._deadlines)
            if id(pending) not in self._queued_with_deadline:
                continue  # already batched, discarded, or watched again after a requeue
            self._queued_with_deadline.discard(id(pending))
            queue = self._queues[key].lanes[pending.lane]
            self._queues[key].lanes[pending.lane] = deque(p for p in queue if p is not pending)
            expired.append(pending)
        return expired


def _urgency(pending: Pending[Any]) -> int:
    """Sort key of a lane's queue: more urgent items sort first."""
    return -pending.priority


def _oldest_in(queue: deque[Pending[T]]) -> float:
    """When the longest-waiting item of a priority-ordered queue arrived: the first item of
    one of its priorities (at most ten to look at; one when all share a priority)."""
    oldest = queue[0].enqueued_at
    index = 0
    while queue[index].priority != queue[-1].priority:
        index = bisect.bisect_right(queue, -queue[index].priority, lo=index, key=_urgency)
        oldest = min(oldest, queue[index].enqueued_at)
    return oldest
