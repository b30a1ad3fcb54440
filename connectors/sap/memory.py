"""A bounded memory of keys: the newest ``max_keys`` seen within ``max_age``. Pure.

The connector's dedupe memories (events handled, results written) used to be sets that grew
for as long as the process ran. They are only a fast path: across restarts the requests and
invalidations topics are the record (read back over the dedupe window at start-up), and a
written result is recognised by the entity's marker field. So forgetting the oldest keys
costs at most a lookup, never a duplicate, as long as the bound covers the window in which
a broker redelivers (Event Mesh retries for hours, not days). ``forgotten`` counts the keys
dropped, so an operator sees when the bound is reached (``/healthz``).

This has the same shape as ``connectors.common.dedupe.RecentKeys`` (``add(key) -> bool``,
injected clock); it stays here until that one is on main.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class BoundedKeys:
    def __init__(
        self,
        *,
        max_keys: int = 200_000,
        max_age_s: float = 86_400.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_keys < 1 or max_age_s <= 0:
            raise ValueError("a memory needs room for one key and a positive age")
        self.max_keys = max_keys
        self.max_age_s = max_age_s
        self._clock = clock
        self._keys: OrderedDict[str, float] = OrderedDict()
        self.forgotten = 0

    def add(self, key: str) -> bool:
        """Remember ``key``; ``True`` when it was not remembered already."""
        self._expire()
        known = key in self._keys
        self._keys[key] = self._clock()
        self._keys.move_to_end(key)
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)
            self.forgotten += 1
        return not known

    def __contains__(self, key: object) -> bool:
        self._expire()
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def _expire(self) -> None:
        oldest = self._clock() - self.max_age_s
        while self._keys:
            key, seen = next(iter(self._keys.items()))
            if seen >= oldest:
                return
            del self._keys[key]
            self.forgotten += 1
