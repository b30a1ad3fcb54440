"""Publishing a few contract events and waiting for the broker: control and drift events."""

from __future__ import annotations

from collections.abc import Sequence

from confluent_kafka import Producer

import schemas
from pipeline.kafka.exceptions import KafkaError
from pipeline.settings import KafkaSettings
from schemas.models import Event


def send_events(
    kafka: KafkaSettings,
    topic: str,
    events: Sequence[tuple[str | None, Event]],
    timeout_s: float = 15.0,
) -> None:
    """Produce ``(key, event)`` pairs with ``acks=all``; raise unless all are acknowledged."""
    producer = Producer({**kafka.client_config(), "acks": "all", "enable.idempotence": True})
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
