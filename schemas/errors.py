"""The root of every error Sluiceway raises on purpose, and the two facts callers branch on.

Each package keeps its own ``exceptions`` module whose classes derive from
:class:`SluicewayError`, so a caller can catch everything of ours in one place while
third-party errors are wrapped at the boundary (``raise OurError(...) from exc``).

Callers ask two questions of a failure, and each has one answer here:
- may trying again later succeed? ``error.transient`` (a class default, which an instance may
  override when only the failure itself can tell, e.g. from an HTTP status);
- can this record never be served? Then it is an :class:`UnservableRecord`, whose
  ``reason_code`` is what its dead letter's ``DeadLetter.reason_code`` says.
"""

from __future__ import annotations


class SluicewayError(Exception):
    """Base class for all errors raised by Sluiceway."""

    transient: bool = False
    """True when retrying later may succeed; False when the same attempt fails the same way."""


class UnservableRecord(SluicewayError):
    """A record that can never be served: it is dead-lettered (or, for a batch job's line,
    written to the job's error file), never retried.

    ``reason_code`` is stable and machine-readable (``missing_field``, ``unknown_model``,
    ``truncated``...): it is the letter's ``DeadLetter.reason_code`` and its
    ``sluiceway-dlq-reason`` header, so dashboards and replays group by it. ``error_class``
    names the underlying failure (the ``sluiceway-dlq-error-class`` header); it defaults to
    the type's own name.
    """

    def __init__(self, reason_code: str, message: str, *, error_class: str | None = None) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        self.message = message
        self.error_class = error_class or type(self).__name__
