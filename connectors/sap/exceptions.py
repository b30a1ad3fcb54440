"""Errors of the SAP connector."""

from __future__ import annotations

from connectors.common.exceptions import ConnectorError


class SapError(ConnectorError):
    """Base class of the SAP connector's errors."""


class SapConfigError(SapError):
    """The mapping's ``source`` or ``writeback`` section, or the auth settings, are invalid."""


class ODataError(SapError):
    """An OData call failed; ``status`` is the HTTP status (0 when none came back)."""

    def __init__(self, message: str, *, status: int = 0, transient: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.transient = transient
        """Whether the same call later may succeed (429, 5xx, transport): from the answer."""


class EntityNotFound(ODataError):
    """The entity named by an event does not exist (any more)."""


class PreconditionFailed(ODataError):
    """412: the entity changed since its ETag was read."""
