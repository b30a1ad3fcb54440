"""Errors raised at the object-store boundary."""

from __future__ import annotations

from schemas.errors import SluicewayError


class ObjectStoreError(SluicewayError):
    """An object-store operation failed; the message names the bucket and key."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class ObjectKeyRefused(ObjectStoreError):
    """The store (or its client) will never take this object name: retrying cannot help."""
