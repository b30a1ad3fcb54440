"""OpenAI's Batch API shapes, mapped to and from Sluiceway batch jobs. Pure: no I/O, no clock.

- request lines (``custom_id``, ``method``, ``url``, ``body``) -> the Sluiceway record of the
  job's input (``custom_id``, ``messages``/``prompt`` + ``params``, or ``features``);
- ``results.jsonl`` / ``errors.jsonl`` lines -> OpenAI's output and error lines;
- a :class:`BatchJob` -> OpenAI's batch object;
- identifiers: every id a client sends is checked against its exact pattern before it names
  anything in the object store, so no id can reach outside its folder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pipeline.batchjobs.submit import JOB_ID_PATTERN
from pipeline.settings import ModelSettings
from schemas.models import BatchJob, BatchJobStatus

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
PREDICTIONS = "/v1/predictions"
ENDPOINTS = (CHAT, COMPLETIONS, PREDICTIONS)
"""The endpoints a batch can name; the first two need a vLLM model, the last a feature model."""

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MAX_CUSTOM_ID = 256
ERRORS_KEPT = 20
"""How many line errors a failed batch lists (its message counts all of them)."""

# Attributes of the Sluiceway job that hold what the batch object needs back.
ATTR_ENDPOINT = "openai.endpoint"
ATTR_INPUT_FILE = "openai.input_file_id"
ATTR_WINDOW = "openai.completion_window"
ATTR_METADATA = "openai.metadata"
ATTR_ERRORS = "openai.errors"

_JOB_ID = re.compile(f"^{JOB_ID_PATTERN}$")
_UPLOADED_FILE_ID = re.compile(r"^file-[0-9a-f]{32}$")
_JOB_FILE_ID = re.compile(f"^file-({JOB_ID_PATTERN})-(output|errors)$")
_WINDOW = re.compile(r"^([1-9][0-9]{0,2})h$")
_MAX_WINDOW_HOURS = 168

_CHAT_PARAMS = frozenset(
    {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop"}
    | {"seed", "logprobs", "top_logprobs", "n", "stream", "user"}
)
_COMPLETION_PARAMS = frozenset(
    {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "logprobs"}
    | {"n", "stream", "user"}
)
_PREDICTION_PARAMS = frozenset({"model", "features", "explain"})


class ApiError(Exception):
    """An error answered in OpenAI's error shape: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        kind: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.kind = kind or _ERROR_TYPES.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


_ERROR_TYPES = {
    401: "invalid_request_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
}


def not_found(what: str, identifier: str) -> ApiError:
    # One answer for "absent" and "someone else's": a tenant learns nothing of other tenants.
    shown = identifier if len(identifier) <= 80 else identifier[:80] + "..."
    return ApiError(404, f"No {what} found with id {shown!r}.", code="not_found")


# ------------------------------------------------------------------------------ identifiers


def job_id_of_batch(batch_id: str) -> str:
    """A batch id is its Sluiceway job id (``sluiceway batch status <id>`` shows it)."""
    if not _JOB_ID.fullmatch(batch_id):
        raise not_found("batch", batch_id)
    return batch_id


@dataclass(frozen=True)
class FileRef:
    """What a file id names: an uploaded file, or one of a batch's two outputs."""

    file_id: str
    job_id: str | None = None
    output: str | None = None
    """``output`` or ``errors`` for a batch's files."""


def parse_file_id(file_id: str) -> FileRef:
    if _UPLOADED_FILE_ID.fullmatch(file_id):
        return FileRef(file_id)
    match = _JOB_FILE_ID.fullmatch(file_id)
    if match is None:
        raise not_found("file", file_id)
    return FileRef(file_id, match.group(1), match.group(2))


def job_file_id(job_id: str, output: str) -> str:
    return f"file-{job_id}-{output}"


def completion_window_seconds(window: object) -> float:
    """``"24h"`` as OpenAI spells it; any whole number of hours up to a week is accepted."""
    match = _WINDOW.fullmatch(window) if isinstance(window, str) else None
    if match is None or int(match.group(1)) > _MAX_WINDOW_HOURS:
        raise ApiError(
            400,
            f"completion_window must be a number of hours like '24h' (1h to "
            f"{_MAX_WINDOW_HOURS}h), not {window!r}.",
            param="completion_window",
            code="invalid_value",
        )
    return int(match.group(1)) * 3600.0


def checked_metadata(metadata: object) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise ApiError(400, "metadata must be an object of strings.", param="metadata")
    if len(metadata) > MAX_METADATA_PAIRS:
        raise ApiError(400, f"metadata holds at most {MAX_METADATA_PAIRS} pairs.", param="metadata")
    for key, value in metadata.items():
        if not isinstance(value, str) or not key or len(key) > MAX_METADATA_KEY:
            raise ApiError(
                400,
                f"metadata keys are 1-{MAX_METADATA_KEY} characters, values strings.",
                param="metadata",
            )
        if len(value) > MAX_METADATA_VALUE:
            raise ApiError(
                400,
                f"metadata values are at most {MAX_METADATA_VALUE} characters.",
                param="metadata",
            )
    return {str(key): str(value) for key, value in metadata.items()}


# ---------------------------------------------------------------------------- request lines


@dataclass(frozen=True)
class LineError:
    line: int
    message: str
    code: str = "invalid_request"

    def as_openai(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": None, "line": self.line}


@dataclass(frozen=True)
class RequestLine:
    line: int
    custom_id: str
    url: str
    body: dict[str, Any]

    @property
    def model(self) -> object:
        return self.body.get("model")


def read_request_line(raw: bytes, line: int) -> RequestLine | LineError | None:
    """One line of an uploaded batch file (``None`` for a blank line), shape only: the
    endpoint and model rules run when a batch names the file."""
    if not raw.strip():
        return None
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return LineError(line, "the line is not valid JSON", "invalid_json_line")
    if not isinstance(value, dict):
        return LineError(line, "a request line must be a JSON object", "invalid_json_line")
    custom_id = value.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id.strip():
        return LineError(line, "custom_id must be a non-empty string", "invalid_custom_id")
    if len(custom_id) > MAX_CUSTOM_ID:
        return LineError(line, f"custom_id is longer than {MAX_CUSTOM_ID}", "invalid_custom_id")
    if value.get("method") != "POST":
        return LineError(line, "method must be POST", "invalid_method")
    url = value.get("url")
    if url not in ENDPOINTS:
        return LineError(line, f"url must be one of {', '.join(ENDPOINTS)}", "invalid_url")
    body = value.get("body")
    if not isinstance(body, dict):
        return LineError(line, "body must be a JSON object", "invalid_body")
    unknown = sorted(set(value) - {"custom_id", "method", "url", "body"})
    if unknown:
        return LineError(line, f"unknown fields {unknown}", "invalid_request")
    return RequestLine(line, custom_id.strip(), str(url), body)


def endpoint_serves(endpoint: str, model: ModelSettings) -> bool:
    return (model.backend == "vllm") == (endpoint != PREDICTIONS)


def sluiceway_record(request: RequestLine, endpoint: str) -> dict[str, Any] | LineError:
    """The job-input record of one request line of a batch for ``endpoint``."""
    if request.url != endpoint:
        return LineError(request.line, f"url {request.url} is not the batch's endpoint {endpoint}")
    body = request.body
    allowed = {CHAT: _CHAT_PARAMS, COMPLETIONS: _COMPLETION_PARAMS}.get(
        endpoint, _PREDICTION_PARAMS
    )
    unsupported = sorted(set(body) - allowed)
    if unsupported:
        return LineError(request.line, f"unsupported body fields {unsupported}", "unsupported")
    if body.get("stream") not in (None, False) or body.get("n") not in (None, 1):
        return LineError(request.line, "stream and n > 1 are not supported in a batch")
    record: dict[str, Any] = {"custom_id": request.custom_id}
    if endpoint == PREDICTIONS:
        record["features"] = body.get("features")
        record["explain"] = body.get("explain", False)
        return record
    params = _generation_params(body, endpoint)
    if isinstance(params, str):
        return LineError(request.line, params)
    if endpoint == CHAT:
        record["messages"] = body.get("messages")
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return LineError(request.line, "prompt must be one string")
        record["prompt"] = prompt
    if params:
        record["params"] = params
    return record


def _generation_params(body: Mapping[str, Any], endpoint: str) -> dict[str, Any] | str:
    params: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    for name, value in (
        ("max_tokens", max_tokens),
        ("temperature", body.get("temperature")),
        ("top_p", body.get("top_p")),
        ("seed", body.get("seed")),
    ):
        if value is not None:
            params[name] = value
    stop = body.get("stop")
    if stop is not None:
        params["stop"] = [stop] if isinstance(stop, str) else stop
    logprobs = body.get("logprobs")
    if endpoint == CHAT:
        if logprobs is True:
            params["logprobs"] = body.get("top_logprobs") or 0
        elif logprobs not in (None, False):
            return "logprobs must be true or false"
    elif logprobs is not None:
        params["logprobs"] = logprobs
    return params


# ---------------------------------------------------------------------------- output lines


def output_line(result: Mapping[str, Any], endpoint: str, created: int) -> dict[str, Any]:
    """OpenAI's output line for one ``results.jsonl`` line."""
    request_id = str(result.get("request_id", ""))
    model = str(result.get("model", ""))
    outputs = result.get("outputs")
    outputs = outputs if isinstance(outputs, Mapping) else {}
    body: dict[str, Any]
    if endpoint == PREDICTIONS:
        body = {
            "id": f"pred-{request_id}",
            "object": "prediction",
            "created": created,
            "model": model,
            "model_version": result.get("model_version"),
            "outputs": dict(outputs),
        }
        if result.get("explanation") is not None:
            body["explanation"] = result["explanation"]
    else:
        text = str(outputs.get("text", ""))
        finish = outputs.get("finish_reason")
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if endpoint == CHAT:
            choice["message"] = {"role": "assistant", "content": text}
            kind, prefix = "chat.completion", "chatcmpl"
        else:
            choice["text"] = text
            kind, prefix = "text_completion", "cmpl"
        body = {
            "id": f"{prefix}-{request_id}",
            "object": kind,
            "created": created,
            "model": model,
            "choices": [choice],
        }
    body["usage"] = line_usage(outputs)
    return {
        "id": f"batch_req_{request_id}",
        "custom_id": result.get("custom_id"),
        "response": {"status_code": 200, "request_id": request_id, "body": body},
        "error": None,
    }


def line_usage(outputs: Mapping[str, Any]) -> dict[str, int]:
    """Tokens where the backend reports them (text models), zeros otherwise."""
    prompt = outputs.get("prompt_tokens")
    completion = outputs.get("completion_tokens")
    prompt_tokens = prompt if isinstance(prompt, int) else 0
    completion_tokens = completion if isinstance(completion, int) else 0
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


_NOT_RUN = {
    "cancelled": ("batch_cancelled", "This request was not executed: the batch was cancelled."),
    "expired": (
        "batch_expired",
        "This request could not be executed before the completion window expired.",
    ),
    "lost": ("batch_lost", "No outcome was recorded for this request."),
}


def error_output_line(error: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI's error-file line for one ``errors.jsonl`` line.

    Requests never run (cancelled, expired, lost) carry only ``error``, as OpenAI's do;
    requests the model refused or failed carry a ``response`` with its status code."""
    status = str(error.get("status", ""))
    request_id = str(error.get("request_id", ""))
    code = str(error.get("error_code", status))
    message = str(error.get("error_message", ""))
    line: dict[str, Any] = {"id": f"batch_req_{request_id}", "custom_id": error.get("custom_id")}
    if status in _NOT_RUN and code == status:
        not_run_code, not_run_message = _NOT_RUN[status]
        line["response"] = None
        line["error"] = {"code": not_run_code, "message": not_run_message}
        return line
    if status == "expired":
        line["response"] = None
        line["error"] = {"code": "batch_expired", "message": message}
        return line
    status_code = 400 if status == "rejected" else 500
    kind = "invalid_request_error" if status_code == 400 else "server_error"
    line["response"] = {
        "status_code": status_code,
        "request_id": request_id,
        "body": {"error": {"message": message, "type": kind, "param": None, "code": code}},
    }
    line["error"] = None
    return line


# ---------------------------------------------------------------------------- batch object


def _unix(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp())


def openai_status(job: BatchJob, cancel_requested: bool) -> str:
    """OpenAI's status of a job: a cancel asked of an unfinished job reads ``cancelling``."""
    final = job.status in (
        BatchJobStatus.COMPLETED,
        BatchJobStatus.FAILED,
        BatchJobStatus.CANCELLED,
        BatchJobStatus.EXPIRED,
    )
    if cancel_requested and not final:
        return "cancelling"
    return job.status.value


def batch_object(
    job: BatchJob,
    *,
    cancelling_at: datetime | None,
    usage: Mapping[str, int] | None,
) -> dict[str, Any]:
    """OpenAI's batch object for a job created through the API."""
    attributes = job.attributes
    finished = _unix(job.finished_at)
    status = job.status
    counts = job.counts
    errors = _batch_errors(job)
    return {
        "id": job.job_id,
        "object": "batch",
        "endpoint": attributes.get(ATTR_ENDPOINT, ""),
        "model": job.model,
        "errors": {"object": "list", "data": errors} if errors else None,
        "input_file_id": attributes.get(ATTR_INPUT_FILE, ""),
        "completion_window": attributes.get(ATTR_WINDOW, "24h"),
        "status": openai_status(job, cancelling_at is not None),
        "output_file_id": job_file_id(job.job_id, "output")
        if job.output_uri and counts.completed
        else None,
        "error_file_id": job_file_id(job.job_id, "errors")
        if job.error_uri and counts.failed
        else None,
        "created_at": _unix(job.created_at),
        "in_progress_at": _unix(job.started_at),
        "expires_at": _unix(job.expires_at),
        "finalizing_at": _unix(job.finalizing_at),
        "completed_at": finished if status is BatchJobStatus.COMPLETED else None,
        "failed_at": finished if status is BatchJobStatus.FAILED else None,
        "expired_at": finished if status is BatchJobStatus.EXPIRED else None,
        "cancelling_at": _unix(cancelling_at),
        "cancelled_at": finished if status is BatchJobStatus.CANCELLED else None,
        "request_counts": {
            "total": counts.total,
            "completed": counts.completed,
            "failed": counts.failed,
        },
        "usage": batch_usage(usage) if usage is not None else None,
        "metadata": json.loads(attributes.get(ATTR_METADATA, "{}")) or None,
    }


def batch_usage(tokens: Mapping[str, int]) -> dict[str, Any]:
    prompt = int(tokens.get("prompt_tokens", 0))
    completion = int(tokens.get("completion_tokens", 0))
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
        "records": int(tokens.get("records", 0)),
    }


def _batch_errors(job: BatchJob) -> list[dict[str, Any]]:
    kept = job.attributes.get(ATTR_ERRORS)
    if kept:
        return list(json.loads(kept))
    if job.status is BatchJobStatus.FAILED and job.error_code:
        return [{"code": job.error_code, "message": job.error_message, "param": None, "line": None}]
    return []


def encode_errors(errors: list[LineError]) -> str:
    return json.dumps([error.as_openai() for error in errors[:ERRORS_KEPT]])
