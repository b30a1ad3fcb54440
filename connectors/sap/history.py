"""What the connector did before it (re)started, read back from Kafka: the requests and
invalidations it published and the letters it wrote, so a redelivered event is a duplicate
rather than a second request (or letter)."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from datetime import datetime

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from connectors.common.dead_letters import letter_source_event
from connectors.sap.core import cancelled_key
from pipeline.kafka import clients
from pipeline.kafka.clients import ConsumerRole
from pipeline.kafka.events import decode_records
from pipeline.settings import Settings
from schemas.models import InferenceRequest, Invalidation


def published_request_ids(
    settings: Settings,
    topic: str,
    source_systems: str | Collection[str],
    since: datetime,
    timeout_s: float = 30.0,
) -> set[str]:
    """Ids of the requests of ``source_systems`` published to ``topic`` since ``since``.

    The requests topic is the truth of what was published: a connector killed after the
    broker acked a request but before it answered the sender finds the request here, and the
    redelivered event is recognised as a duplicate.
    """
    systems = {source_systems} if isinstance(source_systems, str) else set(source_systems)
    found: set[str] = set()
    for request in decode_records(
        _messages_since(settings, topic, since, timeout_s), InferenceRequest
    ):
        if request.source is not None and request.source.system in systems:
            found.add(str(request.request_id))
    return found


def dead_lettered_events(
    settings: Settings, topic: str, since: datetime, timeout_s: float = 30.0
) -> set[str]:
    """The source-event keys of the letters written to the DLQ ``topic`` since ``since``,
    read from their headers alone: a letter's value (perhaps sealed) is never opened."""
    found: set[str] = set()
    for message in _messages_since(settings, topic, since, timeout_s):
        key = letter_source_event(message.headers())
        if key is not None:
            found.add(key)
    return found


def _messages_since(
    settings: Settings, topic: str, since: datetime, timeout_s: float
) -> Iterator[Message]:
    """The records of ``topic`` written since ``since``, to the topic's end as of now."""
    consumer = clients.consumer(
        settings.kafka,
        group_id=clients.throwaway_group("sluiceway-dedupe"),
        role=ConsumerRole.SNAPSHOT,
    )
    try:
        metadata = consumer.list_topics(topic, timeout=timeout_s)
        partitions = sorted(metadata.topics[topic].partitions)
        since_ms = int(since.timestamp() * 1000)
        starts = consumer.offsets_for_times(
            [TopicPartition(topic, p, since_ms) for p in partitions], timeout=timeout_s
        )
        assigned = [tp for tp in starts if tp.offset >= 0]
        if not assigned:
            return
        consumer.assign(assigned)
        open_partitions = {tp.partition for tp in assigned}
        while open_partitions:
            message = consumer.poll(timeout_s)
            if message is None:
                raise TimeoutError(f"reading {topic} for handled events timed out")
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    open_partitions.discard(int(message.partition() or 0))
                    continue
                raise KafkaException(error)
            yield message
    finally:
        consumer.close()


def invalidated_events(
    settings: Settings, topic: str, connector: str, since: datetime, timeout_s: float = 30.0
) -> tuple[set[str], set[str]]:
    """The event ids (request-id form) and entities (:func:`cancelled_key`) of the
    invalidations ``connector`` published to ``topic`` since ``since``: a restarted connector
    neither publishes a redelivered cancellation again nor scores a cancelled entity."""
    events: set[str] = set()
    entities: set[str] = set()
    for invalidation in decode_records(
        _messages_since(settings, topic, since, timeout_s), Invalidation
    ):
        if invalidation.connector != connector:
            continue
        events.add(str(invalidation.event_id))
        entities.add(
            cancelled_key(
                invalidation.source_system or "", invalidation.model, invalidation.entity_key
            )
        )
    return events, entities
