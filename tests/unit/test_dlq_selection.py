"""Selecting, marking and replaying dead letters: pure logic, hostile input included."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

import schemas
from pipeline.deadletters.exceptions import SelectorError
from pipeline.deadletters.letters import MALFORMED, LetterId, StoredLetter, read_letter
from pipeline.deadletters.markers import Marker, decode_marker, encode_marker, fold_markers
from pipeline.deadletters.replay import REPLAYED_FROM_HEADER, Resend, Skipped, plan_replay
from pipeline.deadletters.selection import (
    count_by_reason,
    parse_moment,
    parse_selector,
    select,
)
from schemas.models import DeadLetter, Header, InferenceRequest, Inputs
from sluiceway import main

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
DLQ = "inference.scaler.dlq"
REQUESTS = "inference.scaler.requests"


def _request() -> InferenceRequest:
    return InferenceRequest(
        request_id=uuid.uuid4(), model="scaler", inputs=Inputs(features={"f0": 1.0})
    )


def _stored(
    offset: int,
    reason: str = "missing_feature",
    failed: datetime = NOW,
    topic: str = REQUESTS,
    request: InferenceRequest | None = None,
) -> StoredLetter:
    request = request or _request()
    letter = DeadLetter(
        original_topic=topic,
        original_partition=1,
        original_offset=offset + 100,
        original_key=b"k",
        original_value=schemas.encode(request),
        original_headers=[
            Header(key="h", value=b"v"),
            Header(key=REPLAYED_FROM_HEADER, value=b"x"),
        ],
        error_class="UnservableRecord",
        reason_code=reason,
        reason_message="why",
        attempts=1,
        first_failure_at=failed,
        last_failure_at=failed,
        request_id=str(request.request_id),
        model="scaler",
    )
    return read_letter(0, offset, schemas.encode(letter), [("sluiceway-dlq-reason", reason)])


def _original(stored: StoredLetter) -> bytes:
    assert stored.letter is not None
    assert stored.letter.original_value is not None
    return stored.letter.original_value


# ---------------------------------------------------------------------------- selection


def test_selection_by_reason_time_position_and_limit() -> None:
    letters = [
        _stored(0, "missing_feature", NOW - timedelta(hours=3)),
        _stored(1, "too_large", NOW - timedelta(hours=2)),
        _stored(2, "missing_feature", NOW - timedelta(minutes=30)),
        _stored(3, "missing_feature", NOW - timedelta(minutes=5)),
    ]
    by_reason = parse_selector(reasons=["missing_feature"], now=NOW)
    assert [s.at.offset for s in select(letters, by_reason, {})] == [0, 2, 3]

    recent = parse_selector(reasons=["missing_feature"], since="1h", until="10m", now=NOW)
    assert [s.at.offset for s in select(letters, recent, {})] == [2]

    at = parse_selector(at=["0:1", "0:3"], now=NOW)
    assert [s.at.offset for s in select(letters, at, {})] == [1, 3]

    first = parse_selector(limit=2, now=NOW)
    assert [s.at.offset for s in select(letters, first, {})] == [0, 1]

    absolute = parse_selector(since="2026-12-02T10:30:00", now=NOW)  # no zone: UTC
    assert [s.at.offset for s in select(letters, absolute, {})] == [2, 3]
    assert count_by_reason(letters) == {"missing_feature": 3, "too_large": 1}


def test_handled_letters_are_left_out_unless_forced() -> None:
    letters = [_stored(0), _stored(1)]
    handled = {LetterId(0, 0): Marker("replayed", NOW, REQUESTS)}

    assert [s.at.offset for s in select(letters, parse_selector(now=NOW), handled)] == [1]
    forced = parse_selector(include_handled=True, now=NOW)
    assert [s.at.offset for s in select(letters, forced, handled)] == [0, 1]


@pytest.mark.parametrize(
    "fields",
    [
        {"since": "yesterday"},
        {"since": ""},
        {"since": "9" * 500},
        {"until": "2026-13-45"},
        {"since": "-5m"},
        {"since": "1000000000d"},
        {"since": "1h", "until": "2h"},  # until before since
        {"reasons": ["../../etc"]},
        {"reasons": [""]},
        {"reasons": ["a" * 257]},
        {"reasons": ["bad reason\n"]},
        {"at": ["12"]},
        {"at": ["a:b"]},
        {"at": ["0:-1"]},
        {"at": ["0:" + "9" * 40]},
        {"at": ["99999999999:0"]},
        {"limit": 0},
        {"limit": -3},
    ],
)
def test_a_meaningless_selector_is_a_typed_error(fields: dict[str, object]) -> None:
    with pytest.raises(SelectorError):
        parse_selector(now=NOW, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "argv",
    [
        ["dlq", "list", "--model", "../../etc/passwd"],
        ["dlq", "list", "--model", "no_such_model"],
        ["dlq", "list", "--model", "scaler", "--since", "last tuesday"],
        ["dlq", "list", "--model", "scaler", "--reason", "x" * 10_000],
        ["dlq", "replay", "--model", "scaler", "--letter", "0:zero"],
        ["dlq", "replay", "--model", "scaler", "--version", "1/../../2"],
        ["dlq", "purge", "--model", "scaler", "--until", "\x00"],
        ["dlq", "purge", "--model", "scaler", "--limit", "0"],
        ["dlq", "show", "--model", "scaler", "--letter", "0:1:2"],
    ],
)
def test_every_cli_selector_refuses_hostile_text_with_one_line_before_any_io(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("sluiceway: error: ")
    assert err.count("\n") == 1


def test_a_relative_moment_counts_back_from_now() -> None:
    assert parse_moment("90s", NOW) == NOW - timedelta(seconds=90)
    assert parse_moment("7d", NOW) == NOW - timedelta(days=7)


# ---------------------------------------------------------------------------- letters


@pytest.mark.parametrize(
    "value", [None, b"", b"\x00" * 10, b"\xc3\x01" + b"\xff" * 100, schemas.encode(_request())]
)
def test_a_malformed_record_on_the_dlq_is_counted_never_raised(value: bytes | None) -> None:
    stored = read_letter(0, 7, value, {"weird": "text", "none": None})

    assert stored.letter is None
    assert stored.reason == MALFORMED
    assert stored.problem
    assert count_by_reason([stored]) == {MALFORMED: 1}
    resends, skipped = plan_replay(
        [stored], dlq_topic=DLQ, allowed_topics={REQUESTS}, original=_original
    )
    assert resends == []
    assert [s.at for s in skipped] == [LetterId(0, 7)]


def test_unreadable_headers_do_not_cost_the_letter() -> None:
    letter = _stored(0).letter
    assert letter is not None
    stored = read_letter(0, 1, schemas.encode(letter), 42)  # type: ignore[arg-type]
    assert stored.letter is not None
    assert stored.headers == ()


# ---------------------------------------------------------------------------- markers


def test_markers_fold_to_the_latest_word_per_letter() -> None:
    replayed = encode_marker(Marker("replayed", NOW, REQUESTS, "2"))
    purged = encode_marker(Marker("purged", NOW))
    handled = fold_markers(
        [
            (b"0:1", replayed),
            (b"0:2", replayed),
            (b"0:2", None),  # a tombstone: unhandled again
            (b"0:3", replayed),
            (b"0:3", purged),
            (b"junk", replayed),
            (None, replayed),
            (b"0:4", b"{not json"),
            (b"0:5", b'{"state": "eaten", "at": "2026-12-02T12:00:00+00:00"}'),
            (b"0:6", b'{"state": "purged", "at": "2026-12-02T12:00:00"}'),  # no zone
            (b"0:7", b"[1, 2]"),
            (b"0:8", b"x" * 100_000),
        ]
    )
    assert handled == {
        LetterId(0, 1): Marker("replayed", NOW, REQUESTS, "2"),
        LetterId(0, 3): Marker("purged", NOW),
    }
    assert decode_marker(replayed) == Marker("replayed", NOW, REQUESTS, "2")


# ---------------------------------------------------------------------------- replay plan


def test_a_replay_sends_the_original_bytes_key_and_headers_back_with_its_request_id() -> None:
    request = _request()
    stored = _stored(4, request=request)

    resends, skipped = plan_replay(
        [stored], dlq_topic=DLQ, allowed_topics={REQUESTS}, original=_original
    )

    assert skipped == []
    assert resends == [
        Resend(
            LetterId(0, 4),
            REQUESTS,
            b"k",
            schemas.encode(request),
            (("h", b"v"), (REPLAYED_FROM_HEADER, b"inference.scaler.dlq:0:4")),
            str(request.request_id),
        )
    ]


def test_a_pinned_replay_changes_only_the_version() -> None:
    request = _request()
    (resend,), _ = plan_replay(
        [_stored(0, request=request)],
        dlq_topic=DLQ,
        allowed_topics={REQUESTS},
        original=_original,
        pinned_version="2",
    )
    sent = schemas.decode(resend.value, InferenceRequest)
    assert sent == request.model_copy(update={"model_version": "2"})


def test_letters_that_cannot_go_back_are_skipped_with_a_reason() -> None:
    def unavailable(_: StoredLetter) -> bytes:
        raise OSError("object store unreachable")

    elsewhere = _stored(0, topic="inference.billing.requests")
    connector = _stored(1, topic="connector:S4H")
    not_a_request = read_letter(
        0,
        2,
        schemas.encode(
            _stored(2).letter.model_copy(update={"original_value": b"\x00raw"})  # type: ignore[union-attr]
        ),
        None,
    )
    _, skipped = plan_replay(
        [elsewhere, connector], dlq_topic=DLQ, allowed_topics={REQUESTS}, original=_original
    )
    _, lost = plan_replay(
        [_stored(3)], dlq_topic=DLQ, allowed_topics={REQUESTS}, original=unavailable
    )
    _, unpinnable = plan_replay(
        [not_a_request],
        dlq_topic=DLQ,
        allowed_topics={REQUESTS},
        original=_original,
        pinned_version="2",
    )

    assert [type(s) for s in skipped + lost + unpinnable] == [Skipped] * 4
    assert "not this model's" in skipped[0].why
    assert "connector letter" in skipped[1].why
    assert "object store unreachable" in lost[0].why
    assert "no request to pin" in unpinnable[0].why
