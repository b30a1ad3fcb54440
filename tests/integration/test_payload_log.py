"""Payload logging on the real stack: of 10,000 served requests, the sink holds exactly the
sampled ones (and so their share within a binomial bound), their PII features masked."""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path
from typing import Any

import orjson

from pipeline.kafka import clients
from pipeline.kafka.admin import TopicSpec, control_topic_spec, ensure_topics, model_topic_specs
from pipeline.kafka.clients import ConsumerRole
from pipeline.payload_log import sampled
from pipeline.settings import Settings
from pipeline.storage.client import ensure_bucket, make_client
from pipeline.topics import ModelTopics
from tests.integration import traffic

COUNT = 10_000
RATE = 0.2


def _read_logged(
    settings: Settings, topic: str, expected: int, timeout_s: float
) -> list[dict[str, Any]]:
    consumer = clients.consumer(
        settings.kafka, group_id=clients.throwaway_group("payloads"), role=ConsumerRole.COMMITTED
    )
    consumer.subscribe([topic])
    entries: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(entries) < expected and time.monotonic() < deadline:
            for message in consumer.consume(1000, 0.5):
                if message.error() is None:
                    entries.append(orjson.loads(message.value() or b"null"))
    finally:
        consumer.close()
    return entries


def test_the_sink_holds_the_sampled_share_of_ten_thousand_requests(
    settings: Settings, tmp_path: Path
) -> None:
    topics = ModelTopics(settings.namespace, "scaler")
    payloads = f"{settings.namespace}.scaler.payloads"
    ensure_topics(
        settings.kafka,
        [control_topic_spec(settings.namespace), *model_topic_specs(topics), TopicSpec(payloads)],
    )
    ensure_bucket(make_client(settings.object_store), settings.object_store.bucket)
    requests = [traffic.scaler_request(i) for i in range(COUNT)]
    traffic.publish_requests(settings, topics.requests, requests)

    worker = traffic.start_worker(
        settings,
        tmp_path / "worker.log",
        ("scaler",),
        SLUICEWAY_MODELS__SCALER__FEATURE_ORDER=json.dumps(["f0", "f1", "f2", "f3"]),
        SLUICEWAY_MODELS__SCALER__DEFAULT_VERSION="1",
        SLUICEWAY_MODELS__SCALER__PII=json.dumps({"f1": "mask"}),
        SLUICEWAY_WORKERS__DEAD_LETTER_ORIGINAL="drop",  # what a pii policy requires
        SLUICEWAY_MODELS__SCALER__PAYLOAD_LOG_RATE=str(RATE),
        SLUICEWAY_MODELS__SCALER__PAYLOAD_LOG_SINK=f"topic:{payloads}",
    )
    try:
        got = traffic.collect(settings, topics.results, topics.dlq, COUNT, timeout_s=120)
        expected = {str(r.request_id) for r in requests if sampled(str(r.request_id), RATE)}
        logged = _read_logged(settings, payloads, len(expected), timeout_s=60)
    finally:
        worker.send_signal(signal.SIGTERM)
        stopped = worker.wait(60)

    assert stopped == 0
    assert len(got.results) == COUNT
    ids = [entry["request_id"] for entry in logged]
    assert len(ids) == len(set(ids)) == len(expected)
    assert set(ids) == expected
    # The hash behaves as a fair coin: the share is within 4.5 standard deviations of a
    # binomial(10,000, 0.2), a bound a fair sampler breaks about once in 150,000 runs.
    bound = 4.5 * math.sqrt(COUNT * RATE * (1 - RATE))
    print(
        f"logged {len(ids)} of {COUNT} at rate {RATE}: expected {COUNT * RATE:.0f} +- {bound:.0f}"
    )
    assert abs(len(ids) - COUNT * RATE) <= bound
    assert {entry["request"]["features"]["f1"] for entry in logged} == {"<masked>"}
    assert all(entry["response"]["request_id"] == entry["request_id"] for entry in logged)
    assert {entry["model_version"] for entry in logged} == {"1"}
