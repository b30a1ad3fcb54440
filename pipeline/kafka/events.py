"""A few contract events at a time: publishing them (control, drift) and following a topic."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Generic, Protocol, TypeVar

from confluent_kafka import OFFSET_BEGINNING, TopicPartition

import schemas
from pipeline.kafka import clients
from pipeline.kafka.admin import control_topic_spec, end_offsets, ensure_topics
from pipeline.kafka.clients import ConsumerRole, ProducerRole
from pipeline.kafka.exceptions import KafkaError
from pipeline.settings import KafkaSettings, Settings
from pipeline.topics import control_topic
from schemas.exceptions import DecodeError
from schemas.models import ControlAction, ControlEvent, Event

E = TypeVar("E", bound=Event)


def send_events(
    kafka: KafkaSettings,
    topic: str,
    events: Sequence[tuple[str | None, Event]],
    timeout_s: float = 15.0,
) -> None:
    """Produce ``(key, event)`` pairs with ``acks=all``; raise unless all are acknowledged."""
    producer = clients.producer(kafka, role=ProducerRole.RELIABLE)
    failures: list[str] = []
    for key, event in events:
        headers: list[tuple[str, str | bytes | None]] = list(
            schemas.message_headers(event.AVRO_NAME)
        )
        producer.produce(
            topic,
            schemas.encode(event),
            key=key,
            headers=headers,
            on_delivery=lambda err, _msg: failures.append(str(err)) if err else None,
        )
    if producer.flush(timeout_s) or failures:
        raise KafkaError(f"events to {topic} not acknowledged: {failures or 'timeout'}")


class Record(Protocol):
    """What :func:`decode_records` reads of a consumed message (a confluent-kafka
    ``Message``, or a test's stand-in)."""

    def error(self) -> object | None: ...

    def value(self) -> bytes | None: ...


def decode_records(records: Iterable[Record], kind: type[E]) -> tuple[list[E], int]:
    """The events of contract ``kind`` among consumed ``records``, in order, and how many
    records did not decode as one. Errors and empty values (tombstones) are neither: they
    carry no event. A record that does not decode is skipped, never raised: a reader of a
    results topic must not stop on one bad record that any producer could have written."""
    events: list[E] = []
    undecodable = 0
    for record in records:
        value = record.value()
        if record.error() is not None or not value:
            continue
        try:
            events.append(schemas.decode(value, kind))
        except DecodeError:
            undecodable += 1
    return events, undecodable


class TopicTail(Generic[E]):
    """Follows a topic in a background thread, decoding every event of one contract.

    ``from_beginning=False`` starts at the current end, so only events published from now on
    are seen. Undecodable records are counted, not raised: a tail is for watching.
    """

    def __init__(
        self, kafka: KafkaSettings, topic: str, kind: type[E], *, from_beginning: bool = True
    ) -> None:
        self.events: list[E] = []
        self.undecodable = 0
        self._kind = kind
        self._stop = threading.Event()
        # A reader, not a subscriber: it assigns its own start offsets, so committing them
        # (the library default) only left offsets of a throwaway group on the broker.
        self._consumer = clients.consumer(
            kafka, group_id=clients.throwaway_group("sluiceway-tail"), role=ConsumerRole.READER
        )
        starts = end_offsets(kafka, topic) if not from_beginning else {}
        metadata = self._consumer.list_topics(topic, timeout=10)
        partitions = sorted(metadata.topics[topic].partitions)
        self._consumer.assign(
            [TopicPartition(topic, p, starts.get(p, OFFSET_BEGINNING)) for p in partitions]
        )
        self._thread = threading.Thread(target=self._run, name=f"tail-{topic}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            events, undecodable = decode_records(self._consumer.consume(100, 0.2), self._kind)
            self.events.extend(events)
            self.undecodable += undecodable

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._consumer.close()


def send_control(
    settings: Settings,
    model: str,
    action: ControlAction,
    version: str,
    *,
    reason: str,
    issued_by: str,
) -> ControlEvent:
    """Publish one routing decision on ``<ns>.control`` (created if missing) and return it."""
    event = ControlEvent(
        event_id=uuid.uuid4(),
        model=model,
        action=action,
        to_version=version,
        reason=reason,
        issued_at=datetime.now(UTC),
        issued_by=issued_by,
    )
    ensure_topics(settings.kafka, [control_topic_spec(settings.namespace)])
    send_events(settings.kafka, control_topic(settings.namespace), [(model, event)])
    return event
