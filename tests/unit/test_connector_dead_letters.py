"""Dead letters of connectors and checkpoint positions: the pure parts."""

from __future__ import annotations

import base64
import json
import os
from datetime import UTC, datetime
from typing import Any

import pytest

import schemas
from connectors.common.checkpoint import (
    checkpoint_topic,
    checkpoint_topic_spec,
    position_bytes,
    position_text,
)
from connectors.common.dead_letters import (
    WITHHELD,
    LetterPrivacy,
    encode_letter,
    letter_privacy,
    record_values,
    unmappable_letter,
)
from connectors.common.exceptions import CheckpointError
from pipeline.privacy import (
    ORIGINAL_HEADER,
    REDACTED,
    OriginalPolicy,
    associated_data,
    key_id,
    open_original,
)
from pipeline.settings import ModelSettings, Settings, SettingsError, WorkerSettings
from schemas.models import DeadLetter

NOW = datetime(2024, 5, 1, 12, tzinfo=UTC)
AES_KEY = bytes(range(32))
CANARY = "734512.8125"
PAYLOAD = json.dumps(
    {"SupplierInvoice": "5105600001", "InvoiceGrossAmount": CANARY, "to_Supplier": {"Name": "Ada"}}
).encode()


def test_an_unmappable_record_keeps_its_payload_and_reason() -> None:
    sealed = unmappable_letter(
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
    letter = sealed.letter
    assert sealed.treatment == [], "no policy: the original goes as it came, and says nothing"
    value, headers = encode_letter(sealed)
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
    assert named["sluiceway-dlq-error-class"] == b"UnservableRecord"
    assert named["sluiceway-dlq-attempts"] == b"1"


def test_long_messages_are_cut_to_the_contract() -> None:
    letter = unmappable_letter(
        model="m",
        source_payload=b"",
        reason_code="x",
        message="y" * 10_000,
        source_system="S",
        now=NOW,
    ).letter
    assert len(letter.reason_message) == 4000


# ---------------------------------------------------------------------- personal data


def _letter(privacy: LetterPrivacy, message: str, payload: bytes = PAYLOAD) -> Any:
    return unmappable_letter(
        model="invoice_risk",
        source_payload=payload,
        reason_code="invalid_field",
        message=message,
        source_system="S4H",
        source_key="evt-7",
        now=NOW,
        privacy=privacy,
    )


def test_a_personal_models_letter_is_sealed_and_opens_with_the_key_for_its_origin() -> None:
    privacy = LetterPrivacy(OriginalPolicy("encrypt", AES_KEY), personal=True)
    sealed = _letter(privacy, "field 'NetPaymentDays': a text that is not a number")
    value, headers = encode_letter(sealed)
    assert CANARY.encode() not in value
    assert dict(headers)[ORIGINAL_HEADER] == f"encrypted;key_id={key_id(AES_KEY)}".encode()
    letter = schemas.decode(value, DeadLetter)
    assert letter.original_value is not None
    aad = associated_data(letter.original_topic, 0, 0)
    assert letter.original_topic == "connector:S4H"
    assert open_original(letter.original_value, [AES_KEY], aad) == PAYLOAD
    assert letter.reason_message == "field 'NetPaymentDays': a text that is not a number"


def test_a_dropped_original_leaves_nothing_but_the_header() -> None:
    value, headers = encode_letter(_letter(LetterPrivacy(OriginalPolicy("drop")), "m"))
    assert schemas.decode(value, DeadLetter).original_value is None
    assert dict(headers)[ORIGINAL_HEADER] == b"dropped"
    assert b"Ada" not in value


def test_a_personal_models_letter_text_quotes_no_value_of_the_record() -> None:
    privacy = LetterPrivacy(OriginalPolicy("drop"), personal=True)
    # Text a connector did not write itself (a library's error) may quote anything.
    quoted = f"cannot parse {CANARY!r} of 'InvoiceGrossAmount' near {float(CANARY)}; Ada"
    letter = _letter(privacy, quoted).letter
    assert CANARY not in letter.reason_message
    assert "Ada" not in letter.reason_message
    assert letter.reason_message.count(REDACTED) == 3
    assert "'InvoiceGrossAmount'" in letter.reason_message, "field names stay: they are no values"
    # Without a pii policy nothing is scrubbed (messages quote no values in the first place).
    assert _letter(LetterPrivacy(OriginalPolicy("drop")), quoted).letter.reason_message == quoted


def test_a_payload_that_is_no_json_is_scrubbed_word_by_word() -> None:
    privacy = LetterPrivacy(OriginalPolicy("drop"), personal=True)
    body = b"specversion=1.0&data=canary-7f3e@example.com;amount:734512.8125"
    letter = _letter(privacy, "not JSON: 'canary-7f3e@example.com' amount 734512.8125", body)
    assert "canary" not in letter.letter.reason_message
    assert CANARY not in letter.letter.reason_message


def test_the_values_of_a_hostile_payload_are_found_however_deep_it_nests() -> None:
    # Too deep for the JSON parser: cut into words instead, the value is still among them.
    deep_list = b"[" * 100_000 + b'"secret-value"' + b"]" * 100_000
    deep_object = b'{"n": ' * 5_000 + b'"secret-value"' + b"}" * 5_000
    for payload in (deep_list, deep_object):
        assert "secret-value" in record_values(payload)
    shallow = json.dumps({"a": [{"b": "secret-value"}, 7.5, True, None]}).encode()
    assert sorted(map(str, record_values(shallow))) == ["7.5", "True", "secret-value"]


def test_scrubbing_that_fails_withholds_the_text() -> None:
    privacy = LetterPrivacy(OriginalPolicy("drop"), personal=True)

    class Unreplaceable(str):
        def replace(self, *args: Any) -> str:  # type: ignore[override]
            raise RuntimeError("a text type of somebody else's")

    assert _letter(privacy, Unreplaceable("text with Ada")).letter.reason_message == WITHHELD


def _settings(pii: dict[str, Any], **workers: Any) -> Settings:
    model = ModelSettings(feature_order=("amount_eur", "days"), pii=pii)
    return Settings(workers=WorkerSettings(**workers), models={"invoice_risk": model})


def test_a_connector_for_a_pii_model_refuses_raw_letters_like_its_worker() -> None:
    with pytest.raises(SettingsError, match="dead_letter_original"):
        letter_privacy(_settings({"amount_eur": "drop"}), "invoice_risk")
    with pytest.raises(SettingsError, match="pii_hash_key"):
        letter_privacy(
            _settings({"amount_eur": "hash"}, dead_letter_original="drop"), "invoice_risk"
        )
    with pytest.raises(SettingsError, match=r"not in settings\.models"):
        letter_privacy(_settings({}), "other")
    key = base64.b64encode(os.urandom(32)).decode()
    sealing = letter_privacy(
        _settings({"amount_eur": "drop"}, dead_letter_original="encrypt", dead_letter_key=key),
        "invoice_risk",
    )
    assert sealing.personal
    assert sealing.originals.mode == "encrypt"
    # No policy: the worker's setting still applies to the original, the text is left alone.
    plain = letter_privacy(_settings({}, dead_letter_original="drop"), "invoice_risk")
    assert (plain.personal, plain.originals.mode) == (False, "drop")
    assert letter_privacy(_settings({}), "invoice_risk").originals.mode == "keep"


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
