"""Kafka headers that say how a message value is encoded and which event it holds.

Consumers route and dead-letter on these without decoding the value; the value's own
framing (single-object fingerprint or registry id) stays the authority on the exact schema.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from schemas.models import DeadLetter

CONTENT_TYPE_HEADER = "content-type"
SCHEMA_HEADER = "sluiceway-schema"

SINGLE_OBJECT_CONTENT_TYPE = "application/vnd.sluiceway.avro"
"""Avro single-object encoding: ``C3 01`` + 8-byte CRC-64-AVRO fingerprint + body."""
CONFLUENT_CONTENT_TYPE = "avro/binary; framing=confluent"
"""Confluent wire format: ``00`` + 4-byte big-endian registry schema id + body."""

Framing = Literal["single-object", "confluent"]

CONTENT_TYPES: dict[Framing, str] = {
    "single-object": SINGLE_OBJECT_CONTENT_TYPE,
    "confluent": CONFLUENT_CONTENT_TYPE,
}

KafkaHeaders = list[tuple[str, bytes]]


def message_headers(schema_name: str, framing: Framing = "single-object") -> KafkaHeaders:
    """Headers for a message holding event ``schema_name`` (full Avro name) in ``framing``.

    >>> message_headers("io.sluiceway.v1.InferenceRequest")  # doctest: +NORMALIZE_WHITESPACE
    [('content-type', b'application/vnd.sluiceway.avro'),
     ('sluiceway-schema', b'io.sluiceway.v1.InferenceRequest')]
    """
    return [
        (CONTENT_TYPE_HEADER, CONTENT_TYPES[framing].encode("ascii")),
        (SCHEMA_HEADER, schema_name.encode("utf-8")),
    ]


@dataclass(frozen=True, slots=True)
class MessageKind:
    """What the headers of a received message say (None where a header is absent)."""

    framing: Framing | None
    content_type: str | None
    schema_name: str | None


def read_headers(headers: Iterable[tuple[str, bytes | str | None]] | None) -> MessageKind:
    """Read our headers from a confluent_kafka header list; unknown headers are ignored.

    Header names compare case-insensitively; a value that is not valid UTF-8 counts as
    absent, so hostile headers cannot make this raise.
    """
    content_type: str | None = None
    schema_name: str | None = None
    for key, value in headers or ():
        lowered = key.lower()
        if lowered not in (CONTENT_TYPE_HEADER, SCHEMA_HEADER) or value is None:
            continue
        try:
            text = value.decode("utf-8") if isinstance(value, bytes) else value
        except UnicodeDecodeError:
            continue
        if lowered == CONTENT_TYPE_HEADER:
            content_type = text
        else:
            schema_name = text
    framing: Framing | None = None
    for candidate, value in CONTENT_TYPES.items():
        if content_type is not None and content_type.replace(" ", "") == value.replace(" ", ""):
            framing = candidate
    return MessageKind(framing=framing, content_type=content_type, schema_name=schema_name)


def dead_letter_headers(reason: str, error_class: str, attempts: int) -> list[tuple[str, bytes]]:
    """Headers of a dead letter: its contract, and why, readable without decoding it."""
    return [
        *message_headers(DeadLetter.AVRO_NAME),
        ("sluiceway-dlq-reason", reason.encode()),
        ("sluiceway-dlq-error-class", error_class.encode()),
        ("sluiceway-dlq-attempts", str(attempts).encode()),
    ]


CONNECT_MESSAGE_BYTES = 1024
"""The most of a letter's reason text its Kafka Connect header carries (the letter has it all)."""


def connect_error_headers(
    topic: str, partition: int, offset: int, error_class: str, message: str
) -> list[tuple[str, bytes]]:
    """Kafka Connect's ``__connect.errors.*`` headers, as its dead letter queue reporter writes
    them (numbers as decimal text), so tools built for Connect DLQs read ours. Bounded: they
    sit beside the letter's own headers, under the same producer limit."""
    text = message.encode("utf-8", "backslashreplace")[:CONNECT_MESSAGE_BYTES]
    return [
        ("__connect.errors.topic", topic.encode("utf-8", "backslashreplace")[:1024]),
        ("__connect.errors.partition", str(partition).encode()),
        ("__connect.errors.offset", str(offset).encode()),
        ("__connect.errors.exception.class.name", error_class.encode("utf-8", "backslashreplace")),
        ("__connect.errors.exception.message", text.decode("utf-8", "ignore").encode()),
    ]
