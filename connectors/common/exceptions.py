"""Errors of the shared connector machinery; every connector's own errors derive from them."""

from __future__ import annotations

from schemas.errors import SluicewayError


class ConnectorError(SluicewayError):
    """Base class of every connector error."""


class MappingFileError(ConnectorError):
    """A mapping file cannot be read or does not describe a valid mapping."""


class UnmappableRecord(ConnectorError):
    """A source record that can never become a request: it goes to the model's DLQ.

    ``reason_code`` is stable and machine-readable (``missing_field``, ``invalid_field``,
    ``unknown_code``...); the message names the field path at fault.
    """

    def __init__(self, reason_code: str, message: str) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        self.message = message


class CheckpointError(ConnectorError):
    """Checkpoints could not be read from or written to Kafka."""


class DeadLetterError(ConnectorError):
    """A dead letter was not acknowledged by the broker."""
