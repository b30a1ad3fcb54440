from __future__ import annotations

import json
from datetime import UTC, datetime
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.storage.segments import build_segment, path_segment, segment_key

AT = datetime(2026, 11, 24, 1, 2, 3, tzinfo=UTC)


def test_each_span_addresses_exactly_its_record() -> None:
    records = [{"request_id": f"r{i}", "outputs": [i] * i} for i in range(5)]
    segment = build_segment("fraud", "2", records, [r["request_id"] for r in records], AT)
    assert segment.key.startswith("fraud/2/2026/11/24/")
    assert segment.key.endswith(".jsonl")
    for record, span in zip(records, segment.spans, strict=True):
        assert json.loads(segment.body[span.offset : span.offset + span.length]) == record
    assert segment.body.count(b"\n") == len(records)


def test_key_depends_on_content_only() -> None:
    assert segment_key("m", "1", ["a", "b"], AT) == segment_key("m", "1", ["a", "b"], AT)
    assert segment_key("m", "1", ["a", "b"], AT) != segment_key("m", "1", ["a", "c"], AT)


def test_mismatched_or_empty_batches_are_refused() -> None:
    with pytest.raises(ValueError, match="2 records but 1 request ids"):
        build_segment("m", "1", [{}, {}], ["a"], AT)
    with pytest.raises(ValueError, match="at least one record"):
        build_segment("m", "1", [], [], AT)


HOSTILE_NAMES = [
    "1/../x",
    "..",
    ".",
    "",
    "a b|c",
    "v\u00e9rsion-\u2603",
    "../../etc",
    "%2F",
    "a\\b",
    "~",
]


@pytest.mark.parametrize("version", HOSTILE_NAMES)
@pytest.mark.parametrize("model", ["scaler", "..", "m/od/el"])
def test_model_and_version_are_each_exactly_one_path_segment(model: str, version: str) -> None:
    key = segment_key(model, version, ["r1"], AT)
    parts = key.split("/")
    assert len(parts) == 6, key
    assert parts[2:5] == ["2026", "11", "24"]
    for part in parts[:2]:
        assert part not in ("", ".", "..")
    assert unquote(parts[0]) == model
    if version:
        assert unquote(parts[1]) == version


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=40))
def test_any_text_is_one_reversible_segment(text: str) -> None:
    segment = path_segment(text)
    assert "/" not in segment
    assert segment not in ("", ".", "..")
    assert segment.isascii()
    assert unquote(segment) == (text or "\x00")
