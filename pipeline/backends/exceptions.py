"""Backend errors, and what the worker should do about each.

A transient error (``transient=True``: a timeout, UNAVAILABLE, 429, 5xx) is retried with backoff
and counts against the backend's circuit breaker; any other (a malformed request, an unknown
model, a 400) sends the affected requests to the dead-letter topic at once.
"""

from __future__ import annotations

from schemas.errors import SluicewayError


class BackendError(SluicewayError):
    """An inference call failed. ``reason`` is a stable code used in DLQ headers and metrics.

    ``transient``: the backend was slow, overloaded or briefly unavailable, so asking again
    later may succeed; otherwise retrying cannot help (the request itself or the model named is
    wrong). ``retry_after_s`` is the server's own estimate (HTTP ``Retry-After``), when it sent
    one; the next attempt waits at least that long.
    """

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        status: int | str | None = None,
        transient: bool = False,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status
        self.transient = transient
        self.retry_after_s = retry_after_s
