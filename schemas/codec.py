"""Events to bytes and back: Avro single-object encoding, or Confluent registry framing.

Wire formats (docs/contracts.md has the full contract):

* **Single-object** (:class:`AvroCodec`, the default): ``C3 01``, then the writer schema's
  CRC-64-AVRO fingerprint as 8 little-endian bytes, then the Avro binary body. The writer
  schema is found in the local :class:`~schemas.catalog.Catalog` (every released version is
  there), and the body is resolved into the *current* schema of the same name, so a record
  written by an older release is read by newer code.
* **Confluent** (:class:`ConfluentCodec`, when a schema registry URL is configured): ``00``,
  then the registry's schema id as 4 big-endian bytes, then the body. Ids are registered and
  looked up through ``confluent_kafka.schema_registry``; subjects follow the record-name
  strategy (the subject is the full record name) unless told otherwise.

Decoding contract: :meth:`decode` returns a validated model or raises
:class:`~schemas.exceptions.DecodeError` with a stable :class:`DecodeReason`; it never
raises anything else, never allocates more than a small multiple of the message size
(which is checked first), and its work is linear in the message size (every array item and
map entry of our schemas takes at least one byte on the wire).
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar, overload

from fastavro import schemaless_reader
from fastavro.read import SchemaResolutionError
from fastavro.schema import to_parsing_canonical_form
from pydantic import ValidationError

from schemas.catalog import (
    Catalog,
    SchemaVersion,
    default_catalog,
    fingerprint64,
    parse_record_schema,
)
from schemas.exceptions import (
    CatalogError,
    DecodeError,
    DecodeReason,
    EncodeError,
    EncodeReason,
)
from schemas.headers import (
    CONFLUENT_CONTENT_TYPE,
    SINGLE_OBJECT_CONTENT_TYPE,
    Framing,
    KafkaHeaders,
    message_headers,
)
from schemas.limits import DEFAULT_LIMITS, Limits
from schemas.models import EVENT_MODELS, Event
from schemas.reader import compile_reader
from schemas.writer import Write, compile_writer

E = TypeVar("E", bound=Event)

SINGLE_OBJECT_MARKER = b"\xc3\x01"
SINGLE_OBJECT_HEADER_LEN = 10
CONFLUENT_MAGIC = 0
CONFLUENT_HEADER_LEN = 5

# pydantic error types that mean "over a size limit" rather than "wrong".
_SIZE_ERROR_TYPES = frozenset({"string_too_long", "too_long", "bytes_too_long", "too_large"})


class _Reading:
    """How to read one writer schema: into which reader schema and model (cached per writer)."""

    __slots__ = ("compiled", "model", "reader", "writer")

    def __init__(self, writer: SchemaVersion, current: SchemaVersion, model: type[Event]) -> None:
        self.writer = writer.parsed
        # Same wire schema: no resolution, so the compiled reader reads it (fastavro otherwise).
        same = writer.canonical == current.canonical
        self.reader = None if same else current.parsed
        self.compiled = compile_reader(writer.parsed) if same else None
        self.model = model


class _Codec:
    """What both framings share: body encoding, decoding, validation and error mapping."""

    framing: Framing
    content_type: str

    def __init__(self, catalog: Catalog | None = None, limits: Limits = DEFAULT_LIMITS) -> None:
        self.catalog = catalog if catalog is not None else default_catalog()
        self.limits = limits
        self._writers: dict[type[Event], tuple[Write, bytes]] = {}

    # -- encoding

    def _header_for(self, entry: SchemaVersion) -> bytes:
        raise NotImplementedError

    def _writer_for(self, event_type: type[Event]) -> tuple[Write, bytes]:
        cached = self._writers.get(event_type)
        if cached is None:
            try:
                entry = self.catalog.current(event_type.AVRO_NAME)
            except CatalogError as exc:
                raise EncodeError(EncodeReason.UNKNOWN_SCHEMA, str(exc)) from exc
            cached = (compile_writer(entry.parsed), self._header_for(entry))
            self._writers[event_type] = cached
        return cached

    def encode(self, event: Event) -> bytes:
        """Encode a (validated) event with its current schema and this codec's framing.

        Raises :class:`EncodeError` (``invalid``, ``too_large``, ``unknown_schema``, and for
        the registry ``registry_unavailable`` / ``registry_rejected``).
        """
        return self.encode_record(type(event), event.model_dump())

    def encode_record(self, event_type: type[Event], record: Mapping[str, Any]) -> bytes:
        """Encode a record already shaped like ``event_type``'s current schema.

        The producer's fast path: no pydantic model is built or dumped, so the caller owns the
        record's validity (the compiled writer still refuses a datum that does not fit). Union
        branches may be named with fastavro's ``(full_name, value)`` tuples, which skips the
        branch search. Raises :class:`EncodeError` like :meth:`encode`.
        """
        write, header = self._writer_for(event_type)
        out = bytearray(header)
        try:
            write(out, record)
        except Exception as exc:  # a datum that does not fit: TypeError, KeyError, ValueError...
            raise EncodeError(
                EncodeReason.INVALID, f"{event_type.AVRO_NAME}: {type(exc).__name__}: {exc}"
            ) from exc
        data = bytes(out)
        if len(data) > self.limits.max_message_bytes:
            raise EncodeError(
                EncodeReason.TOO_LARGE,
                f"{event_type.AVRO_NAME}: {len(data)} bytes > max_message_bytes "
                f"{self.limits.max_message_bytes}",
            )
        return data

    def headers(self, event: Event | type[Event]) -> KafkaHeaders:
        """Kafka headers for a message this codec encodes (content type, schema name)."""
        return message_headers(event.AVRO_NAME, self.framing)

    # -- decoding

    def _resolve(self, data: bytes | bytearray | memoryview) -> tuple[_Reading, int]:
        """Read the framing header: how to read the body, and where it starts."""
        raise NotImplementedError

    def _reading_for(self, writer: SchemaVersion) -> _Reading:
        model = EVENT_MODELS.get(writer.full_name)
        if model is None:
            raise DecodeError(DecodeReason.UNKNOWN_SCHEMA, f"no event model for {writer.full_name}")
        try:
            current = self.catalog.current(writer.full_name)
        except CatalogError as exc:
            raise DecodeError(DecodeReason.UNKNOWN_SCHEMA, str(exc)) from exc
        return _Reading(writer, current, model)

    @overload
    def decode(self, data: bytes | bytearray | memoryview) -> Event: ...

    @overload
    def decode(self, data: bytes | bytearray | memoryview, expected: type[E]) -> E: ...

    def decode(
        self, data: bytes | bytearray | memoryview, expected: type[Event] | None = None
    ) -> Event:
        """Decode and validate one message value.

        ``expected`` (an event class) makes any other event type an ``unexpected_schema``
        error. Raises :class:`DecodeError` and nothing else.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise DecodeError(DecodeReason.MALFORMED, f"value is {type(data).__name__}, not bytes")
        size = len(data)
        if size == 0:
            raise DecodeError(DecodeReason.EMPTY, "empty value")
        if size > self.limits.max_message_bytes:
            raise DecodeError(
                DecodeReason.TOO_LARGE,
                f"{size} bytes > max_message_bytes {self.limits.max_message_bytes}",
            )
        reading, start = self._resolve(data)
        if expected is not None and reading.model is not expected:
            raise DecodeError(
                DecodeReason.UNEXPECTED_SCHEMA,
                f"got {reading.model.AVRO_NAME}, expected {expected.AVRO_NAME}",
            )
        record = self._read_body(data, start, reading)
        return self._validate(reading.model, record)

    @staticmethod
    def _read_body(data: bytes | bytearray | memoryview, start: int, reading: _Reading) -> Any:
        end = len(data)
        try:
            if reading.compiled is not None:
                record, end = reading.compiled(bytes(data), start)
            else:
                buf = io.BytesIO(data)
                buf.seek(start)
                record = schemaless_reader(buf, reading.writer, reading.reader)
                end = buf.tell()
        except (EOFError, IndexError) as exc:
            # fastavro checks every length against what is left, so a bumped length field
            # ends here (not in a huge allocation): the body ends before the record does.
            raise DecodeError(DecodeReason.TRUNCATED, f"body ends early: {exc}") from exc
        except SchemaResolutionError as exc:
            raise DecodeError(DecodeReason.INCOMPATIBLE_SCHEMA, str(exc)) from exc
        except UnicodeDecodeError as exc:
            raise DecodeError(DecodeReason.MALFORMED, f"invalid UTF-8: {exc.reason}") from exc
        except Exception as exc:  # bad union/enum index, bad varint, out-of-range timestamp
            raise DecodeError(
                DecodeReason.MALFORMED, f"body does not match the schema: {type(exc).__name__}"
            ) from exc
        if end != len(data):
            raise DecodeError(
                DecodeReason.TRAILING_BYTES, f"{len(data) - end} bytes after the record"
            )
        return record

    @staticmethod
    def _validate(model: type[E], record: Any) -> E:
        try:
            return model.model_validate(record)
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_input=False, include_context=False)
            reason = (
                DecodeReason.SIZE_LIMIT
                if any(err["type"] in _SIZE_ERROR_TYPES for err in errors)
                else DecodeReason.INVALID
            )
            summary = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '<record>'}: {err['msg']}"
                for err in errors[:3]
            )
            more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
            raise DecodeError(reason, f"{model.AVRO_NAME}: {summary}{more}") from exc


class AvroCodec(_Codec):
    """Avro single-object encoding with writer schemas from the local catalog."""

    framing: Framing = "single-object"
    content_type = SINGLE_OBJECT_CONTENT_TYPE

    def __init__(self, catalog: Catalog | None = None, limits: Limits = DEFAULT_LIMITS) -> None:
        super().__init__(catalog, limits)
        self._readings: dict[bytes, _Reading] = {}

    def _header_for(self, entry: SchemaVersion) -> bytes:
        return SINGLE_OBJECT_MARKER + entry.fingerprint_bytes

    def _resolve(self, data: bytes | bytearray | memoryview) -> tuple[_Reading, int]:
        if bytes(data[:2]) != SINGLE_OBJECT_MARKER[: min(2, len(data))]:
            hint = " (Confluent framing?)" if data[0] == CONFLUENT_MAGIC else ""
            raise DecodeError(
                DecodeReason.BAD_MARKER, f"marker {bytes(data[:2]).hex()} is not c301{hint}"
            )
        if len(data) < SINGLE_OBJECT_HEADER_LEN:
            raise DecodeError(DecodeReason.TRUNCATED, f"{len(data)} bytes, header needs 10")
        key = bytes(data[2:SINGLE_OBJECT_HEADER_LEN])
        reading = self._readings.get(key)
        if reading is None:
            writer = self.catalog.by_fingerprint(int.from_bytes(key, "little"))
            if writer is None:
                raise DecodeError(DecodeReason.UNKNOWN_SCHEMA, f"unknown fingerprint {key.hex()}")
            reading = self._reading_for(writer)
            self._readings[key] = reading
        return reading, SINGLE_OBJECT_HEADER_LEN


def record_name_subject(entry: SchemaVersion) -> str:
    """Confluent RecordNameStrategy: the subject is the record's full name."""
    return entry.full_name


class ConfluentCodec(_Codec):
    """Confluent Schema Registry framing through ``confluent_kafka.schema_registry``.

    ``client`` is a ``SchemaRegistryClient`` (injected, so tests and callers choose its
    configuration); :meth:`from_url` builds one. Schema ids are cached for the life of the
    codec, in both directions. Registry failures are :class:`EncodeError` /
    :class:`DecodeError` with reason ``registry_unavailable`` (transient) or, for a
    schema the registry does not know or refuses, ``unknown_schema`` / ``registry_rejected``.
    """

    framing: Framing = "confluent"
    content_type = CONFLUENT_CONTENT_TYPE

    def __init__(
        self,
        client: Any,
        catalog: Catalog | None = None,
        limits: Limits = DEFAULT_LIMITS,
        subject_for: Callable[[SchemaVersion], str] = record_name_subject,
    ) -> None:
        super().__init__(catalog, limits)
        self.client = client
        self.subject_for = subject_for
        self._by_id: dict[int, _Reading] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_url(
        cls, url: str, catalog: Catalog | None = None, limits: Limits = DEFAULT_LIMITS
    ) -> ConfluentCodec:
        """A codec talking to the registry at ``url`` (comma-separated URLs allowed)."""
        from confluent_kafka.schema_registry import SchemaRegistryClient

        return cls(SchemaRegistryClient({"url": url}), catalog, limits)

    def _header_for(self, entry: SchemaVersion) -> bytes:
        from confluent_kafka.schema_registry import Schema, SchemaRegistryError

        try:
            schema_id = self.client.register_schema(
                self.subject_for(entry), Schema(entry.json, "AVRO")
            )
        except SchemaRegistryError as exc:
            reason = (
                EncodeReason.REGISTRY_UNAVAILABLE
                if exc.http_status_code >= 500 or exc.http_status_code in (401, 403, 408, 429)
                else EncodeReason.REGISTRY_REJECTED
            )
            raise EncodeError(reason, f"registering {entry.full_name}: {exc}") from exc
        except Exception as exc:  # connection refused, timeouts: the transport's own types
            raise EncodeError(
                EncodeReason.REGISTRY_UNAVAILABLE, f"registering {entry.full_name}: {exc}"
            ) from exc
        return bytes([CONFLUENT_MAGIC]) + int(schema_id).to_bytes(4, "big")

    def _resolve(self, data: bytes | bytearray | memoryview) -> tuple[_Reading, int]:
        if data[0] != CONFLUENT_MAGIC:
            hint = " (single-object framing?)" if bytes(data[:2]) == SINGLE_OBJECT_MARKER else ""
            raise DecodeError(
                DecodeReason.BAD_MARKER, f"magic byte {data[0]:#04x} is not 0x00{hint}"
            )
        if len(data) < CONFLUENT_HEADER_LEN:
            raise DecodeError(DecodeReason.TRUNCATED, f"{len(data)} bytes, header needs 5")
        schema_id = int.from_bytes(data[1:CONFLUENT_HEADER_LEN], "big")
        reading = self._by_id.get(schema_id)
        if reading is None:
            reading = self._fetch(schema_id)
            with self._lock:
                self._by_id[schema_id] = reading
        return reading, CONFLUENT_HEADER_LEN

    def _fetch(self, schema_id: int) -> _Reading:
        from confluent_kafka.schema_registry import SchemaRegistryError

        try:
            schema = self.client.get_schema(schema_id)
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                raise DecodeError(
                    DecodeReason.UNKNOWN_SCHEMA, f"registry id {schema_id}: {exc}"
                ) from exc
            raise DecodeError(
                DecodeReason.REGISTRY_UNAVAILABLE, f"registry id {schema_id}: {exc}"
            ) from exc
        except Exception as exc:
            raise DecodeError(
                DecodeReason.REGISTRY_UNAVAILABLE, f"registry id {schema_id}: {exc}"
            ) from exc
        try:
            raw = json.loads(schema.schema_str or "")
            canonical = to_parsing_canonical_form(json.loads(schema.schema_str or ""))
        except Exception as exc:
            raise DecodeError(
                DecodeReason.UNKNOWN_SCHEMA, f"registry id {schema_id}: not an Avro schema"
            ) from exc
        writer = self.catalog.by_canonical(canonical)
        if writer is None:
            # A version we do not ship (a newer producer): parse it, resolve into ours.
            try:
                parsed = parse_record_schema(raw)
            except Exception as exc:
                raise DecodeError(
                    DecodeReason.UNKNOWN_SCHEMA, f"registry id {schema_id}: {exc}"
                ) from exc
            writer = SchemaVersion(
                full_name=str(parsed["name"]),
                version=None,
                raw=raw,
                parsed=parsed,
                canonical=canonical,
                fingerprint=fingerprint64(canonical.encode("utf-8")),
                path=Path(f"registry:{schema_id}"),
            )
        return self._reading_for(writer)
