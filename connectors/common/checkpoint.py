"""Where a connector resumes: source positions in a compacted Kafka topic.

Positions (a Salesforce replay id, an OData delta timestamp, the last CloudEvent id) live in
``<ns>.connectors.checkpoints``: compacted, one partition, key ``<connector>/<stream>``, value
the position as UTF-8 text (bytes positions are stored base64-encoded; :func:`position_bytes`
turns them back). Compaction keeps the latest position of every stream forever.

The rule every connector follows: save a position only after every request up to it was
acknowledged by the broker. Then a restart re-reads at most what was not yet acknowledged,
and request ids derived from the source events make those re-reads the same requests.
"""

from __future__ import annotations

import base64
import binascii
import threading

from confluent_kafka import (
    OFFSET_BEGINNING,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

from connectors.common.exceptions import CheckpointError
from pipeline.kafka import clients
from pipeline.kafka.admin import TopicSpec, end_offsets, ensure_topics
from pipeline.kafka.clients import ConsumerRole, ProducerRole
from pipeline.settings import Settings
from schemas.errors import SluicewayError


def checkpoint_topic(namespace: str) -> str:
    return f"{namespace}.connectors.checkpoints"


def checkpoint_topic_spec(namespace: str) -> TopicSpec:
    """Compacted and single-partition: a reader sees every stream's latest position in order."""
    return TopicSpec(
        checkpoint_topic(namespace),
        1,
        config={"cleanup.policy": "compact", "min.compaction.lag.ms": "0"},
    )


def position_text(position: str | bytes) -> str:
    """The stored form of a position: text as is, bytes base64-encoded."""
    return position if isinstance(position, str) else base64.b64encode(position).decode("ascii")


def position_bytes(stored: str) -> bytes:
    """A bytes position (e.g. a Salesforce replay id) back from its stored form.

    Raises :class:`CheckpointError` for a stored value that is not base64: a corrupt position
    is an error to alert on, never a silent restart from somewhere else.
    """
    try:
        return base64.b64decode(stored.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error) as exc:
        raise CheckpointError(f"stored position {stored[:40]!r} is not base64") from exc


class CheckpointStore:
    """The positions of one connector (``connector`` is its name, e.g. ``sap-s4h``)."""

    def __init__(self, settings: Settings, connector: str, *, timeout_s: float = 15.0) -> None:
        if not connector or "/" in connector:
            raise ValueError(f"connector name {connector!r} must be non-empty, without '/'")
        self.settings = settings
        self.connector = connector
        self.topic = checkpoint_topic(settings.namespace)
        self._timeout_s = timeout_s
        self._producer: Producer | None = None
        self._lock = threading.Lock()

    def _key(self, stream: str) -> str:
        return f"{self.connector}/{stream}"

    def ensure_topic(self) -> None:
        try:
            spec = checkpoint_topic_spec(self.settings.namespace)
            ensure_topics(self.settings.kafka, [spec], self._timeout_s)
        except SluicewayError as exc:
            raise CheckpointError(f"cannot create {self.topic}: {exc}") from exc

    def load(self) -> dict[str, str]:
        """Every stream's latest position, read from the topic up to its current end."""
        self.ensure_topic()
        try:
            end = end_offsets(self.settings.kafka, self.topic, self._timeout_s).get(0, 0)
        except SluicewayError as exc:
            raise CheckpointError(f"cannot read {self.topic}: {exc}") from exc
        positions: dict[str, str] = {}
        if end == 0:
            return positions
        prefix = f"{self.connector}/"
        consumer = clients.consumer(
            self.settings.kafka,
            group_id=f"sluiceway-checkpoints-{self.connector}",
            role=ConsumerRole.SNAPSHOT,
        )
        try:
            consumer.assign([TopicPartition(self.topic, 0, OFFSET_BEGINNING)])
            offset = -1
            while offset < end - 1:
                message = consumer.poll(self._timeout_s)
                if message is None:
                    raise CheckpointError(
                        f"{self.topic}: no record within {self._timeout_s:g}s before its end"
                    )
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        break
                    raise CheckpointError(f"reading {self.topic}: {error}")
                offset = int(message.offset() or 0)
                key = (message.key() or b"").decode("utf-8", errors="replace")
                if not key.startswith(prefix):
                    continue
                stream = key[len(prefix) :]
                value = message.value()
                if value is None:  # a tombstone: the stream was cleared
                    positions.pop(stream, None)
                else:
                    positions[stream] = value.decode("utf-8")
        except KafkaException as exc:
            raise CheckpointError(f"reading {self.topic}: {exc}") from exc
        finally:
            consumer.close()
        return positions

    def save(self, stream: str, position: str | bytes) -> None:
        """Store ``position`` for ``stream`` and return once the broker acknowledged it."""
        self._produce(self._key(stream), position_text(position).encode("utf-8"))

    def clear(self, stream: str) -> None:
        """Forget a stream's position (a tombstone; compaction removes it)."""
        self._produce(self._key(stream), None)

    def _produce(self, key: str, value: bytes | None) -> None:
        failures: list[str] = []
        with self._lock:
            if self._producer is None:
                # Before the first write, not only in load(): a topic the broker auto-creates
                # would get its default partitions, and load() reads partition 0 only.
                self.ensure_topic()
                self._producer = clients.producer(self.settings.kafka, role=ProducerRole.RELIABLE)
            producer = self._producer
            try:
                producer.produce(
                    self.topic,
                    value,
                    key=key,
                    on_delivery=lambda error, _message: (
                        failures.append(error.str()) if error is not None else None
                    ),
                )
            except (BufferError, KafkaException) as exc:
                raise CheckpointError(f"checkpoint {key}: {exc}") from exc
            remaining = producer.flush(self._timeout_s)
        if remaining or failures:
            raise CheckpointError(
                f"checkpoint {key} not acknowledged: {failures[0] if failures else 'timeout'}"
            )

    def close(self) -> None:
        with self._lock:
            if self._producer is not None:
                self._producer.flush(self._timeout_s)
                self._producer = None
