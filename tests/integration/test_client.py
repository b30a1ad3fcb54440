"""The client SDK against the real broker and a real worker serving the scaler model."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import TopicPartition

import schemas
from pipeline.client import (
    AsyncSluicewayClient,
    BrokerUnavailableError,
    InferTimeoutError,
    RequestFailedError,
    SluicewayClient,
    request_id_for,
)
from pipeline.kafka import clients
from pipeline.kafka.clients import ConsumerRole
from pipeline.settings import Settings
from schemas.models import InferenceRequest, InferenceResult, Inputs, ResultStatus
from tests.integration import traffic
from workers.inference.runner import prepare_topics_and_bucket
from workers.processes import ServiceProcess

REPO_ROOT = Path(__file__).resolve().parents[2]


def _score(result: InferenceResult) -> np.ndarray:
    assert result.outputs is not None
    assert result.outputs.tensors is not None
    tensor = result.outputs.tensors[0]
    return np.frombuffer(tensor.data, dtype="<f4")


@pytest.fixture
def serving(settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    prepare_topics_and_bucket(settings, ["scaler"])
    with ServiceProcess(settings, ["worker", "--model", "scaler"], tmp_path / "worker.log"):
        yield settings


def test_publish_is_acknowledged_where_the_request_is_stored(settings: Settings) -> None:
    prepare_topics_and_bucket(settings, ["scaler"])
    requests = [traffic.scaler_request(i) for i in range(20)]
    with SluicewayClient(settings) as client:
        receipts = client.publish_many(requests)
    assert [r.request_id for r in receipts] == [str(r.request_id) for r in requests]
    consumer = clients.consumer(settings.kafka, group_id="receipt-check", role=ConsumerRole.READER)
    try:
        for receipt, request in list(zip(receipts, requests, strict=True))[:5]:
            consumer.assign([TopicPartition(receipt.topic, receipt.partition, receipt.offset)])
            message = consumer.poll(10)
            assert message is not None
            assert schemas.decode(message.value() or b"", InferenceRequest) == request
    finally:
        consumer.close()


def test_concurrent_infers_share_one_reply_consumer(serving: Settings) -> None:
    requests = [traffic.scaler_request(i) for i in range(24)]
    with SluicewayClient(serving) as client:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda r: client.infer(r, timeout_s=60), requests))
        assert client._replies is not None  # one consumer, however many calls
    for request, result in zip(requests, results, strict=True):
        assert result.request_id == request.request_id
        assert result.status is ResultStatus.OK
        assert result.correlation_id == str(request.request_id)
        features = request.inputs.features or {}
        # The scaler doubles its inputs.
        np.testing.assert_allclose(_score(result), [2 * features[f"f{i}"] for i in range(4)])


def test_async_client_infers_and_subscribes(serving: Settings) -> None:
    async def run() -> tuple[InferenceResult, list[InferenceResult]]:
        async with AsyncSluicewayClient(serving) as client:
            result = await client.infer(traffic.scaler_request(7), timeout_s=60)
            seen = []
            async for item in client.subscribe("scaler", from_beginning=True):
                seen.append(item)
                if len(seen) == 1:
                    break
            return result, seen

    result, seen = asyncio.run(run())
    assert result.status is ResultStatus.OK
    assert seen[0].request_id == result.request_id


def test_expired_requests_raise_with_the_result(serving: Settings) -> None:
    late = traffic.scaler_request(1, deadline=datetime.now(UTC) - timedelta(seconds=5))
    with SluicewayClient(serving) as client, pytest.raises(RequestFailedError) as failure:
        client.infer(late, timeout_s=60)
    assert failure.value.result.status is ResultStatus.EXPIRED


def test_a_dead_lettered_request_fails_at_once_with_its_reason(serving: Settings) -> None:
    """The worker answers a request it dead-letters on its reply topic too: ``infer`` raises
    with the reason instead of waiting for its whole timeout."""
    missing = InferenceRequest(
        request_id=uuid.uuid4(), model="scaler", inputs=Inputs(features={"f0": 1.0})
    )
    with SluicewayClient(serving) as client, pytest.raises(RequestFailedError) as failure:
        client.infer(missing, timeout_s=60)
    assert failure.value.result.status is ResultStatus.REJECTED
    assert failure.value.result.error_code == "missing_feature"


def test_no_worker_means_a_typed_timeout(settings: Settings) -> None:
    prepare_topics_and_bucket(settings, ["scaler"])
    with SluicewayClient(settings) as client:
        started = time.monotonic()
        with pytest.raises(InferTimeoutError):
            client.infer(traffic.scaler_request(1), timeout_s=2)
        assert time.monotonic() - started < 15


def test_an_unreachable_broker_is_a_typed_error(settings: Settings) -> None:
    nowhere = settings.model_copy(
        update={"kafka": settings.kafka.model_copy(update={"bootstrap_servers": "127.0.0.1:1"})}
    )
    with SluicewayClient(nowhere) as client, pytest.raises(BrokerUnavailableError):
        client.publish(traffic.scaler_request(1), timeout_s=2)


def test_request_ids_follow_the_source_event() -> None:
    assert request_id_for("S4H", "evt-1") == request_id_for("S4H", "evt-1")
    assert request_id_for("S4H", "evt-1") != request_id_for("S4H", "evt-2")


def _cli(settings: Settings, *args: str) -> str:
    """Run ``sluiceway ARGS`` with exactly these settings; return its output."""
    done = subprocess.run(
        [sys.executable, "-m", "sluiceway", *args],
        cwd=REPO_ROOT,
        env={**settings.as_environment(), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_cli_infer_and_subscribe(serving: Settings) -> None:
    features = json.dumps({"f0": 1.0, "f1": 2.0, "f2": 3.0, "f3": 4.0})
    answer = json.loads(_cli(serving, "infer", "--model", "scaler", "--features", features))
    assert answer["status"] == "ok"
    assert answer["outputs"]["y"] == [[2.0, 4.0, 6.0, 8.0]]
    lines = _cli(
        serving, "subscribe", "--model", "scaler", "--from-beginning", "--jsonl", "--max", "1"
    ).splitlines()
    assert json.loads(lines[0])["request_id"] == answer["request_id"]


def test_cli_infer_example_answers_an_sap_invoice_with_its_explanation(
    settings: Settings, tmp_path: Path
) -> None:
    prepare_topics_and_bucket(settings, ["invoice_risk"])
    with ServiceProcess(settings, ["worker", "--model", "invoice_risk"], tmp_path / "w.log"):
        first = json.loads(_cli(settings, "infer", "--example"))
        again = json.loads(_cli(settings, "infer", "--example"))  # reuses the reply topic
    for answer in (first, again):
        assert answer["status"] == "ok"
        assert answer["model"] == "invoice_risk"
        assert 0.0 < answer["outputs"]["score"][0][0] < 1.0
        assert len(answer["explanation"]["attributions"]) == 5
    assert first["request_id"] != again["request_id"]


def test_cli_topics_create_and_describe(settings: Settings) -> None:
    created = _cli(settings, "topics", "create", "--model", "invoice_risk", "--partitions", "2")
    # requests, batch, results, dlq, invalidations, feedback, drift, control, batch progress
    assert created.count("created") == 9
    assert "exists" in _cli(settings, "topics", "create", "--model", "invoice_risk")
    rows = {
        line.split()[0]: line.split()[1:]
        for line in _cli(settings, "topics", "describe").splitlines()[1:]
    }
    ns = settings.namespace
    assert rows[f"{ns}.invoice_risk.requests"][:2] == ["2", "1"]
    assert rows[f"{ns}.control"][:3] == ["1", "1", "compact"]
    assert rows[f"{ns}.batch.progress"][:3] == ["1", "1", "compact"]
    assert rows[f"{ns}.invoice_risk.dlq"][3:] == ["14", "d"]
