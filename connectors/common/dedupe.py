"""A bounded memory of recently seen keys, for skipping events a source delivers twice.

Sources deliver at least once (a webhook retried, a CDC stream replayed from a checkpoint),
and a delivery can carry keys chosen by whoever sends it. So the memory holds at most
``max_keys`` keys and forgets each one ``max_age_s`` after it was first seen, whichever
comes first, oldest first; what it costs never depends on the keys: each key is kept as a
16-byte BLAKE2b digest, so a megabyte-long key takes the room of a short one.

Forgetting is safe by design: a key forgotten and seen again is treated as new, and the
request it leads to has the same deterministic id (``request_id_for``), so the worst case
is a repeated request, never a lost one. The memory is pure: time comes from an injected
clock, and metrics are an optional hook.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

_DIGEST_BYTES = 16


class DedupeMetrics:
    """Prometheus metrics of every :class:`RecentKeys` of a process, on one registry.

    One instance per registry (metric names are registered once); each memory reports under
    its own ``memory`` label, so two memories may not share a name.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.keys = Gauge(
            "sluiceway_connector_dedupe_keys",
            "Keys a connector's duplicate memory holds now (bounded by its max_keys)",
            ["memory"],
            registry=self.registry,
        )
        self.evicted = Counter(
            "sluiceway_connector_dedupe_evicted",
            "Keys forgotten by a duplicate memory: it was full (count) or they aged out (age)",
            ["memory", "reason"],
            registry=self.registry,
        )
        self._names: set[str] = set()

    def claim(self, name: str) -> None:
        """Reserve ``name`` for one memory; a second memory of the same name is refused."""
        if name in self._names:
            raise ValueError(f"a duplicate memory named {name!r} already reports here")
        self._names.add(name)


class RecentKeys:
    """Keys seen in the last ``max_age_s`` seconds, at most ``max_keys`` of them.

    ``add`` and ``in`` cost O(1) amortized: keys sit in first-seen order, so the expired and
    the surplus ones are always at the front. A key seen again keeps its first-seen time
    (a source repeating an event forever does not keep it alive forever).
    """

    def __init__(
        self,
        *,
        max_keys: int,
        max_age_s: float,
        clock: Callable[[], float] = time.monotonic,
        name: str = "default",
        metrics: DedupeMetrics | None = None,
    ) -> None:
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1:
            raise ValueError(f"max_keys must be a positive integer, got {max_keys!r}")
        if not (isinstance(max_age_s, int | float) and math.isfinite(max_age_s) and max_age_s > 0):
            raise ValueError(f"max_age_s must be a positive finite number, got {max_age_s!r}")
        self.max_keys = max_keys
        self.max_age_s = float(max_age_s)
        self.name = name
        self.evicted = 0
        """Keys forgotten so far, for either bound (not counting :meth:`discard`)."""
        self._clock = clock
        self._first_seen: OrderedDict[bytes, float] = OrderedDict()
        self._keys_gauge: Gauge | None = None
        self._evicted_for_count: Counter | None = None
        self._evicted_for_age: Counter | None = None
        if metrics is not None:
            metrics.claim(name)
            self._keys_gauge = metrics.keys.labels(memory=name)
            self._evicted_for_count = metrics.evicted.labels(memory=name, reason="count")
            self._evicted_for_age = metrics.evicted.labels(memory=name, reason="age")
            self._keys_gauge.set(0)

    def add(self, key: str) -> bool:
        """Remember ``key``; True if it is new, False if it was seen within the bounds."""
        now = self._clock()
        self._forget_aged(now)
        digest = _digest(key)
        if digest in self._first_seen:
            return False
        self._first_seen[digest] = now
        if len(self._first_seen) > self.max_keys:
            self._first_seen.popitem(last=False)
            self._count_evicted(1, self._evicted_for_count)
        self._report_size()
        return True

    def discard(self, key: str) -> bool:
        """Forget ``key`` at once (its event was not handled after all, so a redelivery must
        not be skipped); True if it was remembered."""
        removed = self._first_seen.pop(_digest(key), None) is not None
        if removed:
            self._report_size()
        return removed

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        self._forget_aged(self._clock())
        return _digest(key) in self._first_seen

    def __len__(self) -> int:
        self._forget_aged(self._clock())
        return len(self._first_seen)

    def _forget_aged(self, now: float) -> None:
        # A key exactly max_age_s old is forgotten: the bound is "younger than max_age_s".
        # A clock that steps back makes keys look younger, which only delays forgetting.
        horizon = now - self.max_age_s
        forgotten = 0
        while self._first_seen:
            oldest_seen = next(iter(self._first_seen.values()))
            if oldest_seen > horizon:
                break
            self._first_seen.popitem(last=False)
            forgotten += 1
        if forgotten:
            self._count_evicted(forgotten, self._evicted_for_age)
            self._report_size()

    def _count_evicted(self, count: int, counter: Counter | None) -> None:
        self.evicted += count
        if counter is not None:
            counter.inc(count)

    def _report_size(self) -> None:
        if self._keys_gauge is not None:
            self._keys_gauge.set(len(self._first_seen))


def _digest(key: str) -> bytes:
    # surrogatepass: a lone surrogate (from JSON "\ud800") is a legal str, and must be a
    # key like any other rather than an exception in the dedupe path.
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=_DIGEST_BYTES).digest()
