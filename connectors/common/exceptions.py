"""Errors of the shared connector machinery; every connector's own errors derive from them."""

from __future__ import annotations

from schemas.errors import SluicewayError


class ConnectorError(SluicewayError):
    """Base class of every connector error."""


class MappingFileError(ConnectorError):
    """A mapping file cannot be read or does not describe a valid mapping."""


class CheckpointError(ConnectorError):
    """Checkpoints could not be read from or written to Kafka."""


class DeadLetterError(ConnectorError):
    """A dead letter was not acknowledged by the broker."""
