"""Waiting for conditions with a cut-off instead of sleeping a fixed time."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Call ``condition`` (which may block briefly, e.g. a poll) until it holds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def wait_until(
    condition: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.1
) -> None:
    """``wait_for`` for conditions that return at once: checked every ``poll_s``."""

    def check() -> bool:
        if condition():
            return True
        time.sleep(poll_s)
        return False

    wait_for(check, timeout_s, what)


def polled(condition: Callable[[], bool], every_s: float = 0.05) -> Callable[[], bool]:
    """``condition`` for :func:`wait_for`, checked every ``every_s``: checks of in-memory
    state must not spin a shared CPU."""
    pause = threading.Event()

    def check() -> bool:
        pause.wait(every_s)
        return condition()

    return check
