"""OpenAI shapes <-> Sluiceway batch jobs (workers/api/openai_format.py): pure, fake clock."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from devkit.settings import load_demo_settings
from pipeline.batchjobs.formats import SourceRecord
from pipeline.batchjobs.records import BatchItem, RecordParser
from schemas.models import BatchCounts, BatchInputFormat, BatchJob, BatchJobStatus
from workers.api import openai_format as fmt
from workers.api.openai_format import ApiError, LineError, RequestLine

CREATED = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
JOB_ID = "job-20261201-0123456789ab"


def request(body: dict[str, Any], url: str = fmt.CHAT, custom_id: str = "r-1") -> bytes:
    line = {"custom_id": custom_id, "method": "POST", "url": url, "body": body}
    return json.dumps(line).encode()


def job(status: BatchJobStatus = BatchJobStatus.IN_PROGRESS, **update: Any) -> BatchJob:
    base = BatchJob(
        job_id=JOB_ID,
        model="case_summary",
        status=BatchJobStatus.VALIDATING,
        input_uri="s3://b/batch/x/input.jsonl",
        input_format=BatchInputFormat.JSONL,
        created_at=CREATED,
        expires_at=CREATED + timedelta(hours=24),
        tenant="acme",
        attributes={
            fmt.ATTR_ENDPOINT: fmt.CHAT,
            fmt.ATTR_INPUT_FILE: "file-" + "a" * 32,
            fmt.ATTR_WINDOW: "24h",
            fmt.ATTR_METADATA: json.dumps({"team": "ops"}),
        },
    )
    return base.model_copy(update={"status": status, **update})


# ------------------------------------------------------------------------ request lines


def test_a_chat_line_becomes_a_record_the_text_model_accepts() -> None:
    raw = request(
        {
            "model": "case_summary",
            "messages": [{"role": "user", "content": "printer jammed"}],
            "max_completion_tokens": 12,
            "stop": "\n",
            "logprobs": True,
            "top_logprobs": 3,
        }
    )
    parsed = fmt.read_request_line(raw, 1)
    assert isinstance(parsed, RequestLine)
    record = fmt.sluiceway_record(parsed, fmt.CHAT)
    assert record == {
        "custom_id": "r-1",
        "messages": [{"role": "user", "content": "printer jammed"}],
        "params": {"max_tokens": 12, "stop": ["\n"], "logprobs": 3},
    }
    parser = RecordParser(
        load_demo_settings().models["case_summary"], values_are_text=False, max_record_bytes=10_000
    )
    item = parser.parse(SourceRecord(1, record, size=len(raw)))
    assert isinstance(item, BatchItem)
    assert item.inputs.text is not None
    assert item.inputs.text.params is not None
    assert item.inputs.text.params.max_tokens == 12


def test_a_prediction_line_becomes_a_feature_record() -> None:
    raw = request(
        {"model": "invoice_risk", "features": {"amount_eur": 10.0}, "explain": True},
        url=fmt.PREDICTIONS,
    )
    parsed = fmt.read_request_line(raw, 3)
    assert isinstance(parsed, RequestLine)
    assert fmt.sluiceway_record(parsed, fmt.PREDICTIONS) == {
        "custom_id": "r-1",
        "features": {"amount_eur": 10.0},
        "explain": True,
    }


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{not json", "invalid_json_line"),
        (b"\xff\xfe", "invalid_json_line"),
        (b"[1, 2]", "invalid_json_line"),
        (b'"text"', "invalid_json_line"),
        (request({"model": "m"}, custom_id=""), "invalid_custom_id"),
        (request({"model": "m"}, custom_id="x" * 300), "invalid_custom_id"),
        (json.dumps({"custom_id": 5, "method": "POST"}).encode(), "invalid_custom_id"),
        (
            json.dumps({"custom_id": "a", "method": "GET", "url": fmt.CHAT}).encode(),
            "invalid_method",
        ),
        (request({"model": "m"}, url="/v1/embeddings"), "invalid_url"),
        (request({"model": "m"}, url="/v1/../../etc/passwd"), "invalid_url"),
        (
            json.dumps({"custom_id": "a", "method": "POST", "url": fmt.CHAT, "body": []}).encode(),
            "invalid_body",
        ),
        (
            json.dumps(
                {"custom_id": "a", "method": "POST", "url": fmt.CHAT, "body": {}, "x": 1}
            ).encode(),
            "invalid_request",
        ),
    ],
)
def test_bad_request_lines_are_line_errors(raw: bytes, code: str) -> None:
    parsed = fmt.read_request_line(raw, 7)
    assert isinstance(parsed, LineError)
    assert (parsed.line, parsed.code) == (7, code)


def test_blank_lines_are_not_requests() -> None:
    assert fmt.read_request_line(b"  \n", 2) is None


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "messages": [], "stream": True},
        {"model": "m", "messages": [], "n": 2},
        {"model": "m", "messages": [], "tools": []},
        {"model": "m", "messages": [], "logprobs": "yes"},
    ],
)
def test_unsupported_chat_parameters_are_named(body: dict[str, Any]) -> None:
    parsed = fmt.read_request_line(request(body), 1)
    assert isinstance(parsed, RequestLine)
    assert isinstance(fmt.sluiceway_record(parsed, fmt.CHAT), LineError)


def test_a_line_for_another_endpoint_than_the_batch_is_refused() -> None:
    parsed = fmt.read_request_line(request({"model": "m", "prompt": "x"}, url=fmt.COMPLETIONS), 1)
    assert isinstance(parsed, RequestLine)
    refused = fmt.sluiceway_record(parsed, fmt.CHAT)
    assert isinstance(refused, LineError)
    assert "endpoint" in refused.message


def test_completions_take_one_prompt_string() -> None:
    parsed = fmt.read_request_line(
        request({"model": "m", "prompt": ["a", "b"]}, url=fmt.COMPLETIONS), 1
    )
    assert isinstance(parsed, RequestLine)
    assert isinstance(fmt.sluiceway_record(parsed, fmt.COMPLETIONS), LineError)


def test_endpoints_route_to_the_backend_that_serves_them() -> None:
    models = load_demo_settings().models
    assert fmt.endpoint_serves(fmt.CHAT, models["case_summary"])
    assert fmt.endpoint_serves(fmt.PREDICTIONS, models["invoice_risk"])
    assert not fmt.endpoint_serves(fmt.CHAT, models["invoice_risk"])
    assert not fmt.endpoint_serves(fmt.PREDICTIONS, models["case_summary"])


# ------------------------------------------------------------------------ identifiers


@pytest.mark.parametrize(
    "batch_id",
    ["", "../x", "job-20261201-0123456789ab/../../x", "job-20261201-0123456789AB", "batch_1"],
)
def test_batch_ids_outside_the_pattern_are_404(batch_id: str) -> None:
    with pytest.raises(ApiError) as refused:
        fmt.job_id_of_batch(batch_id)
    assert refused.value.status == 404


def test_file_ids_name_an_upload_or_a_batch_output() -> None:
    assert fmt.parse_file_id("file-" + "0" * 32).job_id is None
    ref = fmt.parse_file_id(f"file-{JOB_ID}-errors")
    assert (ref.job_id, ref.output) == (JOB_ID, "errors")
    for bad in ("file-../../x", f"file-{JOB_ID}-input", "file-" + "0" * 31, "x" * 5000):
        with pytest.raises(ApiError) as refused:
            fmt.parse_file_id(bad)
        assert refused.value.status == 404
        assert len(refused.value.message) < 200  # a huge id is not echoed whole


@pytest.mark.parametrize(("window", "seconds"), [("24h", 86_400.0), ("1h", 3600.0)])
def test_completion_windows_in_hours(window: str, seconds: float) -> None:
    assert fmt.completion_window_seconds(window) == seconds


@pytest.mark.parametrize("window", ["1d", "0h", "169h", "24", None, 24, "24h "])
def test_bad_completion_windows_are_400(window: object) -> None:
    with pytest.raises(ApiError) as refused:
        fmt.completion_window_seconds(window)
    assert refused.value.param == "completion_window"


@pytest.mark.parametrize(
    "metadata",
    [[], {"k": 1}, {"": "v"}, {"k" * 65: "v"}, {"k": "v" * 513}, {str(i): "v" for i in range(17)}],
)
def test_bad_metadata_is_400(metadata: object) -> None:
    with pytest.raises(ApiError) as refused:
        fmt.checked_metadata(metadata)
    assert refused.value.status == 400


# ------------------------------------------------------------------------ output lines


def test_a_text_result_is_a_chat_completion_with_usage() -> None:
    result = {
        "custom_id": "r-1",
        "request_id": "abc",
        "status": "ok",
        "model": "case_summary",
        "outputs": {
            "text": "Summary: jam",
            "finish_reason": "stop",
            "prompt_tokens": 5,
            "completion_tokens": 2,
        },
    }
    line = fmt.output_line(result, fmt.CHAT, 1_700_000_000)
    assert line["custom_id"] == "r-1"
    assert line["error"] is None
    response = line["response"]
    assert (response["status_code"], response["request_id"]) == (200, "abc")
    body = response["body"]
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Summary: jam"}
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    completion = fmt.output_line(result, fmt.COMPLETIONS, 1)["response"]["body"]
    assert completion["choices"][0]["text"] == "Summary: jam"


def test_a_feature_result_is_a_prediction() -> None:
    result = {
        "custom_id": "inv-1",
        "request_id": "r",
        "model": "invoice_risk",
        "model_version": "1",
        "outputs": {"score": [[0.2]]},
        "explanation": {"attributions": []},
    }
    body = fmt.output_line(result, fmt.PREDICTIONS, 1)["response"]["body"]
    assert body["outputs"] == {"score": [[0.2]]}
    assert body["explanation"] == {"attributions": []}
    assert body["usage"]["total_tokens"] == 0


@pytest.mark.parametrize(
    ("status", "code"),
    [("cancelled", "batch_cancelled"), ("expired", "batch_expired"), ("lost", "batch_lost")],
)
def test_records_never_run_carry_only_an_error(status: str, code: str) -> None:
    line = fmt.error_output_line(
        {"custom_id": "a", "request_id": "r", "status": status, "error_code": status}
    )
    assert line["response"] is None
    assert line["error"]["code"] == code


def test_a_worker_expired_record_is_batch_expired_and_a_rejected_one_a_400() -> None:
    expired = fmt.error_output_line(
        {"custom_id": "a", "status": "expired", "error_code": "deadline", "error_message": "late"}
    )
    assert expired["error"] == {"code": "batch_expired", "message": "late"}
    rejected = fmt.error_output_line(
        {"custom_id": "b", "status": "rejected", "error_code": "too_large", "error_message": "m"}
    )
    assert rejected["response"]["status_code"] == 400
    assert rejected["response"]["body"]["error"]["code"] == "too_large"
    failed = fmt.error_output_line({"custom_id": "c", "status": "error", "error_code": "boom"})
    assert failed["response"]["status_code"] == 500


# ------------------------------------------------------------------------ batch object


def test_the_batch_object_carries_openai_fields_and_timestamps() -> None:
    running = job(BatchJobStatus.IN_PROGRESS, started_at=CREATED + timedelta(minutes=1))
    shown = fmt.batch_object(running, cancelling_at=None, usage=None)
    assert shown["id"] == JOB_ID
    assert shown["object"] == "batch"
    assert shown["status"] == "in_progress"
    assert shown["endpoint"] == fmt.CHAT
    assert shown["created_at"] == int(CREATED.timestamp())
    assert shown["in_progress_at"] == int(CREATED.timestamp()) + 60
    assert shown["expires_at"] == int(CREATED.timestamp()) + 86_400
    assert shown["metadata"] == {"team": "ops"}
    assert shown["output_file_id"] is None
    assert shown["errors"] is None


def test_a_cancel_asked_of_a_running_batch_reads_cancelling_until_it_ends() -> None:
    asked = CREATED + timedelta(minutes=5)
    running = fmt.batch_object(job(), cancelling_at=asked, usage=None)
    assert running["status"] == "cancelling"
    assert running["cancelling_at"] == int(asked.timestamp())
    ended = job(
        BatchJobStatus.CANCELLED,
        finished_at=asked + timedelta(seconds=3),
        output_uri="s3://b/o",
        error_uri="s3://b/e",
        counts=BatchCounts(total=10, completed=4, failed=6),
    )
    shown = fmt.batch_object(ended, cancelling_at=asked, usage={"prompt_tokens": 8})
    assert shown["status"] == "cancelled"
    assert shown["cancelled_at"] == int(asked.timestamp()) + 3
    assert shown["output_file_id"] == f"file-{JOB_ID}-output"
    assert shown["error_file_id"] == f"file-{JOB_ID}-errors"
    assert shown["usage"]["input_tokens"] == 8


def test_an_expired_batch_has_expired_at_and_no_error_file_without_errors() -> None:
    ended = CREATED + timedelta(hours=24, seconds=5)
    expired = job(
        BatchJobStatus.EXPIRED,
        finished_at=ended,
        output_uri="s3://b/o",
        error_uri="s3://b/e",
        counts=BatchCounts(total=3, completed=3, failed=0),
    )
    shown = fmt.batch_object(expired, cancelling_at=None, usage=None)
    assert shown["status"] == "expired"
    assert shown["expired_at"] == int(ended.timestamp())
    assert shown["completed_at"] is None
    assert shown["error_file_id"] is None


def test_a_failed_batch_lists_its_line_errors() -> None:
    errors = [LineError(4, "feature 'x' is missing", "missing_feature")]
    failed = job(
        BatchJobStatus.FAILED,
        error_code="invalid_input",
        error_message="1 of 9 invalid",
        attributes={**job().attributes, fmt.ATTR_ERRORS: fmt.encode_errors(errors)},
    )
    shown = fmt.batch_object(failed, cancelling_at=None, usage=None)
    assert shown["errors"]["data"] == [
        {"code": "missing_feature", "message": "feature 'x' is missing", "param": None, "line": 4}
    ]
    plain = job(BatchJobStatus.FAILED, error_code="input_unreadable", error_message="gone")
    assert fmt.batch_object(plain, cancelling_at=None, usage=None)["errors"]["data"][0]["code"] == (
        "input_unreadable"
    )


def test_errors_have_openai_shape_and_status() -> None:
    error = ApiError(429, "slow down", code="enqueued_records_limit_exceeded")
    assert error.body() == {
        "error": {
            "message": "slow down",
            "type": "rate_limit_error",
            "param": None,
            "code": "enqueued_records_limit_exceeded",
        }
    }
