"""A request's remaining deadline turned into what a backend call may take, and its priority
turned into a Triton priority level.

Pure: the worker measures the time left, the backends apply the result. A backend call never
waits longer than the request may (its remaining deadline), never longer than the backend's
configured timeout (the ceiling: requests without a deadline, or with one days away, such as
batch-job records), and never shorter than a floor (a call cut at a few milliseconds fails
for sure, while the server may still answer just in time).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

HIGHEST_PRIORITY = 9
"""``InferenceRequest.priority`` runs from 0 (default) to 9 (most urgent)."""


def backend_timeout_s(remaining_s: float | None, floor_s: float, ceiling_s: float) -> float:
    """Seconds a backend call may take for a batch whose earliest deadline is ``remaining_s``
    away (``None``: no record of the batch has a deadline).

    The result lies in ``[floor_s, ceiling_s]``; a floor above the ceiling yields the ceiling.
    """
    if ceiling_s <= 0 or floor_s < 0:
        raise ValueError(f"need ceiling_s > 0 and floor_s >= 0, got {ceiling_s}, {floor_s}")
    if remaining_s is None or math.isnan(remaining_s):
        return ceiling_s
    return min(ceiling_s, max(floor_s, remaining_s))


def batch_priority(priorities: Iterable[int | None]) -> int | None:
    """The priority a batch is sent with: that of its most urgent record (``None``: none set).

    A backend call carries one priority for all its rows; the batcher puts urgent records
    together, so a batch is rarely mixed, and when it is, the urgent record must not wait.
    """
    given = [p for p in priorities if p is not None]
    return max(given) if given else None


def triton_priority_level(priority: int | None, levels: int) -> int:
    """Triton's priority level for ``priority`` on a model with ``levels`` priority levels.

    Triton's level 1 is served first and 0 means "the model's default level"; ours run the
    other way (9 is most urgent). The 10 priorities are spread evenly over the levels. A
    model without priority levels (``levels`` 0) gets 0, which Triton reads as "none given".
    """
    if levels <= 0 or priority is None:
        return 0
    clamped = min(max(priority, 0), HIGHEST_PRIORITY)
    # 9 -> level 1, 0 -> level ``levels``, linear in between.
    return 1 + round((HIGHEST_PRIORITY - clamped) * (levels - 1) / HIGHEST_PRIORITY)


def triton_timeout_us(timeout_s: float) -> int:
    """Triton's per-request ``timeout`` (microseconds, at least 1: 0 means "no timeout")."""
    return max(1, int(timeout_s * 1_000_000))
