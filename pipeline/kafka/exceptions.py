"""Errors raised at the Kafka boundary."""

from __future__ import annotations

from schemas.errors import SluicewayError


class KafkaError(SluicewayError):
    """A Kafka operation failed; the message names the topic or operation."""


class TopicAdminError(KafkaError):
    """Creating or describing a topic failed."""
