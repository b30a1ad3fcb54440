"""Sluiceway's event contracts: Avro schemas, the pydantic models that mirror them, the codec.

Public API::

    from schemas import InferenceRequest, encode, decode, default_catalog, message_headers

    data = encode(request)                          # Avro single-object bytes
    again = decode(data, InferenceRequest)          # validated model, or DecodeError
    headers = message_headers(request.AVRO_NAME)    # Kafka headers for the message

``encode``/``decode`` use one process-wide :class:`AvroCodec` over the shipped catalog and
default limits; build an :class:`AvroCodec` or :class:`ConfluentCodec` yourself for other
catalogs, limits or a schema registry.
"""

from __future__ import annotations

from functools import cache
from typing import TypeVar, overload

from schemas.catalog import Catalog, SchemaVersion, default_catalog, fingerprint64
from schemas.codec import AvroCodec, ConfluentCodec
from schemas.exceptions import (
    CatalogError,
    DecodeError,
    DecodeReason,
    EncodeError,
    EncodeReason,
    SchemaError,
)
from schemas.headers import (
    CONFLUENT_CONTENT_TYPE,
    SINGLE_OBJECT_CONTENT_TYPE,
    MessageKind,
    message_headers,
    read_headers,
)
from schemas.limits import DEFAULT_LIMITS, Limits
from schemas.models import (
    EVENT_MODELS,
    BatchJob,
    BatchJobStatus,
    ControlAction,
    ControlEvent,
    DeadLetter,
    DriftReport,
    Event,
    Feedback,
    InferenceRequest,
    InferenceResult,
    Inputs,
    Invalidation,
    InvalidationKind,
    Outputs,
    ResultStatus,
    SegmentRef,
    Tensor,
    TensorDatatype,
    TextInput,
)

E = TypeVar("E", bound=Event)


@cache
def default_codec() -> AvroCodec:
    """The process-wide single-object codec (shipped catalog, default limits)."""
    return AvroCodec(default_catalog(), DEFAULT_LIMITS)


def encode(event: Event) -> bytes:
    """Encode ``event`` as Avro single-object bytes. Raises :class:`EncodeError`."""
    return default_codec().encode(event)


@overload
def decode(data: bytes | bytearray | memoryview) -> Event: ...


@overload
def decode(data: bytes | bytearray | memoryview, expected: type[E]) -> E: ...


def decode(data: bytes | bytearray | memoryview, expected: type[Event] | None = None) -> Event:
    """Decode single-object bytes into a validated event. Raises :class:`DecodeError` only."""
    if expected is None:
        return default_codec().decode(data)
    return default_codec().decode(data, expected)


__all__ = [
    "CONFLUENT_CONTENT_TYPE",
    "DEFAULT_LIMITS",
    "EVENT_MODELS",
    "SINGLE_OBJECT_CONTENT_TYPE",
    "AvroCodec",
    "BatchJob",
    "BatchJobStatus",
    "Catalog",
    "CatalogError",
    "ConfluentCodec",
    "ControlAction",
    "ControlEvent",
    "DeadLetter",
    "DecodeError",
    "DecodeReason",
    "DriftReport",
    "EncodeError",
    "EncodeReason",
    "Event",
    "Feedback",
    "InferenceRequest",
    "InferenceResult",
    "Inputs",
    "Invalidation",
    "InvalidationKind",
    "Limits",
    "MessageKind",
    "Outputs",
    "ResultStatus",
    "SchemaError",
    "SchemaVersion",
    "SegmentRef",
    "Tensor",
    "TensorDatatype",
    "TextInput",
    "decode",
    "default_catalog",
    "default_codec",
    "encode",
    "fingerprint64",
    "message_headers",
    "read_headers",
]
