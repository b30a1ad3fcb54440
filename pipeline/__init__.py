"""Sluiceway: event-driven batch and async inference over Kafka, Triton/vLLM and S3."""

from schemas.errors import SluicewayError

__all__ = ["SluicewayError", "__version__"]
__version__ = "0.1.0"
