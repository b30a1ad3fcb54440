"""A progress bar for long work, redrawn in place on a terminal and printed sparsely in logs."""

from __future__ import annotations

import sys
import time
from typing import TextIO

_WIDTH = 30
_LOG_STEPS = 4
"""Without a terminal (CI logs), the bar is printed at each quarter only."""


class ProgressBar:
    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        self._stream = stream or sys.stderr
        self._live = self._stream.isatty()
        self._started = time.monotonic()
        self._last_step = -1
        self._last_draw = 0.0

    def advance(self, count: int = 1) -> None:
        self.update(self.done + count)

    def update(self, done: int) -> None:
        self.done = min(done, self.total)
        if self._live:
            now = time.monotonic()
            if now - self._last_draw >= 0.1 or self.done == self.total:
                self._last_draw = now
                self._stream.write("\r" + self._render())
                self._stream.flush()
            return
        step = self.done * _LOG_STEPS // self.total
        if step > self._last_step:
            self._last_step = step
            self._stream.write(self._render() + "\n")
            self._stream.flush()

    def close(self) -> None:
        if self._live:
            self._stream.write("\r" + self._render() + "\n")
            self._stream.flush()

    def _render(self) -> str:
        filled = self.done * _WIDTH // self.total
        elapsed = time.monotonic() - self._started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        return (
            f"  {self.label:<10} [{'#' * filled}{'.' * (_WIDTH - filled)}] "
            f"{self.done:>6}/{self.total} {rate:>8,.0f}/s"
        )
