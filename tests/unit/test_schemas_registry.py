"""Confluent framing through confluent_kafka's registry client, against the protocol server."""

from __future__ import annotations

import io
import json
import socket
import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from fastavro import parse_schema, schemaless_writer

from schemas import (
    ConfluentCodec,
    DecodeError,
    DecodeReason,
    EncodeError,
    EncodeReason,
    InferenceRequest,
    InferenceResult,
    Inputs,
    default_catalog,
)
from schemas.headers import CONFLUENT_CONTENT_TYPE
from tests.schema_registry_server import SchemaRegistryServer


@pytest.fixture
def registry() -> Iterator[SchemaRegistryServer]:
    with SchemaRegistryServer() as server:
        yield server


def _codec(url: str) -> ConfluentCodec:
    # No retries: an injected outage must fail fast, not back off for seconds.
    return ConfluentCodec(SchemaRegistryClient({"url": url, "max.retries": 0}))


def _request() -> InferenceRequest:
    return InferenceRequest(
        request_id=uuid.uuid4(), model="fraud", inputs=Inputs(features={"amount": 3.5, "n": 2})
    )


def test_confluent_round_trip_registers_by_record_name(registry: SchemaRegistryServer) -> None:
    codec = _codec(registry.url)
    request = _request()
    data = codec.encode(request)
    assert data[0] == 0
    schema_id = int.from_bytes(data[1:5], "big")
    assert registry.state.subjects == {"io.sluiceway.v1.InferenceRequest": [schema_id]}
    # A fresh codec (another process) resolves the id through the registry.
    assert _codec(registry.url).decode(data, InferenceRequest) == request
    assert codec.headers(request)[0] == ("content-type", CONFLUENT_CONTENT_TYPE.encode())
    # Ids are cached: a second encode does not call the registry again.
    calls = len(registry.state.requests)
    codec.encode(request)
    assert len(registry.state.requests) == calls


def test_unknown_id_and_wrong_magic(registry: SchemaRegistryServer) -> None:
    codec = _codec(registry.url)
    with pytest.raises(DecodeError) as info:
        codec.decode(b"\x00\x00\x00\x03\x07abc")
    assert info.value.reason is DecodeReason.UNKNOWN_SCHEMA
    with pytest.raises(DecodeError) as info:
        codec.decode(b"\xc3\x01" + b"\x00" * 12)
    assert info.value.reason is DecodeReason.BAD_MARKER
    with pytest.raises(DecodeError) as info:
        codec.decode(b"\x00\x00\x01")
    assert info.value.reason is DecodeReason.TRUNCATED


def test_registry_outage_is_transient(registry: SchemaRegistryServer) -> None:
    registry.fail_status = 503
    with pytest.raises(EncodeError) as enc:
        _codec(registry.url).encode(_request())
    assert enc.value.reason is EncodeReason.REGISTRY_UNAVAILABLE
    assert enc.value.transient
    with pytest.raises(DecodeError) as dec:
        _codec(registry.url).decode(b"\x00\x00\x00\x00\x01\x00")
    assert dec.value.reason is DecodeReason.REGISTRY_UNAVAILABLE
    assert dec.value.transient


def test_unreachable_registry_is_transient() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connection refused
        with pytest.raises(EncodeError) as info:
            _codec(f"http://127.0.0.1:{port}").encode(_request())
    assert info.value.reason is EncodeReason.REGISTRY_UNAVAILABLE


def _newer_result_schema(change: str) -> str:
    raw = json.loads(default_catalog().current("InferenceResult").json)
    if change == "optional_field":
        raw["fields"].append({"name": "region", "type": ["null", "string"], "default": None})
    else:
        next(f for f in raw["fields"] if f["name"] == "status")["type"]["symbols"].append(
            "throttled"
        )
    return json.dumps(raw)


def test_newer_writer_schema_from_the_registry_is_resolved(registry: SchemaRegistryServer) -> None:
    """A producer with a newer (compatible) schema than ours: read it into our model."""
    newer = _newer_result_schema("optional_field")
    schema_id = registry.register("io.sluiceway.v1.InferenceResult", newer)
    buf = io.BytesIO()
    buf.write(b"\x00" + schema_id.to_bytes(4, "big"))
    request_id = uuid.uuid4()
    schemaless_writer(
        buf,
        parse_schema(json.loads(newer)),
        {"request_id": request_id, "status": "ok", "model": "m", "region": "eu"},
    )
    result = _codec(registry.url).decode(buf.getvalue(), InferenceResult)
    assert (result.request_id, result.status) == (request_id, "ok")


def test_unknown_enum_symbol_from_a_newer_writer_is_typed(registry: SchemaRegistryServer) -> None:
    newer = _newer_result_schema("enum_symbol")
    schema_id = registry.register("io.sluiceway.v1.InferenceResult", newer)
    buf = io.BytesIO()
    buf.write(b"\x00" + schema_id.to_bytes(4, "big"))
    schemaless_writer(
        buf,
        parse_schema(json.loads(newer)),
        {"request_id": uuid.uuid4(), "status": "throttled", "error_code": "x", "model": "m"},
    )
    with pytest.raises(DecodeError) as info:
        _codec(registry.url).decode(buf.getvalue())
    assert info.value.reason is DecodeReason.INCOMPATIBLE_SCHEMA
