"""The compiled Avro reader returns exactly what fastavro returns, for every event type."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_reader
from hypothesis import given
from hypothesis import strategies as st

from schemas import default_catalog, encode
from schemas.codec import SINGLE_OBJECT_HEADER_LEN
from schemas.models import EVENT_MODELS, Event
from schemas.reader import ReaderCompileError, compile_reader
from schemas.writer import encoder
from tests.unit.test_schemas_strategies import SETTINGS, events


def _fastavro(schema: Any, data: bytes) -> Any:
    return schemaless_reader(io.BytesIO(data), schema, None)


@SETTINGS
@given(events)
def test_every_generated_event_reads_exactly_as_fastavro_reads_it(event: Event) -> None:
    schema = default_catalog().current(type(event).AVRO_NAME).parsed
    body = encode(event)[SINGLE_OBJECT_HEADER_LEN:]
    value, end = compile_reader(schema)(body, 0)
    assert value == _fastavro(schema, body)
    assert end == len(body)


def test_every_schema_in_the_catalog_compiles() -> None:
    catalog = default_catalog()
    for name in EVENT_MODELS:
        for entry in [*catalog.releases(name), catalog.current(name)]:
            compile_reader(entry.parsed)


_SCHEMA = parse_schema(
    {
        "type": "record",
        "name": "t.Outer",
        "fields": [
            {"name": "any", "type": ["null", "boolean", "long", "double", "string"]},
            {"name": "kind", "type": {"type": "enum", "name": "t.Kind", "symbols": ["a", "b"]}},
            {"name": "again", "type": "t.Kind"},
            {"name": "tags", "type": {"type": "map", "values": {"type": "array", "items": "int"}}},
            {"name": "blob", "type": {"type": "fixed", "name": "t.Four", "size": 4}},
            {"name": "ratio", "type": "float"},
        ],
    }
)
_values = st.fixed_dictionaries(
    {
        "any": st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.text()),
        "kind": st.sampled_from(["a", "b"]),
        "again": st.sampled_from(["a", "b"]),
        "tags": st.dictionaries(st.text(max_size=5), st.lists(st.integers(-(2**31), 2**31 - 1))),
        "blob": st.binary(min_size=4, max_size=4),
        "ratio": st.floats(width=32, allow_nan=False),
    }
)


@SETTINGS
@given(_values)
def test_unions_enums_maps_and_fixed_read_as_fastavro_reads_them(datum: dict[str, Any]) -> None:
    body = encoder(_SCHEMA)(datum)
    value, end = compile_reader(_SCHEMA)(body, 0)
    assert value == _fastavro(_SCHEMA, body)
    assert end == len(body)


@SETTINGS
@given(_values, st.data())
def test_cut_or_corrupted_data_raises_only_the_errors_the_codec_maps(
    datum: dict[str, Any], data: st.DataObject
) -> None:
    body = bytearray(encoder(_SCHEMA)(datum))
    cut = data.draw(st.integers(0, len(body)))
    if data.draw(st.booleans()) and body:
        body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
    # Anything else escaping (TypeError, KeyError, RecursionError...) fails the test.
    with contextlib.suppress(EOFError, ValueError, IndexError):
        compile_reader(_SCHEMA)(bytes(body[:cut]), 0)


def test_an_unsupported_logical_type_is_refused_at_compile_time() -> None:
    with pytest.raises(ReaderCompileError):
        compile_reader({"type": "bytes", "logicalType": "decimal", "precision": 4, "scale": 2})
