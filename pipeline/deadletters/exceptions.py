"""Errors of dead-letter tooling."""

from __future__ import annotations

from schemas.errors import SluicewayError


class SelectorError(SluicewayError, ValueError):
    """A selection given on the command line that means nothing (bad time, name, position)."""
