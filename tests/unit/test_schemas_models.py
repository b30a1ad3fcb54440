"""The pydantic models and the Avro schemas cannot drift apart.

* every record in every ``.avsc`` has a model with exactly the same fields (and every enum a
  StrEnum with the same symbols);
* every valid model instance round-trips through its Avro schema unchanged (property test);
* the models enforce the size limits.
"""

from __future__ import annotations

import io
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from fastavro import schemaless_reader, schemaless_writer
from hypothesis import given
from pydantic import ValidationError

from schemas import default_catalog
from schemas import models as m
from schemas.compat import NO_DEFAULT, normalize
from schemas.limits import DEFAULT_LIMITS
from tests.unit.test_schemas_strategies import SETTINGS, events


def _named_types() -> list[tuple[str, dict[str, Any]]]:
    catalog = default_catalog()
    found = []
    for name in catalog.names():
        _, named = normalize(catalog.current(name).raw)
        found += [(name, node) for node in named.values()]
    return found


@pytest.mark.parametrize(
    ("schema", "node"), _named_types(), ids=lambda v: v if isinstance(v, str) else v["name"]
)
def test_model_fields_equal_avro_fields(schema: str, node: dict[str, Any]) -> None:
    short = node["name"].rsplit(".", 1)[-1]
    counterpart = getattr(m, short)
    if node["type"] == "enum":
        assert [e.value for e in counterpart] == node["symbols"]
    else:
        assert list(counterpart.model_fields) == [f["name"] for f in node["fields"]]
        # optional in Avro (default given) <=> optional in the model
        for field in node["fields"]:
            has_default = field["default"] is not NO_DEFAULT
            assert (not counterpart.model_fields[field["name"]].is_required()) == has_default, (
                f"{short}.{field['name']}"
            )


def test_every_event_model_has_a_current_schema() -> None:
    assert sorted(m.EVENT_MODELS) == default_catalog().names()


@SETTINGS
@given(events)
def test_every_model_round_trips_through_its_avro_schema(event: m.Event) -> None:
    schema = default_catalog().current(event.AVRO_NAME).parsed
    buf = io.BytesIO()
    schemaless_writer(buf, schema, event.model_dump())
    record = schemaless_reader(io.BytesIO(buf.getvalue()), schema, None)
    assert type(event).model_validate(record) == event


def _request(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "request_id": uuid.uuid4(),
        "model": "fraud",
        "inputs": {"features": {"amount": 12.5}},
    }
    base.update(changes)
    return base


def test_inputs_need_exactly_one_shape() -> None:
    with pytest.raises(ValidationError, match="exactly one of tensors, features, text"):
        m.InferenceRequest.model_validate(_request(inputs={}))
    with pytest.raises(ValidationError, match="exactly one"):
        m.InferenceRequest.model_validate(
            _request(inputs={"features": {}, "text": {"prompt": "hi"}})
        )


@pytest.mark.parametrize(
    "changes",
    [
        {"model": "x" * (DEFAULT_LIMITS.max_name_length + 1)},
        {"attributes": {str(i): "" for i in range(DEFAULT_LIMITS.max_map_entries + 1)}},
        {"inputs": {"features": {f"f{i}": i for i in range(DEFAULT_LIMITS.max_map_entries + 1)}}},
        {"inputs": {"text": {"prompt": "x" * (DEFAULT_LIMITS.max_string_length + 1)}}},
    ],
    ids=["name", "attributes", "features", "prompt"],
)
def test_size_limits_are_enforced(changes: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="at most"):
        m.InferenceRequest.model_validate(_request(**changes))


def test_tensor_data_must_match_shape_and_limit() -> None:
    ok = m.Tensor(name="x", datatype=m.TensorDatatype.FP32, shape=[2, 2], data=b"\0" * 16)
    assert ok.shape == [2, 2]
    with pytest.raises(ValidationError, match="needs 16 bytes, got 15"):
        m.Tensor(name="x", datatype=m.TensorDatatype.FP32, shape=[2, 2], data=b"\0" * 15)
    with pytest.raises(ValidationError, match="BYTES data holds 1 elements, shape needs 2"):
        m.Tensor(name="s", datatype=m.TensorDatatype.BYTES, shape=[2], data=b"\1\0\0\0a")
    big = DEFAULT_LIMITS.max_tensor_bytes + 8
    with pytest.raises(ValidationError, match="at most"):
        m.Tensor(name="x", datatype=m.TensorDatatype.UINT8, shape=[big], data=b"\0" * big)


def test_timestamps_are_normalised_to_whole_milliseconds_utc() -> None:
    local = datetime(2030, 1, 1, 12, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    request = m.InferenceRequest.model_validate(_request(deadline=local))
    assert request.deadline == datetime(2030, 1, 1, 10, 0, 0, 123000, tzinfo=UTC)
    with pytest.raises(ValidationError, match="timezone"):
        m.InferenceRequest.model_validate(_request(deadline=datetime(2030, 1, 1)))


def test_feature_values_keep_their_avro_branch() -> None:
    request = m.InferenceRequest.model_validate(
        _request(inputs={"features": {"b": True, "i": 1, "f": 1.0, "s": "1", "n": None}})
    )
    features = request.inputs.features
    assert features is not None
    assert [type(v) for v in features.values()] == [bool, int, float, str, type(None)]
    with pytest.raises(ValidationError):
        m.InferenceRequest.model_validate(_request(inputs={"features": {"big": 2**64}}))


def test_result_error_code_iff_not_ok() -> None:
    with pytest.raises(ValidationError, match="error_code is required"):
        m.InferenceResult(request_id=uuid.uuid4(), status=m.ResultStatus.ERROR, model="m")
    ref = m.SegmentRef(bucket="b", key="fraud/3/seg.jsonl", offset=100, length=50)
    assert (ref.uri, ref.http_range) == ("s3://b/fraud/3/seg.jsonl", "bytes=100-149")


def test_control_event_arguments_depend_on_action() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    with pytest.raises(ValidationError, match="rollback needs to_version"):
        m.ControlEvent(
            event_id=uuid.uuid4(),
            model="m",
            action=m.ControlAction.ROLLBACK,
            reason="r",
            issued_at=now,
        )
    with pytest.raises(ValidationError, match="canary needs a split"):
        m.ControlEvent(
            event_id=uuid.uuid4(),
            model="m",
            action=m.ControlAction.CANARY,
            reason="r",
            issued_at=now,
        )
