"""Intake against hostile messages: every message ends as a Record or a typed Refusal.

The signatures are what Triton says of the demo models (``scaler`` takes ``x``, FP32, four
columns, up to 256 rows, versions 1 and 2); the settings are the defaults.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import schemas
from devkit.settings import load_demo_settings
from pipeline.backends.signature import ModelSignature, TensorSpec
from pipeline.batching import Lane
from pipeline.routing import RoutingTable
from schemas.models import InferenceRequest
from tests.unit.fakes import FakeClock, FakeMessage
from workers.inference import contracts
from workers.inference.intake import Intake, Record, Refusal

SETTINGS = load_demo_settings()
NS = SETTINGS.namespace
SCALER = ModelSignature(
    inputs=(TensorSpec("x", "FP32", (4,)),), versions=frozenset({"1", "2"}), max_rows=256
)
INVOICE = ModelSignature(
    inputs=(TensorSpec("x", "FP32", (8,)),), versions=frozenset({"1"}), max_rows=256
)
GOOD_FEATURES: dict[str, Any] = {"f0": 1.0, "f1": 2.0, "f2": 3.0, "f3": 4.0}


def _intake(signatures: dict[str, ModelSignature] | None = None) -> Intake:
    return Intake(
        SETTINGS,
        RoutingTable({"scaler": "1", "invoice_risk": "1"}),
        {"scaler": SCALER, "invoice_risk": INVOICE} if signatures is None else signatures,
        clock=FakeClock(),
        wall_clock=FakeClock(1_764_000_000.0),
    )


INTAKE = _intake()


def _request(**fields: Any) -> InferenceRequest:
    data: dict[str, Any] = {
        "request_id": str(uuid.uuid4()),
        "model": "scaler",
        "inputs": {"features": dict(GOOD_FEATURES)},
    }
    data.update(fields)
    return InferenceRequest.model_validate(data)


def _features(**features: Any) -> InferenceRequest:
    return _request(inputs={"features": GOOD_FEATURES | features})


def _tensor(
    shape: list[int],
    datatype: str = "FP32",
    name: str = "x",
    data: bytes | None = None,
    itemsize: int = 4,
) -> dict[str, Any]:
    size = math.prod(shape) * itemsize
    return {"name": name, "datatype": datatype, "shape": shape, "data": data or b"\x00" * size}


def _tensors(*tensors: dict[str, Any]) -> InferenceRequest:
    return _request(inputs={"tensors": list(tensors)})


def _admit(value: bytes | None, model: str = "scaler", **message: Any) -> Record | Refusal:
    return INTAKE.admit(FakeMessage(value, **message), model, Lane.REALTIME)


def _admit_request(request: InferenceRequest, intake: Intake = INTAKE) -> Record | Refusal:
    return intake.admit(FakeMessage(schemas.encode(request)), "scaler", Lane.REALTIME)


def _refusal(outcome: Record | Refusal, reason: str, *, dead_letter: bool) -> Refusal:
    assert isinstance(outcome, Refusal), outcome
    assert (outcome.reason, outcome.dead_letter) == (reason, dead_letter), outcome.detail
    return outcome


def _record(outcome: Record | Refusal) -> Record:
    assert isinstance(outcome, Record), outcome
    return outcome


# ----------------------------------------------------------------------------- decoding


def test_a_good_feature_request_becomes_a_record_of_the_routed_version() -> None:
    request = _request(correlation_id="c-1")
    record = _record(_admit(schemas.encode(request), offset_number=42))
    assert record.request == request
    assert (record.model, record.version, record.lane, record.reply_to) == (
        "scaler",
        "1",
        Lane.REALTIME,
        None,
    )
    assert (record.offset, record.partition_key) == (42, ("inference.scaler.requests", 0))
    (name,) = record.row.tensors
    assert name == "x"
    np.testing.assert_array_equal(
        record.row.tensors["x"], np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
    )
    assert record.row.tensors["x"].dtype == np.float32


def test_a_good_tensor_request_becomes_a_record_with_its_rows() -> None:
    data = np.arange(12, dtype="<f4").tobytes()
    record = _record(_admit_request(_tensors(_tensor([3, 4], data=data))))
    assert record.row.rows == 3
    np.testing.assert_array_equal(record.row.tensors["x"], np.arange(12).reshape(3, 4))


GOOD = schemas.encode(_request())


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        pytest.param(b"\x8f\x13 random bytes \x00\xff" * 7, "bad_marker", id="random-bytes"),
        pytest.param(GOOD[:2] + b"\x00" * 8 + GOOD[10:], "unknown_schema", id="unknown-fp"),
        pytest.param(GOOD[:-5], "truncated", id="truncated"),
        pytest.param(GOOD[:11], "truncated", id="header-only"),
        pytest.param(GOOD + b"\x00", "trailing_bytes", id="trailing"),
        pytest.param(GOOD + b"\x00" * 1_000_001, "too_large", id="too-large"),
        pytest.param(b"", "empty", id="empty"),
        pytest.param(None, "empty", id="tombstone"),
    ],
)
def test_undecodable_values_are_dead_lettered_with_their_decode_reason(
    value: bytes | None, reason: str
) -> None:
    refusal = _refusal(_admit(value), reason, dead_letter=True)
    assert refusal.request is None
    assert refusal.reply_to is None


def test_a_request_for_another_model_is_dead_lettered_as_unknown_model() -> None:
    refusal = _refusal(
        _admit_request(_request(model="invoice_risk")), "unknown_model", dead_letter=True
    )
    assert refusal.request is not None
    assert refusal.model == "scaler"


# ----------------------------------------------------------------------------- features


def test_a_missing_feature_is_dead_lettered() -> None:
    features = {k: v for k, v in GOOD_FEATURES.items() if k != "f2"}
    outcome = _admit_request(_request(inputs={"features": features}))
    assert "'f2'" in _refusal(outcome, "missing_feature", dead_letter=True).detail


def test_a_null_feature_counts_as_missing() -> None:
    _refusal(_admit_request(_features(f1=None)), "missing_feature", dead_letter=True)


def test_a_string_feature_is_invalid() -> None:
    _refusal(_admit_request(_features(f0="1.0")), "invalid_feature", dead_letter=True)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e39, -1e39, 3.5e38])
def test_non_finite_and_out_of_float32_range_features_are_invalid(value: float) -> None:
    # The contract lets NaN and infinities decode (a double is a double); the model cannot.
    request = _features(f3=value)
    assert schemas.decode(schemas.encode(request), InferenceRequest).inputs.features is not None
    _refusal(_admit_request(request), "invalid_feature", dead_letter=True)


def test_the_largest_float32_and_large_integers_are_taken() -> None:
    record = _record(_admit_request(_features(f0=3.4e38, f1=2**63 - 1, f2=-(2**63), f3=0)))
    assert np.isfinite(record.row.tensors["x"]).all()


def test_the_float32_overflow_edge_is_where_numpy_puts_it() -> None:
    below = math.nextafter(contracts.FLOAT32_OVERFLOW, 0.0)
    with np.errstate(over="ignore"):
        assert np.isinf(np.float32(contracts.FLOAT32_OVERFLOW))
        assert np.float32(below) == np.finfo(np.float32).max
    for edge in (contracts.FLOAT32_OVERFLOW, -contracts.FLOAT32_OVERFLOW):
        _refusal(_admit_request(_features(f2=edge)), "invalid_feature", dead_letter=True)
    record = _record(_admit_request(_features(f1=below, f2=-below)))
    assert record.row.tensors["x"][0, 1] == np.finfo(np.float32).max


def test_extra_features_are_ignored() -> None:
    _record(_admit_request(_features(unexpected="x", other=1)))


# ----------------------------------------------------------------------------- tensors


@pytest.mark.parametrize(
    "tensors",
    [
        pytest.param([_tensor([1, 4], name="y")], id="wrong-name"),
        pytest.param([_tensor([1, 5])], id="shape-1x5"),
        pytest.param([_tensor([2, 2, 2])], id="shape-2x2x2"),
        pytest.param([_tensor([4])], id="no-row-axis"),
        pytest.param([_tensor([1, 4], "FP64", itemsize=8)], id="fp64"),
        pytest.param([_tensor([1, 4], "INT8", itemsize=1)], id="int8"),
        pytest.param([_tensor([1, 4], "FP16", itemsize=2)], id="fp16"),
        pytest.param([_tensor([1, 4], "BF16", itemsize=2)], id="bf16"),
        pytest.param(
            [_tensor([1, 4], "BYTES", data=b"".join(b"\x01\x00\x00\x00a" for _ in range(4)))],
            id="bytes",
        ),
        pytest.param([_tensor([1, 4]), _tensor([1, 4])], id="duplicate-names"),
        pytest.param([_tensor([1, 4]), _tensor([1, 4], name="y")], id="extra-tensor"),
        pytest.param([_tensor([0, 4])], id="zero-rows"),
        pytest.param([_tensor([0])], id="zero-length"),
        pytest.param([_tensor([257, 4])], id="more-rows-than-max"),
        pytest.param([_tensor([2**62, 0, 4])], id="too-big-to-reshape"),
        pytest.param([_tensor([2**63 - 1, 2**63 - 1, 0])], id="huge-empty"),
    ],
)
def test_tensors_the_model_does_not_take_are_invalid(tensors: list[dict[str, Any]]) -> None:
    _refusal(_admit_request(_tensors(*tensors)), "invalid_tensor", dead_letter=True)


def test_exactly_max_rows_is_taken() -> None:
    assert _record(_admit_request(_tensors(_tensor([256, 4])))).row.rows == 256


def test_features_for_a_text_model_are_unsupported() -> None:
    intake = _intake()
    message = FakeMessage(schemas.encode(_request(model="case_summary")))
    outcome = intake.admit(message, "case_summary", Lane.REALTIME)
    _refusal(outcome, "unsupported_input", dead_letter=True)


# ----------------------------------------------------------------------------- reply_to


@pytest.mark.parametrize(
    "reply_to",
    [
        f"{NS}.control",
        "__consumer_offsets",
        f"{NS}.invoice_risk.results",
        f"{NS}.scaler.dlq",
        f"{NS}.replies",
        f"{NS}.replies.",
        f"{NS}.replies.x/../y",
        f"{NS}.repliesX.a",
        "other.replies.abc",
        f"{NS}.replies.a b",
        f"{NS}.replies.a\nb",
        f"{NS}.replies." + "a" * (250 - len(f"{NS}.replies.")),  # over Kafka's 249
    ],
)
def test_a_reply_topic_outside_the_allow_list_is_rejected_not_dead_lettered(
    reply_to: str,
) -> None:
    refusal = _refusal(
        _admit_request(_request(reply_to=reply_to)), "reply_to_not_allowed", dead_letter=False
    )
    assert refusal.reply_to is None
    assert refusal.request is not None
    assert refusal.request.reply_to == reply_to


def test_a_300_character_reply_topic_breaks_the_contract_and_is_dead_lettered() -> None:
    record = _request().model_dump() | {"reply_to": f"{NS}.replies." + "a" * 282}
    value = schemas.default_codec().encode_record(InferenceRequest, record)
    refusal = _refusal(_admit(value), "size_limit", dead_letter=True)
    assert refusal.reply_to is None


def test_an_allowed_reply_topic_is_kept_on_the_record() -> None:
    record = _record(_admit_request(_request(reply_to=f"{NS}.replies.abc")))
    assert record.reply_to == f"{NS}.replies.abc"
    longest = f"{NS}.replies." + "a" * (249 - len(f"{NS}.replies."))
    assert _record(_admit_request(_request(reply_to=longest))).reply_to == longest


def test_a_refusal_for_bad_input_keeps_only_an_allowed_reply_topic() -> None:
    bad = {"inputs": {"features": {"f0": 1.0}}}
    allowed = _refusal(
        _admit_request(_request(reply_to=f"{NS}.replies.abc", **bad)),
        "missing_feature",
        dead_letter=True,
    )
    assert allowed.reply_to == f"{NS}.replies.abc"
    wrong_model = _refusal(
        _admit_request(_request(model="invoice_risk", reply_to=f"{NS}.replies.abc")),
        "unknown_model",
        dead_letter=True,
    )
    assert wrong_model.reply_to == f"{NS}.replies.abc"
    forbidden = _refusal(
        _admit_request(_request(reply_to=f"{NS}.control", **bad)),
        "reply_to_not_allowed",
        dead_letter=False,
    )
    assert forbidden.reply_to is None
    forbidden_and_wrong_model = _refusal(
        _admit_request(_request(model="invoice_risk", reply_to=f"{NS}.control")),
        "unknown_model",
        dead_letter=True,
    )
    assert forbidden_and_wrong_model.reply_to is None


# ----------------------------------------------------------------------------- versions


def test_a_pinned_version_the_backend_serves_is_taken() -> None:
    assert _record(_admit_request(_request(model_version="2"))).version == "2"
    assert _record(_admit_request(_request(model_version="1"))).version == "1"


@pytest.mark.parametrize("version", ["99", "1/../x", "v" * 200, "a|b", "..", "1 ", "\uff12"])
def test_a_pinned_version_the_backend_does_not_serve_is_rejected(version: str) -> None:
    refusal = _refusal(
        _admit_request(_request(model_version=version, reply_to=f"{NS}.replies.abc")),
        "unknown_version",
        dead_letter=False,
    )
    assert refusal.reply_to == f"{NS}.replies.abc"
    assert len(refusal.detail) < 200


def test_without_backend_versions_the_pattern_decides() -> None:
    intake = _intake({"scaler": ModelSignature(inputs=SCALER.inputs, max_rows=256)})
    assert _record(_admit_request(_request(model_version="v2"), intake)).version == "v2"
    for version in ("1/../x", "..", ".hidden", "a|b", "v" * 65, "a b"):
        _refusal(
            _admit_request(_request(model_version=version), intake),
            "unknown_version",
            dead_letter=False,
        )


def test_without_any_signature_the_routed_version_and_pattern_decide() -> None:
    intake = _intake({})
    assert _record(_admit_request(_request(model_version="1"), intake)).version == "1"
    record = _record(_admit_request(_tensors(_tensor([1, 9], name="anything")), intake))
    assert record.row.tensors["anything"].shape == (1, 9)
    _refusal(
        _admit_request(_request(model_version="1/../x"), intake),
        "unknown_version",
        dead_letter=False,
    )


# ----------------------------------------------------------------------------- anything at all

header_values = st.one_of(st.none(), st.binary(max_size=64), st.text(max_size=16))
headers = st.one_of(
    st.none(),
    st.lists(st.tuples(st.text(max_size=40), header_values), max_size=8),
    st.dictionaries(st.text(max_size=10), header_values, max_size=4),
)
keys = st.one_of(st.none(), st.binary(max_size=64), st.text(max_size=64))


@st.composite
def values(draw: st.DrawFn) -> bytes | None:
    """Arbitrary bytes, or a real request cut or flipped somewhere."""
    kind = draw(st.sampled_from(["raw", "framed", "cut", "flip"]))
    if kind == "raw":
        return draw(st.one_of(st.none(), st.binary(max_size=256)))
    if kind == "framed":
        return GOOD[:10] + draw(st.binary(max_size=256))
    if kind == "cut":
        return GOOD[: draw(st.integers(0, len(GOOD)))]
    position = draw(st.integers(0, len(GOOD) - 1))
    return GOOD[:position] + bytes([draw(st.integers(0, 255))]) + GOOD[position + 1 :]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    value=values(),
    key=keys,
    header=headers,
    model=st.sampled_from(["scaler", "invoice_risk"]),
    lane=st.sampled_from(list(Lane)),
)
def test_admit_never_raises_whatever_the_message(
    value: bytes | None, key: str | bytes | None, header: Any, model: str, lane: Lane
) -> None:
    message = FakeMessage(value, key_data=key, header_data=header, offset_number=7)
    outcome = INTAKE.admit(message, model, lane)
    assert isinstance(outcome, Record | Refusal)
    if isinstance(outcome, Refusal):
        assert outcome.reason
        assert outcome.reason != "unprocessable", outcome.detail
        assert outcome.reply_to is None or INTAKE.replies.allows(outcome.reply_to)
    else:
        assert outcome.model == model
        assert outcome.version is not None
