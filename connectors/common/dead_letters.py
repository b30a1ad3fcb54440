"""Dead-lettering source records that can never become requests.

A record a connector cannot map (a missing field, a malformed event) goes to the model's DLQ,
``<ns>.<model>.dlq``, as the same ``DeadLetter`` contract and headers the worker writes, with
the source payload as ``original_value``, so nothing is dropped silently and the record can be
fixed and replayed. A connector record has no Kafka origin: ``original_topic`` names the source
as ``connector:<source system>`` and partition and offset are 0.
"""

from __future__ import annotations

from datetime import UTC, datetime

from confluent_kafka import KafkaException, Producer

import schemas
from connectors.common.exceptions import DeadLetterError
from pipeline.kafka import clients
from pipeline.kafka.clients import ProducerRole
from pipeline.settings import Settings
from pipeline.topics import ModelTopics
from schemas.models import DeadLetter, Header
from workers.inference.contracts import dead_letter_headers

UNMAPPABLE_ERROR_CLASS = "UnmappableRecord"


def unmappable_letter(
    *,
    model: str,
    source_payload: bytes,
    reason_code: str,
    message: str,
    source_system: str,
    source_key: str | None = None,
    source_headers: dict[str, str] | None = None,
    request_id: str | None = None,
    connector: str | None = None,
    error_class: str = UNMAPPABLE_ERROR_CLASS,
    now: datetime | None = None,
) -> DeadLetter:
    """The dead letter for one unmappable source record (pure)."""
    moment = now or datetime.now(UTC)
    headers = [
        Header(key=name[:256], value=value.encode("utf-8"))
        for name, value in (source_headers or {}).items()
    ]
    return DeadLetter(
        original_topic=f"connector:{source_system}"[:256],
        original_partition=0,
        original_offset=0,
        original_key=None if source_key is None else source_key.encode("utf-8"),
        original_value=source_payload,
        original_headers=headers or None,
        original_timestamp=None,
        error_class=error_class[:200] or UNMAPPABLE_ERROR_CLASS,
        reason_code=reason_code[:256] or "unmappable",
        reason_message=message[:4000] or reason_code,
        attempts=1,
        first_failure_at=moment,
        last_failure_at=moment,
        request_id=request_id,
        model=model,
        worker_id=connector,
    )


def encode_letter(letter: DeadLetter) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The letter's bytes and the worker's dead-letter headers (reason readable undecoded)."""
    return schemas.encode(letter), dead_letter_headers(
        letter.reason_code, letter.error_class, letter.attempts
    )


def send_unmappable(
    settings: Settings,
    *,
    model: str,
    source_payload: bytes,
    reason_code: str,
    message: str,
    source_system: str,
    producer: Producer | None = None,
    source_key: str | None = None,
    source_headers: dict[str, str] | None = None,
    request_id: str | None = None,
    connector: str | None = None,
    timeout_s: float = 10.0,
) -> DeadLetter:
    """Write one unmappable record to ``<ns>.<model>.dlq`` and wait for the broker's ack.

    Pass a long-lived ``producer`` (``acks=all``) where records are dead-lettered often; without
    one, a producer is made for this letter. Raises :class:`DeadLetterError` unless acked.
    """
    letter = unmappable_letter(
        model=model,
        source_payload=source_payload,
        reason_code=reason_code,
        message=message,
        source_system=source_system,
        source_key=source_key,
        source_headers=source_headers,
        request_id=request_id,
        connector=connector,
    )
    value, headers = encode_letter(letter)
    topic = ModelTopics(settings.namespace, model).dlq
    sender = producer or clients.producer(settings.kafka, role=ProducerRole.RELIABLE)
    failures: list[str] = []
    try:
        sender.produce(
            topic,
            value,
            key=source_key,
            headers=list(headers),
            on_delivery=lambda error, _message: (
                failures.append(error.str()) if error is not None else None
            ),
        )
    except (BufferError, KafkaException) as exc:
        raise DeadLetterError(f"dead letter to {topic}: {exc}") from exc
    remaining = sender.flush(timeout_s)
    if remaining or failures:
        raise DeadLetterError(
            f"dead letter to {topic} not acknowledged: {failures[0] if failures else 'timeout'}"
        )
    return letter
