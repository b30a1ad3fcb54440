"""The worker builds results as Avro-ready records, not pydantic models: they keep the contract.

Every record is encoded on the worker's fast path and decoded with the validating codec, so a
record that the ``InferenceResult`` model would refuse fails here.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import schemas
from pipeline.backends import RowOutput
from pipeline.backends.base import TokenLogprob
from pipeline.storage.segments import build_segment
from schemas.exceptions import EncodeError
from schemas.models import InferenceRequest, InferenceResult, ResultStatus, TensorDatatype
from tests.unit.test_schemas_strategies import SETTINGS, requests
from workers.inference import contracts

FEATURES = ("amount", "tenure", "terms", "late")


def _ok(
    request: InferenceRequest, output: RowOutput, *, echo_features: bool = False
) -> InferenceResult:
    record = contracts.ok_result(
        request,
        output,
        model="scaler",
        version="2",
        worker_id="worker-1",
        feature_names=FEATURES,
        bucket="results",
        key="segments/scaler/2/abc.jsonl",
        etag="etag-1",
        offset=120,
        length=80,
        queued_ms=1.5,
        backend_ms=-0.1,  # a clock step backwards must not produce an invalid result
        total_ms=4.0,
        echo_features=echo_features,
    )
    value, headers = contracts.encode_result(record)
    assert dict(headers)["sluiceway-schema"] == InferenceResult.AVRO_NAME.encode()
    return schemas.decode(value, InferenceResult)


@SETTINGS
@given(request=requests, score=st.floats(-1e6, 1e6, allow_nan=False))
def test_ok_results_carry_the_request_identity_and_the_segment_reference(
    request: InferenceRequest, score: float
) -> None:
    output = RowOutput(tensors={"score": np.array([score], dtype=np.float64)})
    result = _ok(request, output)
    assert result.request_id == request.request_id
    assert result.correlation_id == request.correlation_id
    assert result.batch_job_id == request.batch_job_id
    assert result.custom_id == request.custom_id
    assert result.trace == request.trace
    assert result.status is ResultStatus.OK
    assert (result.model, result.model_version, result.worker_id) == ("scaler", "2", "worker-1")
    assert result.payload_ref is not None
    assert (result.payload_ref.key, result.payload_ref.offset, result.payload_ref.length) == (
        "segments/scaler/2/abc.jsonl",
        120,
        80,
    )
    assert result.timings is not None
    assert (result.timings.queued_ms, result.timings.backend_ms) == (1.5, 0.0)
    assert result.outputs is not None
    assert result.outputs.tensors is not None
    (tensor,) = result.outputs.tensors
    assert (tensor.name, tensor.datatype, tensor.shape) == ("score", TensorDatatype.FP64, [1])
    assert np.frombuffer(tensor.data, "<f8")[0] == score


def test_attributions_become_the_top_k_explanation_and_stay_out_of_the_inline_outputs() -> None:
    request = InferenceRequest.model_validate(
        {"request_id": "0b6f1f7e-7d0e-4f55-9d43-3f4a3a0f8f11", "model": "scaler", "explain": True}
        | {"inputs": {"features": {"amount": 1.0}}}
    )
    output = RowOutput(
        tensors={
            "score": np.array([0.7], dtype=np.float32),
            "attributions": np.array([0.1, -0.5, 0.05, 0.3], dtype=np.float32),
        }
    )
    result = _ok(request, output)
    assert result.outputs is not None
    assert [t.name for t in result.outputs.tensors or []] == ["score"]
    assert result.explanation is not None
    assert [(a.feature, round(a.value, 3)) for a in result.explanation.attributions or []] == [
        ("tenure", -0.5),
        ("late", 0.3),
        ("amount", 0.1),
        ("terms", 0.05),
    ]


def test_text_outputs_and_token_logprobs_travel_inline() -> None:
    request = InferenceRequest.model_validate(
        {"request_id": "5d0e3a43-5f57-4a5c-8f0a-0e9a0d7b1c22", "model": "summarizer"}
        | {"explain": True, "inputs": {"text": {"prompt": "Summarise the case."}}}
    )
    output = RowOutput(
        text="Customer wants a refund.",
        finish_reason="stop",
        token_logprobs=(TokenLogprob("Customer", -0.2, ()), TokenLogprob(" wants", -1.1, ())),
        usage={"prompt_tokens": 5, "completion_tokens": 2},
    )
    result = _ok(request, output)
    assert result.outputs is not None
    assert result.outputs.text is not None
    assert result.outputs.text.text == "Customer wants a refund."
    assert (result.outputs.text.prompt_tokens, result.outputs.text.completion_tokens) == (5, 2)
    assert result.explanation is not None
    assert [t.token for t in result.explanation.token_logprobs or []] == ["Customer", " wants"]


@SETTINGS
@given(request=requests)
def test_expired_results_name_the_deadline_and_carry_no_outputs(request: InferenceRequest) -> None:
    value, _ = contracts.encode_result(
        contracts.expired_result(request, model="scaler", worker_id="worker-1")
    )
    result = schemas.decode(value, InferenceResult)
    assert result.status is ResultStatus.EXPIRED
    assert result.error_code == "deadline_exceeded"
    assert result.request_id == request.request_id
    assert result.outputs is None
    assert result.payload_ref is None


def test_a_record_that_does_not_fit_the_schema_is_a_typed_encode_error() -> None:
    request = InferenceRequest.model_validate(
        {"request_id": "9a3c1a52-8ad6-4c39-9c1e-5b8f7b0a2d33", "model": "scaler"}
        | {"inputs": {"features": {"amount": 1.0}}}
    )
    record = contracts.expired_result(request, model="scaler", worker_id="worker-1")
    record["status"] = "maybe"
    with pytest.raises(EncodeError, match="InferenceResult"):
        contracts.encode_result(record)


@SETTINGS
@given(request=requests)
def test_feature_records_are_echoed_only_when_the_model_asks(request: InferenceRequest) -> None:
    output = RowOutput(tensors={"score": np.array([0.5], dtype=np.float64)})
    assert _ok(request, output).input_features is None
    echoed = _ok(request, output, echo_features=True)
    # Only feature records are echoed; tensors and text stay in the request.
    assert echoed.input_features == request.inputs.features


BYTES_REQUEST = InferenceRequest.model_validate(
    {"request_id": "3f2a7c1e-2b4d-4e8a-9c0f-1a2b3c4d5e6f", "model": "scaler"}
    | {"inputs": {"features": {"amount": 1.0}}}
)
NOT_UTF8 = b"\xff\xfe\x00\xc3("


def _segment_line(output: RowOutput, version: str = "1") -> dict[str, Any]:
    record = contracts.full_record(BYTES_REQUEST, output, "scaler", version)
    segment = build_segment(
        "scaler",
        version,
        [record],
        [str(BYTES_REQUEST.request_id)],
        datetime(2026, 1, 2, tzinfo=UTC),
    )
    (span,) = segment.spans
    line: dict[str, Any] = json.loads(segment.body[span.offset : span.offset + span.length])
    return line


def test_bytes_outputs_are_stored_as_text_or_base64() -> None:
    labels = np.array([[b"fraud", NOT_UTF8], ["caf\u00e9".encode(), b""]], dtype=object)
    line = _segment_line(RowOutput(tensors={"label": labels}))
    assert line["outputs"]["label"] == [
        ["fraud", {"base64": base64.b64encode(NOT_UTF8).decode()}],
        ["caf\u00e9", ""],
    ]


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.array([b"ok", NOT_UTF8[:2]], dtype="S2"), ["ok", {"base64": "//4="}]),
        (np.array(["a", "\u00fc"], dtype="U1"), ["a", "\u00fc"]),
        (np.array([None, 7, "x"], dtype=object), ["None", "7", "x"]),
        (np.empty((0,), dtype=object), []),
        (np.array([[]], dtype=object).reshape(1, 0), []),
    ],
)
def test_any_text_like_output_serialises(array: np.ndarray[Any, Any], expected: Any) -> None:
    assert _segment_line(RowOutput(tensors={"out": array}))["outputs"]["out"] == expected


@SETTINGS
@given(elements=st.lists(st.binary(max_size=12), min_size=1, max_size=8))
def test_arbitrary_bytes_outputs_round_trip_through_the_segment(elements: list[bytes]) -> None:
    array = np.empty((len(elements),), dtype=object)
    array[:] = elements
    stored = _segment_line(RowOutput(tensors={"raw": array}))["outputs"]["raw"]
    for element, value in zip(elements, stored, strict=True):
        got = base64.b64decode(value["base64"]) if isinstance(value, dict) else value.encode()
        assert got == element


def test_a_bytes_output_stays_out_of_the_inline_outputs() -> None:
    labels = np.array([b"fraud", NOT_UTF8], dtype=object)
    both = _ok(
        BYTES_REQUEST,
        RowOutput(tensors={"label": labels, "score": np.array([0.25], dtype=np.float32)}),
    )
    assert both.outputs is not None
    assert [t.name for t in both.outputs.tensors or []] == ["score"]
    only_bytes = _ok(BYTES_REQUEST, RowOutput(tensors={"label": labels}))
    assert only_bytes.outputs is None
    assert only_bytes.payload_ref is not None
    fixed = _ok(BYTES_REQUEST, RowOutput(tensors={"label": np.array([b"ab"], dtype="S2")}))
    assert fixed.outputs is None
