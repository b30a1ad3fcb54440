"""Backend errors, split by what the worker should do about them.

Transient errors (timeouts, UNAVAILABLE, 429, 5xx) are retried with backoff and count against
the backend's circuit breaker; permanent errors (a malformed request, an unknown model, a 400)
send the affected requests to the dead-letter topic at once.
"""

from __future__ import annotations

from schemas.errors import SluicewayError


class BackendError(SluicewayError):
    """An inference call failed. ``reason`` is a stable code used in DLQ headers and metrics."""

    transient: bool = False

    def __init__(self, message: str, *, reason: str, status: int | str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


class TransientBackendError(BackendError):
    """Worth retrying: the backend was slow, overloaded or briefly unavailable.

    ``retry_after_s`` is the server's own estimate (HTTP ``Retry-After``), when it sent one;
    the next attempt waits at least that long.
    """

    transient = True

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        status: int | str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, reason=reason, status=status)
        self.retry_after_s = retry_after_s


class PermanentBackendError(BackendError):
    """Retrying cannot help: the request itself or the model named is wrong."""
