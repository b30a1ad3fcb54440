"""The org's API limit as a breaker: pure logic with an injected clock.

Salesforce answers ``403 REQUEST_LIMIT_EXCEEDED`` when the org's rolling 24-hour API request
allowance (shared by every integration of the org) is spent. Retrying within milliseconds only
spends what is left of it faster, so one refusal opens the breaker for the whole org: no REST
call of either loop goes out until it closes. It stays open for at least ``floor_s`` seconds,
doubling with each refusal in a row up to ``ceiling_s``; the first call that gets through
closes it and resets the doubling.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class LimitStats:
    refusals: int = 0
    """``REQUEST_LIMIT_EXCEEDED`` answers received."""
    opened: int = 0
    """Times the breaker opened from closed."""
    waited_s: float = 0.0
    """Seconds calls were held back while the breaker was open."""


class OrgLimitBreaker:
    """Shared by every REST call to one org (thread-safe: both loops call through it)."""

    def __init__(
        self,
        *,
        floor_s: float = 60.0,
        ceiling_s: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if floor_s < 1.0:
            raise ValueError(f"floor_s is in seconds and at least 1, got {floor_s}")
        if ceiling_s < floor_s:
            raise ValueError("ceiling_s must be at least floor_s")
        self.floor_s = floor_s
        self.ceiling_s = ceiling_s
        self._clock = clock
        self._lock = threading.Lock()
        self._open_until = 0.0
        self._refusals_in_a_row = 0
        self.stats = LimitStats()

    @property
    def is_open(self) -> bool:
        return self.wait_s() > 0.0

    def wait_s(self) -> float:
        """Seconds until calls may go out again (0 when closed)."""
        with self._lock:
            return max(0.0, self._open_until - self._clock())

    def refused(self) -> float:
        """A call met ``REQUEST_LIMIT_EXCEEDED``: open (or keep open, longer) and return how
        long calls now wait."""
        with self._lock:
            now = self._clock()
            if self._open_until <= now and self._refusals_in_a_row == 0:
                self.stats.opened += 1
            self.stats.refusals += 1
            hold = min(self.ceiling_s, self.floor_s * 2**self._refusals_in_a_row)
            self._refusals_in_a_row += 1
            self._open_until = max(self._open_until, now + hold)
            return self._open_until - now

    def succeeded(self) -> None:
        """A call got through: the allowance is back, the doubling starts over."""
        with self._lock:
            self._refusals_in_a_row = 0

    def held(self, seconds: float) -> None:
        with self._lock:
            self.stats.waited_s += seconds
