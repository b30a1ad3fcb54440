"""Where the worker meets the event contracts: requests in, results and dead letters out.

Everything that knows field names of ``InferenceRequest``, ``InferenceResult`` and
``DeadLetter`` lives here, so the worker's loop deals only in records, rows and outcomes.
"""

from __future__ import annotations

import base64
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

import schemas
from pipeline.backends import RowInput, RowOutput, TextPrompt
from pipeline.backends.base import ATTRIBUTIONS_OUTPUT
from pipeline.backends.signature import ModelSignature, SignatureMismatch
from pipeline.kafka.ports import ConsumedMessage
from pipeline.privacy import KEEP_ORIGINALS, NO_POLICY, FeaturePolicy, OriginalPolicy
from pipeline.settings import ModelSettings
from pipeline.storage.segments import path_segment
from schemas import AvroCodec, Limits, default_catalog, default_codec, message_headers
from schemas.errors import UnservableRecord
from schemas.exceptions import DecodeError
from schemas.headers import connect_error_headers, dead_letter_headers
from schemas.models import (
    NAMESPACE,
    Attribution,
    DeadLetter,
    ExplanationSummary,
    Header,
    InferenceRequest,
    InferenceResult,
    ResultStatus,
    Tensor,
    TensorDatatype,
    TextOutput,
    TokenLogprob,
)

Request = InferenceRequest
FLOAT32_OVERFLOW = 2.0**128 - 2.0**103
"""The smallest double that rounds to infinity as a float32 (halfway above its largest
finite value; ties go to the even neighbour, infinity)."""
INLINE_OUTPUT_BYTES = 1024
"""Outputs up to this size also travel inside the result event (a score, a label)."""
TOP_K_ATTRIBUTIONS = 5

_NUMPY_TYPES: dict[TensorDatatype, str] = {
    TensorDatatype.BOOL: "?",
    TensorDatatype.UINT8: "<u1",
    TensorDatatype.UINT16: "<u2",
    TensorDatatype.UINT32: "<u4",
    TensorDatatype.UINT64: "<u8",
    TensorDatatype.INT8: "<i1",
    TensorDatatype.INT16: "<i2",
    TensorDatatype.INT32: "<i4",
    TensorDatatype.INT64: "<i8",
    TensorDatatype.FP16: "<f2",
    TensorDatatype.FP32: "<f4",
    TensorDatatype.FP64: "<f8",
}
_DATATYPES = {np.dtype(code): datatype for datatype, code in _NUMPY_TYPES.items()}


class RefusedRequest(UnservableRecord):
    """A well-formed request that asks for what it may not (a reply topic outside the
    allow-list, a version that is not served): answered ``rejected`` on the results topic,
    not dead-lettered, since there is nothing to repair in the record itself. Every other
    :class:`UnservableRecord` of intake is dead-lettered."""


@functools.cache
def _request_codec(max_message_bytes: int) -> AvroCodec:
    return AvroCodec(default_catalog(), Limits(max_message_bytes=max_message_bytes))


def decode_request(value: bytes, max_message_bytes: int) -> InferenceRequest:
    try:
        return _request_codec(max_message_bytes).decode(value, InferenceRequest)
    except DecodeError as error:
        raise UnservableRecord(
            str(error.reason), error.detail, error_class=type(error).__name__
        ) from error


def check_model(request: InferenceRequest, model: str) -> None:
    if request.model != model:
        raise UnservableRecord(
            "unknown_model", f"request for model {request.model!r} arrived on {model!r}'s topic"
        )


def to_row(
    request: InferenceRequest, model: ModelSettings, signature: ModelSignature | None = None
) -> RowInput:
    """Turn one request's inputs into backend inputs, or reject it with a reason.

    Tensors are checked against ``signature`` (what the model declares), so a batch only
    ever stacks rows the model takes.
    """
    inputs = request.inputs
    if inputs.tensors is not None:
        if model.backend != "triton":
            raise UnservableRecord("unsupported_input", "this model takes no tensors")
        names = [t.name for t in inputs.tensors]
        if len(set(names)) != len(names):
            raise UnservableRecord("invalid_tensor", "a tensor name appears twice")
        tensors = {t.name: _tensor_to_array(t) for t in inputs.tensors}
        if signature is not None and signature.inputs:
            try:
                signature.check(tensors)
            except SignatureMismatch as mismatch:
                raise UnservableRecord("invalid_tensor", str(mismatch)) from None
        return RowInput(tensors=tensors, explain=request.explain)
    if inputs.features is not None:
        if model.backend != "triton" or not model.feature_order:
            raise UnservableRecord("unsupported_input", "this model takes no feature records")
        # Checked as Python floats and converted once: a numpy store per value (and numpy's
        # overflow guard around it) cost more than the rest of the row's intake.
        values: list[float] = []
        out_of_range = False
        for name in model.feature_order:
            value = inputs.features.get(name)
            if value is None:
                raise UnservableRecord("missing_feature", f"feature {name!r} is missing")
            if isinstance(value, str) or not math.isfinite(value):
                raise UnservableRecord(
                    "invalid_feature", f"feature {name!r} must be a finite number"
                )
            number = float(value)
            out_of_range = out_of_range or not -FLOAT32_OVERFLOW < number < FLOAT32_OVERFLOW
            values.append(number)
        if out_of_range:  # finite as a double, infinite as a float32
            raise UnservableRecord("invalid_feature", "a feature is out of the model's range")
        row = np.array((values,), dtype=np.float32)
        return RowInput(tensors={model.input_name: row}, explain=request.explain)
    text = inputs.text
    assert text is not None  # the contract guarantees exactly one input shape
    if model.backend != "vllm":
        raise UnservableRecord("unsupported_input", "this model takes no text")
    params = text.params
    wants_logprobs = request.explain or (params is not None and params.logprobs is not None)
    return RowInput(
        text=TextPrompt(
            prompt=text.prompt,
            messages=tuple((m.role.value, m.content) for m in text.messages or ()),
            max_tokens=(params.max_tokens if params and params.max_tokens else 64),
            temperature=(params.temperature if params and params.temperature is not None else 0.0),
            top_p=(params.top_p if params and params.top_p is not None else 1.0),
            stop=tuple(params.stop or ()) if params else (),
            logprobs=(
                (params.logprobs if params and params.logprobs else 1) if wants_logprobs else None
            ),
        ),
        explain=request.explain,
    )


def _tensor_to_array(tensor: Tensor) -> np.ndarray[Any, Any]:
    code = _NUMPY_TYPES.get(tensor.datatype)
    if code is None:
        raise UnservableRecord("invalid_tensor", f"tensor datatype {tensor.datatype} is not taken")
    try:
        array = np.frombuffer(tensor.data, dtype=code).reshape(tensor.shape)
    except ValueError:  # a shape numpy cannot hold (a zero axis beside one of 2**62)
        raise UnservableRecord(
            "invalid_tensor", f"tensor shape {tensor.shape} cannot be held in memory"
        ) from None
    if array.ndim == 0 or array.shape[0] == 0:
        raise UnservableRecord("invalid_tensor", "a tensor needs a batch axis with rows")
    return array


def pinned_version(request: InferenceRequest) -> str | None:
    return request.model_version


def routing_key(request: InferenceRequest, message: ConsumedMessage) -> str:
    key = message.key()
    return key.decode(errors="replace") if isinstance(key, bytes) else str(request.request_id)


def deadline_ms(request: InferenceRequest) -> int | None:
    return None if request.deadline is None else int(request.deadline.timestamp() * 1000)


def request_id(request: InferenceRequest) -> str:
    return str(request.request_id)


def reply_to(request: InferenceRequest) -> str | None:
    return request.reply_to


def full_record(
    request: InferenceRequest,
    output: RowOutput,
    model: str,
    version: str,
    feature_names: Sequence[str] = (),
    request_id: str | None = None,
    policy: FeaturePolicy = NO_POLICY,
) -> dict[str, Any]:
    """The complete result as stored in the segment: every output, every attribution but
    those of the model's PII features (``policy``).

    ``request_id`` is the request's id as text when the caller already has it.
    """
    record: dict[str, Any] = {
        "request_id": request_id or str(request.request_id),
        "model": model,
        "model_version": version,
        "outputs": {
            name: _jsonable(array)
            for name, array in output.tensors.items()
            # The raw attributions tensor holds every feature's, the PII ones too; under a
            # policy only the named ``attributions`` below leave.
            if not (policy.active and name == ATTRIBUTIONS_OUTPUT)
        },
    }
    attributions = output.tensors.get(ATTRIBUTIONS_OUTPUT)
    if request.explain and attributions is not None and feature_names:
        values = np.asarray(attributions, dtype=np.float64).reshape(-1)
        by_feature = dict(zip(feature_names, values.tolist(), strict=False))
        record["attributions"] = policy.attributions(by_feature)
    if output.text is not None:
        record["text"] = output.text
        record["finish_reason"] = output.finish_reason
    if output.token_logprobs:
        record["token_logprobs"] = [
            {"token": t.token, "logprob": t.logprob, "top": [list(pair) for pair in t.top]}
            for t in output.token_logprobs
        ]
    if request.custom_id is not None:
        record["custom_id"] = request.custom_id
    return record


def _jsonable(array: np.ndarray[Any, Any]) -> Any:
    """An output as JSON values; BYTES elements as text, or base64 where not UTF-8."""
    if array.dtype.kind not in "OSU":
        return array.tolist()
    return np.vectorize(_text_of, otypes=[object])(array).tolist() if array.size else []


def _text_of(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(value).decode()}
    return value if isinstance(value, str) else str(value)


def _named(record_name: str, value: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A union branch named for fastavro, so it skips trying each branch in turn."""
    return (f"{NAMESPACE}.{record_name}", value)


def _inline_outputs(output: RowOutput) -> tuple[str, dict[str, Any]] | None:
    if output.text is not None:
        text = TextOutput(
            text=output.text,
            finish_reason=output.finish_reason,
            prompt_tokens=output.usage.get("prompt_tokens"),
            completion_tokens=output.usage.get("completion_tokens"),
        )
        return _named("Outputs", {"tensors": None, "features": None, "text": text.model_dump()})
    tensors = []
    for name, array in output.tensors.items():
        inline = _inline_datatype(array.dtype)
        if name == ATTRIBUTIONS_OUTPUT or inline is None or array.nbytes > INLINE_OUTPUT_BYTES:
            continue  # BYTES outputs and large ones live in the segment only
        datatype, little = inline
        tensors.append(
            {
                "name": name,
                "datatype": datatype,
                "shape": list(array.shape),
                "data": array.astype(little, copy=False).tobytes(),
            }
        )
    if not tensors:
        return None
    return _named("Outputs", {"tensors": tensors, "features": None, "text": None})


@functools.cache
def _inline_datatype(dtype: np.dtype[Any]) -> tuple[str, np.dtype[Any]] | None:
    """The contract's datatype of an output and its little-endian dtype, or ``None`` when the
    contract has no such datatype (asked once per dtype: the checks cost more than the copy)."""
    if dtype.kind in "OSU":
        return None
    little = np.dtype(dtype.newbyteorder("<"))
    datatype = _DATATYPES.get(little)
    return None if datatype is None else (datatype.value, little)


def _explanation(
    output: RowOutput, feature_names: Sequence[str], policy: FeaturePolicy = NO_POLICY
) -> ExplanationSummary | None:
    if output.token_logprobs:
        return ExplanationSummary(
            method="token_logprobs",
            token_logprobs=[
                TokenLogprob(token=t.token, logprob=t.logprob) for t in output.token_logprobs
            ],
        )
    attributions = output.tensors.get(ATTRIBUTIONS_OUTPUT)
    if attributions is None or not feature_names:
        return None
    values = np.asarray(attributions, dtype=np.float64).reshape(-1)[: len(feature_names)]
    allowed = np.array(
        [i for i in range(len(values)) if policy.may_explain(feature_names[i])], dtype=np.intp
    )
    top = allowed[np.argsort(-np.abs(values[allowed]))][:TOP_K_ATTRIBUTIONS]
    return ExplanationSummary(
        method="attributions",
        attributions=[Attribution(feature=feature_names[i], value=float(values[i])) for i in top],
    )


ResultRecord = dict[str, Any]
"""An ``InferenceResult`` shaped for its Avro schema, built without a pydantic round trip.

Results are the worker's own output, produced once per request on the hot path; building the
pydantic model and dumping it again cost more than everything else the worker does per
record. ``tests/unit/test_result_records.py`` decodes these records with the validating codec,
so a record that breaks the contract fails there.
"""


def _result_record(
    request: InferenceRequest,
    *,
    status: ResultStatus,
    model: str,
    worker_id: str,
    echo_features: bool = False,
    policy: FeaturePolicy = NO_POLICY,
) -> ResultRecord:
    return {
        "request_id": request.request_id,
        "correlation_id": request.correlation_id,
        "status": status.value,
        "error_code": None,
        "error_message": None,
        "model": model,
        "model_version": None,
        "outputs": None,
        "explanation": None,
        "payload_ref": None,
        "timings": None,
        "worker_id": worker_id,
        "batch_job_id": request.batch_job_id,
        "custom_id": request.custom_id,
        "trace": None if request.trace is None else request.trace.model_dump(),
        "input_features": policy.features(request.inputs.features) if echo_features else None,
    }


def ok_result(
    request: InferenceRequest,
    output: RowOutput,
    *,
    model: str,
    version: str,
    worker_id: str,
    feature_names: Sequence[str] = (),
    bucket: str,
    key: str,
    etag: str,
    offset: int,
    length: int,
    queued_ms: float,
    backend_ms: float,
    total_ms: float,
    echo_features: bool = False,
    policy: FeaturePolicy = NO_POLICY,
) -> ResultRecord:
    record = _result_record(
        request,
        status=ResultStatus.OK,
        model=model,
        worker_id=worker_id,
        echo_features=echo_features,
        policy=policy,
    )
    explanation = _explanation(output, feature_names, policy) if request.explain else None
    record["model_version"] = version
    record["outputs"] = _inline_outputs(output)
    record["explanation"] = None if explanation is None else explanation.model_dump()
    record["payload_ref"] = _named(
        "SegmentRef",
        {"bucket": bucket, "key": key, "etag": etag, "offset": offset, "length": length},
    )
    record["timings"] = _named(
        "Timings",
        {
            "queued_ms": max(queued_ms, 0.0),
            "backend_ms": max(backend_ms, 0.0),
            "total_ms": max(total_ms, 0.0),
        },
    )
    return record


def expired_result(
    request: InferenceRequest,
    *,
    model: str,
    worker_id: str,
    echo_features: bool = False,
    policy: FeaturePolicy = NO_POLICY,
) -> ResultRecord:
    record = _result_record(
        request,
        status=ResultStatus.EXPIRED,
        model=model,
        worker_id=worker_id,
        echo_features=echo_features,
        policy=policy,
    )
    record["error_code"] = "deadline_exceeded"
    record["error_message"] = "the request's deadline passed before it could be served"
    return record


_RESULT_HEADERS = message_headers(InferenceResult.AVRO_NAME)


def encode_result(result: ResultRecord) -> tuple[bytes, list[tuple[str, bytes]]]:
    return default_codec().encode_record(InferenceResult, result), _RESULT_HEADERS


MAX_LETTER_HEADERS = 64
"""Original headers a dead letter carries at most; the rest are named in ``dropped_headers``."""
MAX_LETTER_HEADER_BYTES = 64 * 1024
"""Header values a dead letter carries at most, all together."""
MAX_LETTER_KEY_BYTES = 16 * 1024
"""The largest original key a dead letter carries."""
_NAME_LIMIT = Limits().max_name_length


@dataclass(frozen=True, slots=True)
class LetterDraft:
    """A dead letter ready to produce, and the original value to store first if too large."""

    value: bytes
    headers: list[tuple[str, bytes]]
    offload_key: str | None = None
    offload_body: bytes | None = None


def dead_letter_offload_key(topic: str, partition: int, offset: int) -> str:
    """Where an original too large for its letter is kept (one object per record)."""
    return f"dead-letters/{path_segment(topic)}/{partition}/{offset}.bin"


def build_dead_letter(
    message: ConsumedMessage,
    reason: str,
    detail: str,
    error_class: str,
    attempts: int,
    now_ms: int,
    *,
    model: str,
    worker_id: str,
    request_id: str | None = None,
    inline_limit: int,
    bucket: str,
    header_budget: int = MAX_LETTER_HEADER_BYTES,
    key_limit: int = MAX_LETTER_KEY_BYTES,
    originals: OriginalPolicy = KEEP_ORIGINALS,
    policy: FeaturePolicy = NO_POLICY,
    features: Mapping[str, Any] | None = None,
) -> LetterDraft:
    """The dead letter of ``message``; never raises, whatever the message carries.

    It keeps the original bytes (or, above ``inline_limit``, points at them in the object
    store), the key up to ``key_limit`` bytes, and as many original headers as fit
    ``header_budget``; headers left out are named. With the three limits adding up to less
    than the producer's message limit, the letter always fits it. Should the full letter
    still not encode, a bare one says why.

    The original value (inline or offloaded alike) is kept, sealed or dropped as
    ``originals`` says, and ``detail`` loses any spelling of the request's PII ``features``.
    """
    topic = str(message.topic())
    partition = int(message.partition() or 0)
    offset = int(message.offset() or 0)
    value, treatment_headers = _protected_value(message, originals, topic, partition, offset)
    detail = _scrubbed(policy, detail, features)
    offload_key = None
    if value is not None and len(value) > inline_limit:
        offload_key = dead_letter_offload_key(topic, partition, offset)
    headers, dropped = _letter_headers(message, header_budget)
    key = message.key()
    if isinstance(key, bytes | str) and len(key) > key_limit:
        dropped.append(f"<key of {len(key)} bytes, over {key_limit}>")
    _, timestamp_ms = message.timestamp()
    now = datetime.fromtimestamp(now_ms / 1000, tz=UTC)
    fields: dict[str, Any] = {
        "original_topic": topic,
        "original_partition": partition,
        "original_offset": offset,
        "original_key": key if isinstance(key, bytes) and len(key) <= key_limit else None,
        "original_value": None if offload_key else value,
        "original_headers": headers or None,
        "original_timestamp": _original_timestamp(timestamp_ms),
        "error_class": _clean(error_class, 200) or "Error",
        "reason_code": _clean(reason, _NAME_LIMIT) or "unprocessable",
        "reason_message": _clean(detail, 4000) or reason,
        "attempts": max(0, min(attempts, 2**31 - 1)),
        "first_failure_at": now,
        "last_failure_at": now,
        "request_id": _clean(request_id, _NAME_LIMIT) if request_id else None,
        "model": _clean(model, _NAME_LIMIT) or None,
        "worker_id": _clean(worker_id, _NAME_LIMIT) or None,
        "original_ref": f"s3://{bucket}/{offload_key}" if offload_key else None,
        "dropped_headers": dropped or None,
    }
    try:
        encoded = schemas.encode(DeadLetter(**fields))
    except Exception as error:
        fields.update(
            original_key=None,
            original_headers=None,
            dropped_headers=None,
            reason_message=_clean(
                f"{fields['reason_message']} (the full letter could not be built: "
                f"{type(error).__name__})",
                4000,
            ),
        )
        encoded = schemas.encode(DeadLetter(**fields))
    return LetterDraft(
        encoded,
        dead_letter_headers(fields["reason_code"], fields["error_class"], fields["attempts"])
        + connect_error_headers(
            topic, partition, offset, fields["error_class"], fields["reason_message"]
        )
        + treatment_headers,
        offload_key,
        value if offload_key else None,
    )


def _protected_value(
    message: ConsumedMessage, originals: OriginalPolicy, topic: str, partition: int, offset: int
) -> tuple[bytes | None, list[tuple[str, bytes]]]:
    """The original value as the letter may carry it; with no policy, as it came."""
    raw = message.value()
    value = raw if isinstance(raw, bytes) or raw is None else bytes(raw)
    return originals.protect(value, topic, partition, offset)


def _scrubbed(policy: FeaturePolicy, text: str, features: Mapping[str, Any] | None) -> str:
    try:
        return policy.scrub(text, features)
    except Exception:  # scrubbing must never cost a letter; then say nothing at all
        return "(detail withheld)"


def _original_timestamp(timestamp_ms: int) -> datetime | None:
    """The record's timestamp; ``None`` where there is none, or the producer set one that no
    ``datetime`` holds (a create time is whatever the producer says, up to year 292 million)."""
    if timestamp_ms <= 0:
        return None
    try:
        return datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC)
    except (ValueError, OverflowError, OSError):
        return None


def _letter_headers(
    message: ConsumedMessage, budget: int = MAX_LETTER_HEADER_BYTES
) -> tuple[list[Header], list[str]]:
    """The original headers that fit a letter, and the names of those that did not."""
    try:
        raw = message.headers() or []
        pairs = list(raw.items() if isinstance(raw, dict) else raw)
    except Exception:
        return [], ["<unreadable headers>"]
    kept: list[Header] = []
    dropped: list[str] = []
    for name, value in pairs:
        text = _clean(str(name), 10 * _NAME_LIMIT)
        data = value if isinstance(value, bytes) else None
        size = len(data or b"") + len(text)
        if len(kept) >= MAX_LETTER_HEADERS or len(text) > _NAME_LIMIT or size > budget:
            if len(dropped) < MAX_LETTER_HEADERS:
                dropped.append(text[:_NAME_LIMIT])
            continue
        budget -= size
        kept.append(Header(key=text, value=data))
    if len(pairs) - len(kept) > len(dropped):
        dropped.append(f"<{len(pairs) - len(kept) - len(dropped)} more>")
    return kept, dropped


def _clean(text: str | None, limit: int) -> str:
    """Text that encodes (lone surrogates escaped), cut to ``limit`` characters."""
    if not text:
        return ""
    safe = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return safe if len(safe) <= limit else safe[: limit - 3] + "..."


def rejected_result(
    request: InferenceRequest,
    *,
    model: str,
    worker_id: str,
    code: str,
    message: str,
    policy: FeaturePolicy = NO_POLICY,
) -> ResultRecord:
    """A request answered ``rejected``: refused at the boundary, or dead-lettered (its reply).
    The message loses any spelling of the request's PII features (``policy``)."""
    record = _result_record(request, status=ResultStatus.REJECTED, model=model, worker_id=worker_id)
    record["error_code"] = _clean(code, _NAME_LIMIT) or "rejected"
    shown = _scrubbed(policy, message, request.inputs.features)
    record["error_message"] = _clean(shown, 4000) or None
    return record
