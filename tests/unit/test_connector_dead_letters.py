"""Dead letters of connectors and checkpoint positions: the pure parts."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

import schemas
from connectors.common.checkpoint import (
    checkpoint_topic,
    checkpoint_topic_spec,
    position_bytes,
    position_text,
)
from connectors.common.dead_letters import encode_letter, unmappable_letter
from connectors.common.exceptions import CheckpointError
from schemas.models import DeadLetter

NOW = datetime(2024, 5, 1, 12, tzinfo=UTC)


def test_an_unmappable_record_keeps_its_payload_and_reason() -> None:
    letter = unmappable_letter(
        model="invoice_risk",
        source_payload=b'{"SupplierInvoice": "1"}',
        reason_code="missing_field",
        message="field 'InvoiceGrossAmount' (feature 'amount_eur') is missing",
        source_system="S4H",
        source_key="evt-1",
        source_headers={"ce-type": "sap.s4.beh.supplierinvoice.v1.SupplierInvoice.Created.v1"},
        request_id="r-1",
        connector="sap",
        now=NOW,
    )
    value, headers = encode_letter(letter)
    decoded = schemas.decode(value, DeadLetter)
    assert decoded == letter
    assert decoded.original_topic == "connector:S4H"
    assert decoded.original_value == b'{"SupplierInvoice": "1"}'
    assert decoded.original_key == b"evt-1"
    assert decoded.worker_id == "sap"
    assert decoded.first_failure_at == decoded.last_failure_at == NOW
    named = dict(headers)
    # The same headers the worker's dead letters carry: readable without decoding.
    assert named["sluiceway-dlq-reason"] == b"missing_field"
    assert named["sluiceway-dlq-error-class"] == b"UnmappableRecord"
    assert named["sluiceway-dlq-attempts"] == b"1"


def test_long_messages_are_cut_to_the_contract() -> None:
    letter = unmappable_letter(
        model="m",
        source_payload=b"",
        reason_code="x",
        message="y" * 10_000,
        source_system="S",
        now=NOW,
    )
    assert len(letter.reason_message) == 4000


def test_positions_are_text_and_bytes_travel_as_base64() -> None:
    assert position_text("2024-05-01T10:00:00Z") == "2024-05-01T10:00:00Z"
    replay_id = bytes([0, 0, 1, 255])
    assert position_text(replay_id) == "AAAB/w=="
    assert position_bytes(position_text(replay_id)) == replay_id
    with pytest.raises(CheckpointError, match="not base64"):
        position_bytes("not base64!")


def test_the_checkpoint_topic_is_compacted_with_one_partition() -> None:
    spec = checkpoint_topic_spec("prod")
    assert spec.name == checkpoint_topic("prod") == "prod.connectors.checkpoints"
    assert spec.partitions == 1
    assert spec.config["cleanup.policy"] == "compact"
