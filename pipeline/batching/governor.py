"""How fast batch-job work may go while real-time traffic flows. Pure; the clock is passed in.

Capping how many bulk batches are in flight protects the backend, but not the worker's own CPU:
on a busy host, a worker that decodes, encodes and stores bulk records at full speed makes every
real-time request queue behind that work. So while real-time requests keep arriving, the
governor paces bulk-only batches by their observed effect (AIMD, as TCP does with a window):

- every real-time request's latency (publish to outcome) above ``target_s`` doubles the pause
  between bulk batches (from ``min_step_s`` up to ``max_interval_s``);
- every one within target shrinks that pause by ``recovery`` (multiplicative). One breach
  undoes about a hundred comfortable requests (0.993^99 = 1/2), so the pace settles where
  about 1 % of real-time requests exceed the target: the governor steers the p99, not the
  median;
- with no real-time request for ``active_window_s``, bulk work is not paced at all; when
  real-time requests come back, the pause starts at ``resume_interval_s`` at least.
"""

from __future__ import annotations

from collections.abc import Callable


class BulkGovernor:
    def __init__(
        self,
        clock: Callable[[], float],
        *,
        target_s: float,
        active_window_s: float = 1.0,
        min_step_s: float = 0.005,
        max_interval_s: float = 1.0,
        recovery: float = 0.993,
        resume_interval_s: float = 0.1,
    ) -> None:
        self._clock = clock
        self.target_s = target_s
        self.active_window_s = active_window_s
        self.min_step_s = min_step_s
        self.max_interval_s = max_interval_s
        self.recovery = recovery
        self.resume_interval_s = resume_interval_s
        self.interval_s = 0.0
        self._last_realtime = float("-inf")
        self._last_bulk = float("-inf")

    def realtime_arrived(self) -> None:
        if not self.realtime_active():
            # Real-time traffic is back: bulk work starts paced rather than finding out by
            # breaching the target, and speeds up from there if comfortable.
            self.interval_s = max(self.interval_s, self.resume_interval_s)
        self._last_realtime = self._clock()

    def realtime_active(self) -> bool:
        return self._clock() - self._last_realtime < self.active_window_s

    def observe_realtime(self, latency_s: float) -> None:
        if latency_s > self.target_s:
            self.interval_s = min(max(self.interval_s * 2, self.min_step_s), self.max_interval_s)
        else:
            self.interval_s *= self.recovery
            if self.interval_s < self.min_step_s / 2:
                self.interval_s = 0.0

    def bulk_wait_s(self) -> float:
        """Seconds until a bulk-only batch may go (0: now)."""
        if not self.realtime_active() or self.interval_s == 0.0:
            return 0.0
        return max(self._last_bulk + self.interval_s - self._clock(), 0.0)

    def bulk_dispatched(self) -> None:
        self._last_bulk = self._clock()
