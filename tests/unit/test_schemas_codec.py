"""Single-object wire format, schema evolution through the catalog, headers, hostile input."""

from __future__ import annotations

import io
import json
import shutil
import tracemalloc
import uuid
from pathlib import Path

import pytest
from fastavro import schemaless_writer
from hypothesis import given
from hypothesis import strategies as st

from schemas import (
    AvroCodec,
    Catalog,
    DecodeError,
    DecodeReason,
    EncodeError,
    EncodeReason,
    InferenceRequest,
    InferenceResult,
    Inputs,
    Limits,
    decode,
    default_catalog,
    encode,
    fingerprint64,
    message_headers,
    read_headers,
)
from schemas.catalog import PACKAGE_ROOT
from schemas.codec import SINGLE_OBJECT_HEADER_LEN
from tests.unit.test_schemas_strategies import SETTINGS, events, requests


def _request(**features: object) -> InferenceRequest:
    return InferenceRequest(
        request_id=uuid.UUID(int=7), model="fraud", inputs=Inputs(features=features or {"a": 1.5})
    )


def test_fingerprint_matches_the_avro_reference_value() -> None:
    # Value from the Avro project's reference test vectors for the schema "int".
    assert fingerprint64(b'"int"') == 8247732601305521295


def test_single_object_layout() -> None:
    data = encode(_request())
    entry = default_catalog().current("InferenceRequest")
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == entry.fingerprint.to_bytes(8, "little")
    assert entry.version == 1


@SETTINGS
@given(events)
def test_every_event_round_trips_through_the_codec(event: object) -> None:
    assert decode(encode(event)) == event  # type: ignore[arg-type]


def test_expected_type_is_enforced() -> None:
    with pytest.raises(DecodeError) as info:
        decode(encode(_request()), InferenceResult)
    assert info.value.reason is DecodeReason.UNEXPECTED_SCHEMA


def test_headers_name_content_type_and_schema() -> None:
    headers = message_headers(InferenceRequest.AVRO_NAME)
    assert headers == [
        ("content-type", b"application/vnd.sluiceway.avro"),
        ("sluiceway-schema", b"io.sluiceway.v1.InferenceRequest"),
    ]
    kind = read_headers([("Content-Type", b"avro/binary; framing=confluent"), ("x", b"\xff")])
    assert (kind.framing, kind.schema_name) == ("confluent", None)
    assert AvroCodec().headers(_request()) == headers


def _evolved_catalog(tmp_path: Path, field: dict[str, object]) -> Catalog:
    """A copy of the shipped catalog whose current InferenceRequest gained ``field``."""
    root = tmp_path / "catalog"
    shutil.copytree(PACKAGE_ROOT / "avro", root / "avro")
    shutil.copytree(PACKAGE_ROOT / "history", root / "history")
    path = root / "avro" / "InferenceRequest.avsc"
    raw = json.loads(path.read_text())
    raw["fields"].append(field)
    path.write_text(json.dumps(raw))
    return Catalog(root)


def test_data_written_with_the_released_v1_is_read_by_a_newer_schema(tmp_path: Path) -> None:
    newer = _evolved_catalog(
        tmp_path, {"name": "region", "type": ["null", "string"], "default": None}
    )
    assert newer.current("InferenceRequest").version is None  # changed, unreleased
    # Written by the real released version 1 (the shipped history file)...
    v1 = default_catalog().releases("InferenceRequest")[0]
    assert v1.path == PACKAGE_ROOT / "history" / "InferenceRequest" / "1.avsc"
    old_bytes = AvroCodec(default_catalog()).encode(_request(x=1))
    assert old_bytes[2:10] == v1.fingerprint_bytes
    # ...and read with the newer reader: the writer is found by fingerprint, then resolved.
    codec = AvroCodec(newer)
    record = codec._read_body(old_bytes, SINGLE_OBJECT_HEADER_LEN, codec._resolve(old_bytes)[0])
    assert record["region"] is None
    assert record["inputs"]["features"] == {"x": 1}


# ----------------------------------------------------------------------------- hostile input


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", DecodeReason.EMPTY),
        (b"\x00\x00\x00\x00\x01abc", DecodeReason.BAD_MARKER),
        (b"\xc3\x02" + b"\x00" * 20, DecodeReason.BAD_MARKER),
        (b"\xc3\x01\x01", DecodeReason.TRUNCATED),
        (b"\xc3\x01" + b"\xff" * 8 + b"\x00", DecodeReason.UNKNOWN_SCHEMA),
    ],
)
def test_framing_errors(data: bytes, reason: DecodeReason) -> None:
    with pytest.raises(DecodeError) as info:
        decode(data)
    assert info.value.reason is reason


def test_truncated_extended_and_oversized_messages() -> None:
    data = encode(_request())
    for cut in range(SINGLE_OBJECT_HEADER_LEN, len(data)):
        with pytest.raises(DecodeError) as info:
            decode(data[:cut])
        assert info.value.reason in (DecodeReason.TRUNCATED, DecodeReason.MALFORMED)
    with pytest.raises(DecodeError) as info:
        decode(data + b"\x00")
    assert info.value.reason is DecodeReason.TRAILING_BYTES
    small = AvroCodec(limits=Limits(max_message_bytes=len(data) - 1))
    with pytest.raises(DecodeError) as info:
        small.decode(data)
    assert info.value.reason is DecodeReason.TOO_LARGE
    with pytest.raises(EncodeError) as enc:
        small.encode(_request())
    assert enc.value.reason is EncodeReason.TOO_LARGE


def test_wrong_types_inside_a_valid_encoding_are_invalid() -> None:
    # A valid Avro body whose values break the contract: priority out of range, and a
    # request with two input shapes. Encoded with fastavro directly, bypassing the model.
    entry = default_catalog().current("InferenceRequest")
    buf = io.BytesIO()
    buf.write(b"\xc3\x01" + entry.fingerprint_bytes)
    schemaless_writer(
        buf,
        entry.parsed,
        {
            "request_id": uuid.uuid4(),
            "model": "m",
            "priority": 99,
            "inputs": {"features": {}, "text": {"prompt": "x"}},
        },
    )
    with pytest.raises(DecodeError) as info:
        decode(buf.getvalue())
    assert info.value.reason is DecodeReason.INVALID
    assert "priority" in str(info.value)


def test_strings_and_maps_over_limits_are_size_limit_errors() -> None:
    entry = default_catalog().current("InferenceRequest")
    for record in (
        {"request_id": uuid.uuid4(), "model": "m" * 300, "inputs": {"features": {}}},
        {
            "request_id": uuid.uuid4(),
            "model": "m",
            "inputs": {"features": {f"f{i}": None for i in range(2000)}},
        },
    ):
        buf = io.BytesIO()
        buf.write(b"\xc3\x01" + entry.fingerprint_bytes)
        schemaless_writer(buf, entry.parsed, record)
        with pytest.raises(DecodeError) as info:
            decode(buf.getvalue())
        assert info.value.reason is DecodeReason.SIZE_LIMIT


def _varint(n: int) -> bytes:
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def test_huge_length_fields_are_caught_without_allocating() -> None:
    header = b"\xc3\x01" + default_catalog().current("InferenceRequest").fingerprint_bytes
    uuid_field = _varint(36) + str(uuid.uuid4()).encode()
    tracemalloc.start()
    try:
        for length in (2**31, 2**40, 2**62):
            with pytest.raises(DecodeError) as info:
                decode(header + uuid_field + _varint(length) + b"abc")
            assert info.value.reason is DecodeReason.TRUNCATED
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def _mutations(data: bytes) -> st.SearchStrategy[bytes]:
    body = st.integers(0, len(data) - 1)
    flips = st.tuples(body, st.integers(0, 7)).map(
        lambda t: data[: t[0]] + bytes([data[t[0]] ^ (1 << t[1])]) + data[t[0] + 1 :]
    )
    cuts = st.integers(0, len(data) - 1).map(lambda i: data[:i])
    extensions = st.binary(min_size=1, max_size=16).map(lambda b: data + b)
    # Overwrite a position with a long varint: a length or count field made huge.
    bumps = st.tuples(body, st.integers(2**20, 2**62)).map(
        lambda t: data[: t[0]] + _varint(t[1]) + data[t[0] + 1 :]
    )
    return st.one_of(flips, cuts, extensions, bumps)


@SETTINGS
@given(st.data())
def test_fuzz_decoder_only_raises_decode_errors(data: st.DataObject) -> None:
    valid = encode(data.draw(requests))
    blob = data.draw(
        st.one_of(
            st.binary(max_size=256),
            st.binary(max_size=64).map(lambda b: valid[:SINGLE_OBJECT_HEADER_LEN] + b),
            _mutations(valid),
        )
    )
    try:
        event = decode(blob)
    except DecodeError as exc:
        reason: DecodeReason | None = exc.reason
    else:
        reason = None
        # A mutation may still be a valid message; then it is a normal, stable event.
        assert decode(encode(event)) == event
    assert reason is None or isinstance(reason, DecodeReason)
