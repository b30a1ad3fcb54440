"""Payload logging: deterministic sampling, PII policy, both sinks, failures that cost nothing."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from pipeline.kafka.acls import Operation, plan
from pipeline.kafka.producer import OutgoingMessage
from pipeline.payload_log import PayloadLogger, object_key, parse_sink, sampled
from pipeline.privacy import FeaturePolicy
from pipeline.settings import ModelSettings, Settings
from schemas.models import InferenceRequest, Inputs, Tensor, TensorDatatype

NOW = 1_764_000_000.0


class Producer:
    def __init__(self, fail: bool = False) -> None:
        self.sent: list[OutgoingMessage] = []
        self.fail = fail

    async def submit_all(self, messages: Sequence[OutgoingMessage]) -> int:
        if self.fail:
            raise RuntimeError("broker gone")
        self.sent.extend(messages)
        return len(messages)


class Store:
    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    async def put_bytes(self, key: str, body: bytes, content_type: str) -> str:
        assert content_type == "application/x-ndjson"
        self.objects[key] = body
        return "etag"


def _settings(rate: float, sink: str | None, **model: Any) -> Settings:
    return Settings(
        models={
            "scaler": ModelSettings(
                feature_order=("f0", "ssn"),
                payload_log_rate=rate,
                payload_log_sink=sink,
                **model,
            )
        }
    )


def _requests(count: int) -> list[InferenceRequest]:
    return [
        InferenceRequest(
            request_id=uuid.uuid4(),
            model="scaler",
            inputs=Inputs(features={"f0": float(i), "ssn": "123-45-6789"}),
        )
        for i in range(count)
    ]


def _log(logger: PayloadLogger, requests: list[InferenceRequest], **kw: Any) -> int:
    responses = [{"request_id": str(r.request_id), "outputs": {"y": [[1.0]]}} for r in requests]
    return asyncio.run(logger.served("scaler", "1", requests, responses, **kw))


def test_sampling_is_a_pure_function_of_the_request_id_and_holds_its_share() -> None:
    ids = [str(uuid.UUID(int=i)) for i in range(20_000)]
    rate = 0.1
    chosen = [i for i in ids if sampled(i, rate)]
    assert chosen == [i for i in ids if sampled(i, rate)]
    # Binomial: 4.5 standard deviations either side fails a fair sampler about once in 10^5.
    bound = 4.5 * math.sqrt(len(ids) * rate * (1 - rate))
    assert abs(len(chosen) - len(ids) * rate) <= bound
    assert not any(sampled(i, 0.0) for i in ids[:100])
    assert all(sampled(i, 1.0) for i in ids[:100])
    # A higher rate keeps every id a lower rate chose: raising it never drops a logged one.
    assert set(chosen) <= {i for i in ids if sampled(i, 0.5)}


def test_topic_sink_gets_one_record_per_sampled_pair_with_pii_applied() -> None:
    producer = Producer()
    logger = PayloadLogger(_settings(1.0, "topic:audit.scaler"), producer, Store(), lambda: NOW)
    requests = _requests(3)
    policy = FeaturePolicy({"ssn": "mask"})

    assert _log(logger, requests, policy=policy) == 3

    assert [m.topic for m in producer.sent] == ["audit.scaler"] * 3
    entry = orjson.loads(producer.sent[0].value)
    assert entry["request_id"] == str(requests[0].request_id)
    assert producer.sent[0].key == str(requests[0].request_id).encode()
    assert entry["request"] == {"features": {"f0": 0.0, "ssn": "<masked>"}}
    assert entry["response"]["outputs"] == {"y": [[1.0]]}
    assert entry["model_version"] == "1"
    assert "123-45-6789" not in producer.sent[0].value.decode()


def test_prefix_sink_writes_one_object_per_batch_at_a_key_derived_from_its_ids() -> None:
    store = Store()
    logger = PayloadLogger(_settings(1.0, "prefix:payloads/"), Producer(), store, lambda: NOW)
    requests = _requests(4)

    _log(logger, requests)
    _log(logger, requests)  # a retried batch overwrites its own object

    assert list(store.objects) == [
        object_key(
            "payloads",
            "scaler",
            "1",
            datetime.fromtimestamp(NOW, tz=UTC),
            [str(r.request_id) for r in requests],
        )
    ]
    lines = store.objects[next(iter(store.objects))].splitlines()
    assert [orjson.loads(line)["request_id"] for line in lines] == [
        str(r.request_id) for r in requests
    ]


def test_tensor_inputs_are_logged_with_shape_and_data() -> None:
    producer = Producer()
    logger = PayloadLogger(_settings(1.0, "topic:t"), producer, Store(), lambda: NOW)
    request = InferenceRequest(
        request_id=uuid.uuid4(),
        model="scaler",
        inputs=Inputs(
            tensors=[
                Tensor(name="x", datatype=TensorDatatype.UINT8, shape=[1, 2], data=b"\x01\x02")
            ]
        ),
    )
    _log(logger, [request])
    assert orjson.loads(producer.sent[0].value)["request"]["tensors"] == [
        {"name": "x", "datatype": "UINT8", "shape": [1, 2], "base64": "AQI="}
    ]


def test_no_sink_or_zero_rate_logs_nothing_and_a_failing_sink_is_counted_not_raised() -> None:
    producer = Producer()
    assert _log(PayloadLogger(_settings(1.0, None), producer, Store()), _requests(5)) == 0
    assert _log(PayloadLogger(_settings(0.0, "topic:t"), producer, Store()), _requests(5)) == 0
    assert producer.sent == []

    failing = PayloadLogger(_settings(1.0, "topic:t"), Producer(fail=True), Store())
    assert _log(failing, _requests(5)) == 0
    assert failing.failed == 5


@pytest.mark.parametrize(
    "sink",
    [
        "",
        "topic:",
        "kafka:x",
        "prefix:",
        "prefix:///",
        "s3://b/p",
        "topic:a b",
        "topic:a/b",
        "prefix:a\x00b",
        "topic:" + "x" * 300,
    ],
)
def test_a_malformed_sink_setting_is_refused_at_load(sink: str) -> None:
    with pytest.raises(ValueError, match="payload_log_sink"):
        _settings(0.5, sink)


@pytest.mark.parametrize("rate", [-0.1, 1.5, math.nan])
def test_a_rate_outside_zero_to_one_is_refused_at_load(rate: float) -> None:
    with pytest.raises(ValueError, match="payload_log_rate"):
        _settings(rate, "topic:t")


def test_parse_sink_refuses_what_settings_would_not_hold() -> None:
    assert parse_sink("prefix:/a/b/").where == "a/b"
    with pytest.raises(ValueError, match="neither"):
        parse_sink("prefix:///")


def test_the_worker_principal_may_write_its_payload_log_topic_and_no_other() -> None:
    grants = plan(_settings(0.5, "topic:audit.scaler"), {})
    writers = {
        g.principal
        for g in grants
        if g.resource_name == "audit.scaler" and g.operation is Operation.WRITE
    }
    assert writers == {"worker-scaler"}
