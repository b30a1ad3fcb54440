"""Dead letters cannot fail: whatever a record carries, its letter is built, decodes, and fits.

``contracts.build_dead_letter`` is the last stop of a poison record; should it raise, the
record would have no outcome and its offset could never be committed.
"""

from __future__ import annotations

import string
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import schemas
from pipeline.settings import Settings
from schemas.limits import MiB
from schemas.models import DeadLetter
from tests.unit.fakes import FakeMessage
from workers.inference import contracts
from workers.inference.contracts import (
    MAX_LETTER_HEADER_BYTES,
    MAX_LETTER_HEADERS,
    LetterDraft,
)
from workers.inference.sink import letter_limits

LIMITS = letter_limits(
    Settings().workers.max_message_bytes, Settings().workers.dead_letter_inline_bytes
)
"""What the sink passes: value, header and key budgets under the producer's limit."""
INLINE = LIMITS["inline_limit"]
KEY_LIMIT = LIMITS["key_limit"]
NOW_MS = 1_764_000_000_000
BUCKET = "sluiceway-results"


def _letter(
    message: FakeMessage,
    *,
    reason: str = "invalid",
    detail: str = "the record breaks the contract",
    error_class: str = "DecodeError",
    attempts: int = 0,
    request_id: str | None = None,
    model: str = "scaler",
) -> tuple[LetterDraft, DeadLetter]:
    draft = contracts.build_dead_letter(
        message,
        reason,
        detail,
        error_class,
        attempts,
        NOW_MS,
        model=model,
        worker_id="worker-1",
        request_id=request_id,
        bucket=BUCKET,
        **LIMITS,
    )
    assert len(draft.value) < MiB
    letter = schemas.decode(draft.value, DeadLetter)
    headers = dict(draft.headers)
    assert headers["sluiceway-schema"] == DeadLetter.AVRO_NAME.encode()
    assert headers["sluiceway-dlq-reason"] == letter.reason_code.encode()
    assert (draft.offload_key is None) == (draft.offload_body is None)
    return draft, letter


def _message(**fields: Any) -> FakeMessage:
    return FakeMessage(fields.pop("value", b"\x00bad"), offset_number=77, **fields)


def test_a_plain_letter_keeps_the_original_record() -> None:
    message = _message(key_data=b"entity-1", header_data=[("trace", b"abc"), ("empty", None)])
    draft, letter = _letter(message, attempts=3, request_id="r-1")
    assert (letter.original_topic, letter.original_partition, letter.original_offset) == (
        "inference.scaler.requests",
        0,
        77,
    )
    assert (letter.original_key, letter.original_value) == (b"entity-1", b"\x00bad")
    assert [(h.key, h.value) for h in letter.original_headers or []] == [
        ("trace", b"abc"),
        ("empty", None),
    ]
    assert letter.original_timestamp == datetime.fromtimestamp(message.timestamp_ms / 1000, UTC)
    assert (letter.reason_code, letter.error_class, letter.attempts) == (
        "invalid",
        "DecodeError",
        3,
    )
    assert (letter.request_id, letter.model, letter.worker_id) == ("r-1", "scaler", "worker-1")
    assert letter.dropped_headers is None
    assert letter.original_ref is None
    assert draft.offload_key is None


def test_more_headers_than_the_contract_holds_are_named_as_dropped() -> None:
    pairs = [(f"h{i}", b"v") for i in range(5000)]
    _, letter = _letter(_message(header_data=pairs))
    assert [h.key for h in letter.original_headers or []] == [
        f"h{i}" for i in range(MAX_LETTER_HEADERS)
    ]
    dropped = letter.dropped_headers or []
    assert dropped[:MAX_LETTER_HEADERS] == [
        f"h{i}" for i in range(MAX_LETTER_HEADERS, 2 * MAX_LETTER_HEADERS)
    ]
    assert dropped[-1] == f"<{5000 - 2 * MAX_LETTER_HEADERS} more>"


def test_a_header_name_longer_than_a_name_is_dropped_and_named_cut_short() -> None:
    long_name = "k" * 300
    _, letter = _letter(_message(header_data=[(long_name, b"v"), ("ok", b"1")]))
    assert [h.key for h in letter.original_headers or []] == ["ok"]
    (dropped,) = letter.dropped_headers or []
    assert dropped == long_name[:256]


def test_header_values_over_the_budget_are_dropped() -> None:
    pairs = [(f"big{i}", b"x" * (512 * 1024)) for i in range(6)] + [("small", b"s")]
    _, letter = _letter(_message(header_data=pairs))
    kept = letter.original_headers or []
    assert [h.key for h in kept] == ["small"]
    assert sum(len(h.value or b"") for h in kept) <= MAX_LETTER_HEADER_BYTES
    assert letter.dropped_headers == [f"big{i}" for i in range(6)]


def test_headers_just_under_the_budget_are_kept_together() -> None:
    pairs = [(f"h{i}", b"x" * 16_000) for i in range(5)]
    _, letter = _letter(_message(header_data=pairs))
    assert [h.key for h in letter.original_headers or []] == ["h0", "h1", "h2", "h3"]
    assert letter.dropped_headers == ["h4"]


def test_headers_that_cannot_be_read_are_noted() -> None:
    def unreadable() -> Any:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    _, letter = _letter(_message(header_data=unreadable))
    assert letter.original_headers is None
    assert letter.dropped_headers == ["<unreadable headers>"]


def test_dict_headers_and_non_bytes_values_are_taken() -> None:
    _, letter = _letter(_message(header_data={"a": b"1", "b": "text", "c": None}))
    assert [(h.key, h.value) for h in letter.original_headers or []] == [
        ("a", b"1"),
        ("b", None),
        ("c", None),
    ]


def test_header_names_with_lone_surrogates_are_escaped() -> None:
    _, letter = _letter(_message(header_data=[("bad\udcff", b"1")]))
    assert [h.key for h in letter.original_headers or []] == ["bad\\udcff"]


def test_an_invalid_utf8_key_is_kept_as_bytes_and_a_text_key_as_nothing() -> None:
    _, letter = _letter(_message(key_data=b"\xff\xfe\x00\xc3"))
    assert letter.original_key == b"\xff\xfe\x00\xc3"
    _, letter = _letter(_message(key_data="text key"))
    assert letter.original_key is None


@pytest.mark.parametrize("key", [b"k" * (KEY_LIMIT + 1), "k" * (KEY_LIMIT + 1)])
def test_a_key_above_its_limit_is_left_out_and_named(key: bytes | str) -> None:
    _, letter = _letter(_message(key_data=key))
    assert letter.original_key is None
    assert letter.dropped_headers == [f"<key of {KEY_LIMIT + 1} bytes, over {KEY_LIMIT}>"]
    _, letter = _letter(_message(key_data=b"k" * KEY_LIMIT))
    assert letter.original_key == b"k" * KEY_LIMIT


def test_a_large_original_is_stored_and_pointed_at() -> None:
    value = bytes(range(256)) * (900 * 4)  # 900 KiB
    draft, letter = _letter(
        FakeMessage(
            value, topic_name="inference.scaler.requests", partition_number=3, offset_number=9
        )
    )
    assert letter.original_value is None
    assert draft.offload_key == "dead-letters/inference.scaler.requests/3/9.bin"
    assert letter.original_ref == f"s3://{BUCKET}/{draft.offload_key}"
    assert draft.offload_body == value


def test_an_original_at_the_inline_limit_travels_in_the_letter() -> None:
    value = b"v" * INLINE
    draft, letter = _letter(_message(value=value, key_data=b"k" * KEY_LIMIT))
    assert letter.original_value == value
    assert draft.offload_key is None


def test_the_offload_key_escapes_a_hostile_topic_name() -> None:
    draft, _ = _letter(FakeMessage(b"x" * (INLINE + 1), topic_name="..", offset_number=1))
    assert draft.offload_key == "dead-letters/%2E%2E/0/1.bin"


def test_a_huge_detail_with_lone_surrogates_is_cleaned_and_cut() -> None:
    detail = "bad \ud800 value " + "x" * MiB
    _, letter = _letter(_message(), detail=detail)
    assert letter.reason_message.startswith("bad \\ud800 value ")
    assert len(letter.reason_message) <= 4000
    assert letter.reason_message.endswith("...")


@pytest.mark.parametrize("reason", ["r" * 300, "", "\udfff" * 300])
def test_a_reason_over_a_name_or_empty_becomes_a_valid_code(reason: str) -> None:
    draft, letter = _letter(_message(), reason=reason, error_class="E" * 1000)
    assert 0 < len(letter.reason_code) <= 256
    assert len(letter.error_class) <= 200
    assert dict(draft.headers)["sluiceway-dlq-reason"] == letter.reason_code.encode()
    if not reason:
        assert letter.reason_code == "unprocessable"


@pytest.mark.parametrize(
    "timestamp_ms", [-1, 0, 253_402_300_799_999, 253_402_300_800_000, 2**62, 2**63 - 1]
)
def test_any_producer_timestamp_gives_a_letter(timestamp_ms: int) -> None:
    _, letter = _letter(_message(timestamp_ms=timestamp_ms))
    if 0 < timestamp_ms < 253_402_300_800_000:
        assert letter.original_timestamp is not None
    else:
        assert letter.original_timestamp is None


def test_missing_topic_partition_and_offset_give_a_letter() -> None:
    _, letter = _letter(
        FakeMessage(None, topic_name=None, partition_number=None, offset_number=None)
    )
    assert (letter.original_partition, letter.original_offset) == (0, 0)
    assert letter.original_value is None


def test_everything_hostile_at_once_still_fits() -> None:
    pairs = [("h" * (i % 300 + 1), b"\xff" * (i * 37 % 70_000)) for i in range(6000)]
    _, letter = _letter(
        _message(
            value=b"\xff" * INLINE,
            key_data=b"\xfe" * INLINE,
            header_data=pairs,
            timestamp_ms=2**63 - 1,
        ),
        reason="\ud800" * 500,
        detail="\udc00" * MiB,
        error_class="",
        attempts=2**40,
        request_id="\ud800" * 400,
        model="m" * 1000,
    )
    assert letter.attempts == 2**31 - 1
    assert letter.error_class == "Error"
    assert letter.original_value == b"\xff" * INLINE
    assert letter.original_key is None
    assert len(letter.dropped_headers or []) <= MAX_LETTER_HEADERS + 2


header_names = st.text(max_size=300)
header_values = st.one_of(st.none(), st.binary(max_size=2048), st.text(max_size=8))
header_lists = st.one_of(
    st.none(),
    st.lists(st.tuples(header_names, header_values), max_size=80),
    st.dictionaries(header_names, header_values, max_size=20),
)


@st.composite
def original_values(draw: st.DrawFn) -> bytes | None:
    size = draw(st.sampled_from([0, 16, INLINE, INLINE + 1]))
    if size == 0:
        return draw(st.one_of(st.none(), st.binary(max_size=64)))
    return draw(st.binary(min_size=1, max_size=1)) * size


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    value=original_values(),
    key=st.one_of(st.none(), st.binary(max_size=64), st.text(max_size=64)),
    headers=header_lists,
    reason=st.text(max_size=400),
    detail=st.text(max_size=500),
    error_class=st.text(max_size=300),
    attempts=st.integers(-(2**40), 2**40),
    timestamp_ms=st.integers(-(2**63), 2**63 - 1),
    topic=st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=249),
    partition=st.integers(0, 2**31 - 1),
    offset=st.integers(0, 2**63 - 1),
)
def test_any_record_gets_a_letter_that_decodes_and_fits(
    value: bytes | None,
    key: str | bytes | None,
    headers: Any,
    reason: str,
    detail: str,
    error_class: str,
    attempts: int,
    timestamp_ms: int,
    topic: str,
    partition: int,
    offset: int,
) -> None:
    message = FakeMessage(value, topic, partition, offset, key, headers, timestamp_ms)
    draft, letter = _letter(
        message, reason=reason, detail=detail, error_class=error_class, attempts=attempts
    )
    assert letter.attempts == max(0, min(attempts, 2**31 - 1))
    assert (letter.original_partition, letter.original_offset) == (partition, offset)
    assert letter.reason_code
    if value is not None and len(value) > INLINE:
        assert letter.original_value is None
        assert draft.offload_body == value
        assert letter.original_ref == f"s3://{BUCKET}/{draft.offload_key}"
    else:
        assert letter.original_value == value
        assert draft.offload_key is None
    pairs = list(headers.items()) if isinstance(headers, dict) else headers or []
    kept = letter.original_headers or []
    assert len(kept) <= MAX_LETTER_HEADERS
    assert len(kept) == len(pairs) or letter.dropped_headers
