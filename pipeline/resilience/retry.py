"""Exponential backoff with full jitter, bounded in attempts, in total time and by deadline."""

from __future__ import annotations

import random as _random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """When to try a transient failure again.

    Full jitter (a uniform draw between zero and the exponential cap) spreads the retries of
    many workers hitting one recovering backend, instead of sending them in waves.
    """

    max_attempts: int = 5
    base_delay_s: float = 0.05
    max_delay_s: float = 2.0
    max_elapsed_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.base_delay_s <= 0 or self.max_delay_s < self.base_delay_s:
            raise ValueError("need 0 < base_delay_s <= max_delay_s")
        if self.max_elapsed_s <= 0:
            raise ValueError(f"max_elapsed_s must be > 0, got {self.max_elapsed_s}")

    def backoff_cap(self, attempts_made: int) -> float:
        """The upper bound of the wait after ``attempts_made`` failed attempts."""
        return float(min(self.max_delay_s, self.base_delay_s * 2 ** (attempts_made - 1)))

    def next_delay(
        self,
        attempts_made: int,
        elapsed_s: float,
        time_left_s: float | None = None,
        random: Callable[[], float] = _random.random,
        not_before_s: float | None = None,
    ) -> float | None:
        """Seconds to wait before the next attempt, or ``None`` to give up.

        ``attempts_made`` counts attempts so far (>= 1); ``elapsed_s`` is the time since the
        first attempt; ``time_left_s`` is what remains of the request's deadline, if any;
        ``not_before_s`` is the backend's own ``Retry-After``, a floor for the wait. A retry
        that could not start before the budget or the deadline runs out is not made.
        """
        if attempts_made >= self.max_attempts:
            return None
        delay = random() * self.backoff_cap(attempts_made)
        if not_before_s is not None:
            delay = max(delay, not_before_s)
        if elapsed_s + delay >= self.max_elapsed_s:
            return None
        if time_left_s is not None and delay >= time_left_s:
            return None
        return delay
