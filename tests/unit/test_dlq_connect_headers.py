"""Every dead letter carries Kafka Connect's ``__connect.errors.*`` headers, bounded."""

from __future__ import annotations

from datetime import UTC, datetime

from connectors.common.dead_letters import encode_letter, unmappable_letter
from schemas.headers import CONNECT_MESSAGE_BYTES
from tests.unit.fakes import FakeMessage
from workers.inference import contracts


def _worker_headers(detail: str, topic: str = "inference.scaler.requests") -> dict[str, bytes]:
    message = FakeMessage(b"\x00junk", topic_name=topic, partition_number=2, offset_number=41)
    draft = contracts.build_dead_letter(
        message,
        "bad_marker",
        detail,
        "DecodeError",
        1,
        1_764_000_000_000,
        model="scaler",
        worker_id="w-1",
        inline_limit=1024,
        bucket="b",
    )
    return dict(draft.headers)


def test_a_worker_letter_names_its_origin_and_error_as_kafka_connect_does() -> None:
    headers = _worker_headers("the value has no Avro marker")

    assert headers["__connect.errors.topic"] == b"inference.scaler.requests"
    assert headers["__connect.errors.partition"] == b"2"
    assert headers["__connect.errors.offset"] == b"41"
    assert headers["__connect.errors.exception.class.name"] == b"DecodeError"
    assert headers["__connect.errors.exception.message"] == b"the value has no Avro marker"
    assert headers["sluiceway-dlq-reason"] == b"bad_marker"


def test_a_huge_or_unencodable_error_message_is_cut_to_valid_utf8() -> None:
    headers = _worker_headers("\ud800é" * 3000)

    text = headers["__connect.errors.exception.message"]
    assert len(text) <= CONNECT_MESSAGE_BYTES
    text.decode("utf-8")  # a cut never leaves half a character


def test_a_connector_letter_carries_the_same_headers() -> None:
    sealed = unmappable_letter(
        model="scaler",
        source_payload=b"{}",
        reason_code="missing_field",
        message="field BUKRS is missing",
        source_system="S4H",
        now=datetime(2026, 12, 1, tzinfo=UTC),
    )
    _, headers = encode_letter(sealed)
    named = dict(headers)

    assert named["__connect.errors.topic"] == b"connector:S4H"
    assert named["__connect.errors.partition"] == b"0"
    assert named["__connect.errors.offset"] == b"0"
    assert named["__connect.errors.exception.class.name"] == b"UnservableRecord"
    assert named["__connect.errors.exception.message"] == b"field BUKRS is missing"
