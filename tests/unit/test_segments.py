from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from pipeline.storage.segments import build_segment, segment_key

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
