"""The root of every error Sluiceway raises on purpose.

Each subpackage keeps its own ``exceptions`` module whose classes derive from
:class:`SluicewayError`, so a caller can catch everything of ours in one place while
third-party errors are wrapped at the boundary (``raise OurError(...) from exc``).
"""


class SluicewayError(Exception):
    """Base class for all errors raised by Sluiceway."""
