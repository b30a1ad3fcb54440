"""Errors of the ``schemas`` package and their stable reason codes.

Every failure to encode or decode an event is one of these types, never a fastavro,
pydantic or confluent_kafka exception (those are chained as ``__cause__``). The reason codes
are stable strings: the worker puts them in dead-letter headers and in
``DeadLetter.reason_code``, dashboards group by them, so a code is never renamed or reused.
"""

from __future__ import annotations

from enum import StrEnum

from schemas.errors import SluicewayError


class DecodeReason(StrEnum):
    """Why bytes could not be turned into an event."""

    EMPTY = "empty"
    """Zero-length value (a tombstone or a producer bug)."""
    TOO_LARGE = "too_large"
    """The message is over ``Limits.max_message_bytes``; it was not decoded."""
    BAD_MARKER = "bad_marker"
    """The framing header is not the expected one (wrong magic bytes)."""
    UNKNOWN_SCHEMA = "unknown_schema"
    """The writer schema's fingerprint or registry id is not known."""
    UNEXPECTED_SCHEMA = "unexpected_schema"
    """A known schema, but not the event type the caller expects on this topic."""
    INCOMPATIBLE_SCHEMA = "incompatible_schema"
    """The writer schema cannot be resolved into the reader's (e.g. an unknown enum symbol)."""
    TRUNCATED = "truncated"
    """The body ends before the record does (or a length field points past the end)."""
    TRAILING_BYTES = "trailing_bytes"
    """Bytes remain after the record."""
    MALFORMED = "malformed"
    """The body does not follow the writer schema (bad union index, bad UTF-8, bad varint)."""
    SIZE_LIMIT = "size_limit"
    """The record decodes but a string, map, array or tensor is over its limit."""
    INVALID = "invalid"
    """The record decodes but breaks a rule of the contract (types, ranges, one-of)."""
    REGISTRY_UNAVAILABLE = "registry_unavailable"
    """The schema registry could not be asked (transient: retry, do not dead-letter)."""


class EncodeReason(StrEnum):
    """Why an event could not be turned into bytes."""

    INVALID = "invalid"
    """The event does not fit its schema."""
    TOO_LARGE = "too_large"
    """The encoded message would be over ``Limits.max_message_bytes``."""
    UNKNOWN_SCHEMA = "unknown_schema"
    """The event type has no schema in the catalog."""
    REGISTRY_UNAVAILABLE = "registry_unavailable"
    """The schema registry could not be asked (transient)."""
    REGISTRY_REJECTED = "registry_rejected"
    """The registry refused the schema (for example, incompatible with the subject)."""


class SchemaError(SluicewayError):
    """Base class of every error raised by the ``schemas`` package."""


class CatalogError(SchemaError):
    """The schema files themselves are broken: unreadable, unparsable or inconsistent."""


class DecodeError(SchemaError):
    """Bytes could not be decoded into a valid event. ``reason`` is the stable code."""

    def __init__(self, reason: DecodeReason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.detail = message
        # Only an unreachable registry may answer differently later; the bytes are not poison.
        self.transient = reason is DecodeReason.REGISTRY_UNAVAILABLE


class EncodeError(SchemaError):
    """An event could not be encoded. ``reason`` is the stable code."""

    def __init__(self, reason: EncodeReason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.detail = message
        self.transient = reason is EncodeReason.REGISTRY_UNAVAILABLE
