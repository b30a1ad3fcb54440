"""The compiled Avro writer writes exactly the bytes fastavro writes, for every event type."""

from __future__ import annotations

import io
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_writer
from hypothesis import given

from schemas import default_catalog
from schemas.models import EVENT_MODELS, Event
from schemas.writer import SchemaCompileError, compile_writer, encoder, write_long
from tests.unit.test_schemas_strategies import SETTINGS, events


def _fastavro(schema: Any, datum: Any) -> bytes:
    out = io.BytesIO()
    schemaless_writer(out, schema, datum)
    return out.getvalue()


def _current(event: Event) -> dict[str, Any]:
    return default_catalog().current(type(event).AVRO_NAME).parsed


@SETTINGS
@given(events)
def test_every_generated_event_encodes_exactly_as_fastavro_does(event: Event) -> None:
    schema = _current(event)
    datum = event.model_dump()
    assert encoder(schema)(datum) == _fastavro(schema, datum)


def test_every_schema_in_the_catalog_compiles() -> None:
    catalog = default_catalog()
    for name in EVENT_MODELS:
        for entry in catalog.releases(name) or [catalog.current(name)]:
            compile_writer(entry.parsed)
        compile_writer(catalog.current(name).parsed)


@pytest.mark.parametrize(
    "value", [0, 1, -1, 63, -64, 64, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63), 300, -301]
)
def test_varints_match_fastavro(value: int) -> None:
    out = bytearray()
    write_long(out, value)
    assert bytes(out) == _fastavro("long", value)


def _schema(raw: Any) -> Any:
    return parse_schema(raw)


def test_unions_choose_branches_by_name_or_by_python_type() -> None:
    schema = _schema(
        {
            "type": "record",
            "name": "t.Outer",
            "fields": [
                {"name": "any", "type": ["null", "boolean", "long", "double", "string"]},
                {
                    "name": "either",
                    "type": [
                        "null",
                        {"type": "record", "name": "t.A", "fields": [{"name": "a", "type": "int"}]},
                        {"type": "record", "name": "t.B", "fields": [{"name": "b", "type": "int"}]},
                    ],
                },
                {"name": "items", "type": {"type": "array", "items": "t.A"}},
                {"name": "when", "type": {"type": "long", "logicalType": "timestamp-millis"}},
                {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
            ],
        }
    )
    write = encoder(schema)
    when = datetime(2026, 11, 26, 1, 2, 3, 456_000, tzinfo=UTC)
    ident = uuid.UUID(int=7)
    for any_value in [None, True, False, 5, -5, 2.5, "x"]:
        datum = {
            "any": any_value,
            "either": ("t.B", {"b": 3}),
            "items": [{"a": 1}, {"a": 2}],
            "when": when,
            "id": ident,
        }
        assert write(datum) == _fastavro(schema, datum)


def test_a_datum_that_does_not_fit_raises() -> None:
    write = encoder(
        _schema({"type": "record", "name": "t.R", "fields": [{"name": "n", "type": "long"}]})
    )
    for bad in [{"n": "seven"}, {"n": True}, {}]:
        with pytest.raises((TypeError, KeyError)):
            write(bad)


def test_an_unsupported_logical_type_is_refused_at_compile_time() -> None:
    with pytest.raises(SchemaCompileError):
        compile_writer({"type": "bytes", "logicalType": "decimal", "precision": 4, "scale": 2})
