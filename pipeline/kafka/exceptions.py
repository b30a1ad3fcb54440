"""Errors raised at the Kafka boundary."""

from __future__ import annotations

from confluent_kafka import KafkaError as RdKafkaError

from schemas.errors import SluicewayError


class KafkaError(SluicewayError):
    """A Kafka operation failed; the message names the topic or operation."""


class TopicAdminError(KafkaError):
    """Creating or describing a topic failed."""


class ClientError(SluicewayError):
    """Base class of the client SDK's errors (:mod:`pipeline.client` re-exports it).

    It lives here, beside the producer's errors, because one of them is the SDK's too: a
    :class:`DeliveryError` means the same whether the SDK or the async producer sent.
    """


class DeliveryError(KafkaError, ClientError):
    """The broker did not acknowledge a message: it refused it (too large, not authorised,
    unknown topic, ...) or librdkafka gave up on it.

    ``topic`` is where it was going. ``transient`` is librdkafka's own verdict on the failure
    (``KafkaError.retriable()``): sending the same message again later may succeed.
    """

    def __init__(self, message: str, *, topic: str, transient: bool = False) -> None:
        super().__init__(message)
        self.topic = topic
        self.transient = transient

    @classmethod
    def reported(cls, topic: str, error: RdKafkaError, subject: str | None = None) -> DeliveryError:
        """From a delivery report's error; ``subject`` names what was sent (default: the
        delivery to ``topic``)."""
        named = subject or f"delivery to {topic!r} failed"
        return cls(f"{named}: {error.str()}", topic=topic, transient=bool(error.retriable()))
