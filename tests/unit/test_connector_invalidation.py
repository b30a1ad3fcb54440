"""An invalidation message: keyed like the entity's requests, encoded like every event."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from pydantic import ValidationError

import schemas
from connectors.common.invalidation import invalidation_message
from schemas.headers import read_headers
from schemas.models import Invalidation, InvalidationKind
from tests.unit.test_schemas_strategies import SETTINGS, invalidations


def _invalidation(**overrides: object) -> Invalidation:
    fields: dict[str, object] = {
        "event_id": uuid.UUID("0b7c6f3e-4d0e-4a51-9a57-2f1d1f0c9b11"),
        "model": "invoice_risk",
        "entity_key": "1010/5100000123/2026",
        "kind": InvalidationKind.CANCELLED,
        "source_system": "S4H",
        "source_event_id": "a7f1c2d0-5b1e-4c7e-9d1a-0e6f2b3c4d5e",
        "occurred_at": datetime(2026, 3, 1, 9, 30, 0, 123456, tzinfo=timezone(timedelta(hours=1))),
        "connector": "sap",
        "reason": "Invoice reversed by document 5100000999",
    }
    fields.update(overrides)
    return Invalidation.model_validate(fields)


def test_the_key_is_the_entity_key_and_the_value_decodes_back_equal() -> None:
    invalidation = _invalidation()
    key, value, _headers = invalidation_message(invalidation)
    assert key == b"1010/5100000123/2026"
    decoded = schemas.decode(value, Invalidation)
    assert decoded == invalidation
    assert decoded.occurred_at == datetime(2026, 3, 1, 8, 30, 0, 123000, tzinfo=UTC)
    assert decoded.kind is InvalidationKind.CANCELLED


def test_the_headers_are_those_of_every_contract_event() -> None:
    _key, value, headers = invalidation_message(_invalidation())
    assert headers == schemas.message_headers("io.sluiceway.v1.Invalidation")
    kind = read_headers(headers)
    assert kind.framing == "single-object"
    assert kind.schema_name == Invalidation.AVRO_NAME
    assert value[:2] == b"\xc3\x01"


def test_optional_fields_may_be_absent() -> None:
    bare = _invalidation(source_system=None, source_event_id=None, reason=None)
    _key, value, _headers = invalidation_message(bare)
    assert schemas.decode(value, Invalidation) == bare


def test_a_unicode_entity_key_is_utf8_on_the_wire() -> None:
    key, _value, _headers = invalidation_message(_invalidation(entity_key="Zürich/Ω/😀"))
    assert key == "Zürich/Ω/😀".encode()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("entity_key", ""),
        ("entity_key", "k" * 257),
        ("model", ""),
        ("connector", ""),
        ("source_event_id", "e" * 257),
        ("kind", "archived"),
        ("occurred_at", datetime(2026, 3, 1)),  # naive: no zone, no instant
    ],
)
def test_hostile_fields_are_refused_before_anything_is_encoded(field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        _invalidation(**{field: value})


@SETTINGS
@given(invalidations)
def test_every_valid_invalidation_round_trips(invalidation: Invalidation) -> None:
    key, value, _headers = invalidation_message(invalidation)
    assert key.decode("utf-8") == invalidation.entity_key
    assert schemas.decode(value, Invalidation) == invalidation
