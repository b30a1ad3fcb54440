"""A circuit breaker per backend endpoint and model: closed, open, half-open.

Closed: calls flow; outcomes fill a sliding window of the last ``window_size`` calls. Once the
window holds ``minimum_calls``, a failure rate or slow-call rate at or above its threshold
opens the breaker. Open: calls are refused for ``open_wait_s``, then the breaker turns
half-open. Half-open: ``probe_calls`` calls are let through; when all have reported, the
breaker closes if their rates are under the thresholds, else it opens again.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, kw_only=True)
class BreakerConfig:
    window_size: int = 20
    minimum_calls: int = 10
    failure_rate_threshold: float = 0.5
    slow_call_threshold_s: float = 5.0
    slow_call_rate_threshold: float = 0.8
    open_wait_s: float = 5.0
    probe_calls: int = 3

    def __post_init__(self) -> None:
        if not 1 <= self.minimum_calls <= self.window_size:
            raise ValueError("need 1 <= minimum_calls <= window_size")
        for name in ("failure_rate_threshold", "slow_call_rate_threshold"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1]")
        if self.probe_calls < 1 or self.open_wait_s < 0 or self.slow_call_threshold_s <= 0:
            raise ValueError("need probe_calls >= 1, open_wait_s >= 0, slow_call_threshold_s > 0")


StateListener = Callable[[str, BreakerState, BreakerState], None]


@dataclass(frozen=True)
class _Outcome:
    failed: bool
    slow: bool


class CircuitBreaker:
    """One breaker; not thread-safe (each worker event loop owns its breakers)."""

    def __init__(
        self,
        name: str,
        config: BreakerConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_state_change: StateListener | None = None,
    ) -> None:
        self.name = name
        self.config = config or BreakerConfig()
        self._clock = clock
        self._on_state_change = on_state_change
        self._state = BreakerState.CLOSED
        self._window: deque[_Outcome] = deque(maxlen=self.config.window_size)
        self._opened_at = 0.0
        self._probes_started = 0
        self._probe_outcomes: list[_Outcome] = []

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self.retry_after() == 0.0:
            self._transition(BreakerState.HALF_OPEN)
        return self._state

    def retry_after(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when it would now)."""
        if self._state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.config.open_wait_s - self._clock())

    def allow(self) -> bool:
        """Whether a call may start now; in half-open this takes one of the probe permits."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN:
            return False
        if self._probes_started < self.config.probe_calls:
            self._probes_started += 1
            return True
        return False

    def record_success(self, duration_s: float) -> None:
        self._record(_Outcome(failed=False, slow=duration_s >= self.config.slow_call_threshold_s))

    def record_failure(self, duration_s: float) -> None:
        self._record(_Outcome(failed=True, slow=duration_s >= self.config.slow_call_threshold_s))

    def _record(self, outcome: _Outcome) -> None:
        state = self.state
        if state is BreakerState.OPEN:
            return  # a call that started before the breaker opened; its verdict is already in
        if state is BreakerState.HALF_OPEN:
            self._probe_outcomes.append(outcome)
            if len(self._probe_outcomes) >= self.config.probe_calls:
                breached = self._breached(self._probe_outcomes)
                self._transition(BreakerState.OPEN if breached else BreakerState.CLOSED)
            return
        self._window.append(outcome)
        if len(self._window) >= self.config.minimum_calls and self._breached(self._window):
            self._transition(BreakerState.OPEN)

    def _breached(self, outcomes: deque[_Outcome] | list[_Outcome]) -> bool:
        total = len(outcomes)
        failure_rate = sum(o.failed for o in outcomes) / total
        slow_rate = sum(o.slow for o in outcomes) / total
        return (
            failure_rate >= self.config.failure_rate_threshold
            or slow_rate >= self.config.slow_call_rate_threshold
        )

    def _transition(self, new_state: BreakerState) -> None:
        old_state = self._state
        self._state = new_state
        self._window.clear()
        self._probes_started = 0
        self._probe_outcomes = []
        if new_state is BreakerState.OPEN:
            self._opened_at = self._clock()
        if self._on_state_change is not None and old_state is not new_state:
            self._on_state_change(self.name, old_state, new_state)
