"""A bounded memory of recently published keys: the connector's defence against publishing one
source event twice. Pure, with an injected clock.

Bounded two ways: at most ``max_keys`` keys (the oldest go first) and none older than
``max_age_s``. What falls out of the memory is older than any redelivery Salesforce makes
within a subscription; across restarts the replay-id checkpoint bounds what is read again,
and the memory is seeded from the tail of the topics the connector wrote (see the runner).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class RecentKeys:
    def __init__(
        self,
        *,
        max_keys: int = 100_000,
        max_age_s: float = 7 * 24 * 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_keys < 1 or max_age_s <= 0:
            raise ValueError("need max_keys >= 1 and max_age_s > 0")
        self.max_keys = max_keys
        self.max_age_s = max_age_s
        self._clock = clock
        self._keys: OrderedDict[str, float] = OrderedDict()
        self.evicted = 0
        """Keys dropped to stay within the bounds (a metric: a high rate means the bounds
        are too small for the traffic)."""

    def __len__(self) -> int:
        self._expire()
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        self._expire()
        return key in self._keys

    def add(self, key: str) -> bool:
        """Remember ``key``; ``True`` if it was not remembered yet."""
        self._expire()
        new = key not in self._keys
        self._keys[key] = self._clock()
        self._keys.move_to_end(key)
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)
            self.evicted += 1
        return new

    def _expire(self) -> None:
        oldest_allowed = self._clock() - self.max_age_s
        while self._keys:
            key, added = next(iter(self._keys.items()))
            if added >= oldest_allowed:
                return
            del self._keys[key]
            self.evicted += 1
