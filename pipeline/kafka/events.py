"""A few contract events at a time: publishing them (control, drift) and following a topic."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Generic, Protocol, TypeVar

from confluent_kafka import OFFSET_BEGINNING, Message, TopicPartition

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


class MessageSource(Protocol):
    """What :func:`follow` reads from: a confluent-kafka consumer, or a fake of one."""

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]: ...


def follow(
    source: MessageSource,
    kind: type[E],
    *,
    until: Callable[[], bool],
    batch: int = 100,
    poll_timeout_s: float = 0.2,
    idle_timeout_s: float | None = None,
    on_undecodable: Callable[[Message], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[E]:
    """Yield each event of ``kind`` that ``source`` delivers, until ``until()`` is true (asked
    before every read) or nothing arrived for ``idle_timeout_s``.

    The one way every reader of a result or event topic skips what it cannot use: error
    messages and empty values (tombstones) are passed over, and a value that does not decode
    as ``kind`` goes to ``on_undecodable`` (when given), never raises. ``batch=1`` reads one
    message at a time, for a subscriber whose offsets are stored as it reads them.
    """
    idle_since = clock()
    while not until():
        messages = source.consume(batch, poll_timeout_s)
        if messages:
            idle_since = clock()
        elif idle_timeout_s is not None and clock() - idle_since >= idle_timeout_s:
            return
        yield from decode_records(messages, kind, on_undecodable)


def decode_records(
    messages: Iterable[Message],
    kind: type[E],
    on_undecodable: Callable[[Message], None] | None = None,
) -> list[E]:
    """The events of ``kind`` among ``messages`` already consumed, in order: :func:`follow`'s
    skipping for a reader that consumes batches itself (a writeback that commits a batch's
    offsets after writing it). Errors and tombstones are passed over; a value that does not
    decode goes to ``on_undecodable`` (when given), never raises."""
    events: list[E] = []
    for message in messages:
        value = message.value()
        if message.error() is not None or not value:
            continue
        try:
            events.append(schemas.decode(value, kind))
        except DecodeError:
            if on_undecodable is not None:
                on_undecodable(message)
    return events


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
        for event in follow(
            self._consumer, self._kind, until=self._stop.is_set, on_undecodable=self._skip
        ):
            self.events.append(event)

    def _skip(self, _message: Message) -> None:
        self.undecodable += 1

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
