"""Liveness and readiness of a long-running process, as pure state (no I/O, injected clock).

The process reports what happens to it (its loop turned, partitions were assigned or taken
away, a backend breaker changed state, it was told to stop); ``/healthz`` and ``/readyz``
(served beside ``/metrics`` by :meth:`pipeline.metrics.WorkerMetrics.serve`) only read the
verdicts. What each means:

- **live**: the loop turned within ``stall_after_s``. A process whose loop is stuck (a
  deadlock, a call that never returns) stops turning, and only a restart helps it.
- **ready**: it holds at least one partition, its backends do not refuse every model it
  serves (a breaker open for all of them), and it is not stopping. A member with no
  partitions serves nothing; one whose every breaker is open cannot serve what it holds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

DEFAULT_STALL_AFTER_S = 60.0
"""Longer than the worker's drain timeout (30 s by default): a draining worker stops turning
its loop, and must not be killed for it."""


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reasons: tuple[str, ...] = ()
    """Why not (empty when ``ok``): one short line each, shown in the HTTP answer."""

    def text(self) -> str:
        return "ok\n" if self.ok else "".join(f"{reason}\n" for reason in self.reasons)


class HealthState:
    """Thread-safe: the process writes from its loop, the HTTP server reads from its thread."""

    def __init__(
        self,
        models: Iterable[str] = (),
        *,
        clock: Callable[[], float] = time.monotonic,
        stall_after_s: float = DEFAULT_STALL_AFTER_S,
    ) -> None:
        if stall_after_s <= 0:
            raise ValueError(f"stall_after_s must be positive, got {stall_after_s}")
        self._clock = clock
        self._stall_after_s = stall_after_s
        self._lock = threading.Lock()
        # A process that has not turned its loop yet is starting, not stuck: it gets one
        # stall interval from its creation.
        self._last_turn = clock()
        self._models = tuple(dict.fromkeys(models))
        self._partitions: dict[str, int] = {}
        self._open_breakers: dict[str, str] = {}
        """Breaker name -> the model it guards, for the breakers open right now."""
        self._stopping = False

    # ------------------------------------------------------------------ reported

    def loop_turned(self) -> None:
        with self._lock:
            self._last_turn = self._clock()

    def assignment(self, member: str, partitions: int) -> None:
        """``member`` (a model's group member, or any named source) now holds ``partitions``."""
        if partitions < 0:
            raise ValueError(f"partitions must not be negative, got {partitions}")
        with self._lock:
            self._partitions[member] = partitions

    def breaker_changed(self, name: str, model: str, *, is_open: bool) -> None:
        with self._lock:
            if is_open:
                self._open_breakers[name] = model
            else:
                self._open_breakers.pop(name, None)

    def stopping(self) -> None:
        with self._lock:
            self._stopping = True

    # ------------------------------------------------------------------ verdicts

    def liveness(self) -> Verdict:
        with self._lock:
            quiet_s = self._clock() - self._last_turn
        if quiet_s > self._stall_after_s:
            return Verdict(False, (f"loop has not turned for {quiet_s:.1f}s",))
        return Verdict(True)

    def readiness(self) -> Verdict:
        reasons: list[str] = []
        with self._lock:
            if self._stopping:
                reasons.append("stopping")
            if sum(self._partitions.values()) == 0:
                reasons.append("no partitions assigned")
            blocked = set(self._open_breakers.values())
            if self._models and blocked.issuperset(self._models):
                reasons.append(f"breaker open for every model: {', '.join(sorted(blocked))}")
        return Verdict(not reasons, tuple(reasons))
