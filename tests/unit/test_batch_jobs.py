"""Batch jobs without I/O beyond temporary files: formats, record rules, ledger, lifecycle."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from devkit.demo.examples import invoice_records, write_example
from devkit.modeling.invoices import FEATURES as INVOICE_RISK_FEATURES
from devkit.settings import load_demo_settings
from pipeline.batchjobs.formats import (
    InputFormatError,
    SourceRecord,
    detect_format,
    read_records,
)
from pipeline.batchjobs.ledger import Ledger
from pipeline.batchjobs.lifecycle import (
    IllegalTransitionError,
    advance,
    final_status,
    progress,
)
from pipeline.batchjobs.records import BatchItem, RecordParser, UnservableLine
from pipeline.batchjobs.submit import validate
from pipeline.settings import ModelSettings
from schemas.models import BatchCounts, BatchInputFormat, BatchJob, BatchJobStatus

FEATURE_MODEL = ModelSettings(backend="triton", feature_order=INVOICE_RISK_FEATURES)
TEXT_MODEL = ModelSettings(backend="vllm")
T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def _parser(model: ModelSettings = FEATURE_MODEL, *, text: bool = False) -> RecordParser:
    return RecordParser(model, values_are_text=text, max_record_bytes=4096)


def _invoice(**overrides: object) -> dict[str, object]:
    record: dict[str, object] = dict(next(invoice_records(1)))
    record.update(overrides)
    return record


# ------------------------------------------------------------------ formats


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet", "avro"])
def test_every_format_reads_back_the_same_records_in_order(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"input.{suffix}"
    input_format = detect_format(path.name)
    write_example(path, 120, input_format, explain_every=7)
    parser = RecordParser(
        FEATURE_MODEL, values_are_text=input_format is BatchInputFormat.CSV, max_record_bytes=4096
    )
    items = [parser.parse(source) for source in read_records(path, input_format)]
    expected = list(invoice_records(120, explain_every=7))
    assert all(isinstance(item, BatchItem) for item in items)
    assert [item.custom_id for item in items] == [r["custom_id"] for r in expected]
    assert [item.explain for item in items] == [r["explain"] for r in expected]
    first = items[0]
    assert isinstance(first, BatchItem)
    assert first.inputs.features is not None
    assert first.inputs.features["amount_eur"] == pytest.approx(expected[0]["amount_eur"])


def test_jsonl_lines_are_numbered_by_file_line_and_bad_lines_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"a": 1}\n\nnot json\n[1, 2]\n{"b": 2}\n')
    records = list(read_records(path, BatchInputFormat.JSONL))
    assert [r.line for r in records] == [1, 3, 4, 5]
    assert records[1].fields is None
    assert "not valid JSON" in (records[1].error or "")
    assert records[2].fields is None
    assert "JSON object" in (records[2].error or "")
    assert records[3].fields == {"b": 2}


def test_csv_empty_cells_are_missing_and_short_rows_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("custom_id,a,b\nx1,1,\nx2,1\n")
    records = list(read_records(path, BatchInputFormat.CSV))
    assert records[0].fields == {"custom_id": "x1", "a": "1", "b": None}
    assert records[1].line == 3
    assert "2 columns" in (records[1].error or "")


def test_unknown_suffix_and_broken_parquet_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InputFormatError, match="--format"):
        detect_format("data.xlsx")
    broken = tmp_path / "in.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(InputFormatError, match="Parquet"):
        list(read_records(broken, BatchInputFormat.PARQUET))


# ------------------------------------------------------------------ records


def test_custom_id_is_generated_from_the_line_when_absent() -> None:
    fields = _invoice()
    del fields["custom_id"]
    item = _parser().parse(SourceRecord(42, fields))
    assert isinstance(item, BatchItem)
    assert (item.custom_id, item.custom_id_generated) == ("line-42", True)


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"amount_eur": None}, "missing_feature"),
        ({"amount_eur": "12"}, "invalid_feature"),
        ({"amount_eur": float("nan")}, "invalid_feature"),
        ({"amount_eur": True}, "invalid_feature"),
        ({"custom_id": ""}, "invalid_custom_id"),
        ({"custom_id": 1.5}, "invalid_custom_id"),
        ({"explain": "maybe"}, "invalid_field"),
        ({"note": {"nested": 1}}, "invalid_record"),
    ],
)
def test_invalid_records_get_a_typed_reason(overrides: dict[str, object], code: str) -> None:
    parsed = _parser().parse(SourceRecord(3, _invoice(**overrides)))
    assert isinstance(parsed, UnservableLine)
    assert parsed.refusal.reason_code == code
    assert parsed.describe().startswith("line 3")


def test_csv_text_values_become_numbers_and_flags() -> None:
    fields = {k: str(v) for k, v in _invoice(explain="True").items()}
    item = _parser(text=True).parse(SourceRecord(2, fields))
    assert isinstance(item, BatchItem)
    assert item.explain is True
    assert item.inputs.features is not None
    assert isinstance(item.inputs.features["vendor_tenure_days"], float)


def test_oversized_record_is_refused() -> None:
    parsed = _parser().parse(SourceRecord(1, _invoice(), size=10_000))
    assert isinstance(parsed, UnservableLine)
    assert parsed.refusal.reason_code == "too_large"


def test_text_models_take_prompts_or_messages() -> None:
    parser = _parser(TEXT_MODEL, text=True)
    prompt = parser.parse(SourceRecord(1, {"custom_id": "c1", "prompt": "Summarise: x"}))
    assert isinstance(prompt, BatchItem)
    assert prompt.inputs.text is not None
    assert prompt.inputs.text.prompt == "Summarise: x"
    chat = parser.parse(
        SourceRecord(2, {"messages": json.dumps([{"role": "user", "content": "hi"}])})
    )
    assert isinstance(chat, BatchItem)
    assert chat.inputs.text is not None
    neither = parser.parse(SourceRecord(3, {"custom_id": "c3", "other": "x"}))
    assert isinstance(neither, UnservableLine)
    assert neither.refusal.reason_code == "missing_field"


def test_validation_reports_duplicates_with_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    records = list(invoice_records(5))
    records[3]["custom_id"] = records[1]["custom_id"]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    report = validate(path, BatchInputFormat.JSONL, load_demo_settings(), "invoice_risk")
    assert report.records == 5
    assert report.invalid == 1
    error = report.first_errors[0]
    assert (error.refusal.reason_code, error.line) == ("duplicate_custom_id", 4)
    assert "line 2" in error.refusal.message


# ------------------------------------------------------------------- ledger


def test_ledger_keeps_the_first_outcome_and_lists_rows_in_input_order(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    for position, custom_id in enumerate(["c", "a", "b"]):
        assert ledger.add_item(position, position + 1, custom_id) is None
    duplicate = ledger.add_item(3, 4, "a")
    assert duplicate is not None
    assert duplicate.first_line == 2
    assert ledger.record_by_custom_id("b", ok=True, body="B1") is True
    assert ledger.record_by_custom_id("b", ok=False, body="B2") is False  # redelivery
    assert ledger.record_by_custom_id("zz", ok=True, body="?") is False  # not this job's
    assert ledger.record_by_position(0, ok=False, body="C") is True
    rows = list(ledger.rows())
    assert [(r.custom_id, r.ok, r.body) for r in rows] == [
        ("c", False, "C"),
        ("a", None, None),
        ("b", True, "B1"),
    ]
    assert (ledger.ok, ledger.failed, ledger.answered) == (1, 1, 2)
    ledger.close()


# ---------------------------------------------------------------- lifecycle


def _job(status: BatchJobStatus = BatchJobStatus.VALIDATING) -> BatchJob:
    return BatchJob(
        job_id="job-1",
        model="invoice_risk",
        status=status,
        input_uri="s3://b/k",
        input_format=BatchInputFormat.JSONL,
        created_at=T0,
        counts=BatchCounts(total=1000),
    )


def test_lifecycle_sets_each_timestamp_once_and_refuses_going_back() -> None:
    job = advance(_job(), BatchJobStatus.IN_PROGRESS, T0 + timedelta(seconds=1))
    again = advance(job, BatchJobStatus.IN_PROGRESS, T0 + timedelta(seconds=9))
    assert again.started_at == T0 + timedelta(seconds=1)
    finalizing = advance(again, BatchJobStatus.FINALIZING, T0 + timedelta(seconds=5))
    done = advance(finalizing, BatchJobStatus.COMPLETED, T0 + timedelta(seconds=6))
    assert done.finished_at == T0 + timedelta(seconds=6)
    with pytest.raises(IllegalTransitionError):
        advance(done, BatchJobStatus.IN_PROGRESS, T0)
    with pytest.raises(IllegalTransitionError):
        advance(job, BatchJobStatus.COMPLETED, T0)


def test_a_cancel_outranks_the_deadline() -> None:
    assert final_status(cancelled=True, expired=True) is BatchJobStatus.CANCELLED
    assert final_status(cancelled=False, expired=True) is BatchJobStatus.EXPIRED
    assert final_status(cancelled=False, expired=False) is BatchJobStatus.COMPLETED


def test_progress_rate_and_eta_come_from_the_start_time() -> None:
    job = advance(_job(), BatchJobStatus.IN_PROGRESS, T0).model_copy(
        update={"counts": BatchCounts(total=1000, completed=180, failed=20)}
    )
    figures = progress(job, T0 + timedelta(seconds=10))
    assert figures.done == 200
    assert figures.rate_per_s == pytest.approx(20.0)
    assert figures.eta_s == pytest.approx(40.0)
    assert progress(_job(), T0).rate_per_s is None
