"""Publishing requests and reading outcomes for worker tests, through the real broker."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

import schemas
from devkit.demo.examples import invoice_records
from pipeline.kafka import admin as kafka_admin
from pipeline.kafka import clients
from pipeline.kafka.clients import ConsumerRole, ProducerRole
from pipeline.kafka.events import decode_records
from pipeline.settings import Settings
from pipeline.topics import ModelTopics
from schemas.models import DeadLetter, Event, InferenceRequest, InferenceResult, Inputs

E = TypeVar("E", bound=Event)

REPO_ROOT = Path(__file__).resolve().parents[2]


def scaler_request(index: int, **fields: object) -> InferenceRequest:
    features = {f"f{i}": float(index + i) for i in range(4)}
    return InferenceRequest(
        request_id=uuid.uuid4(), model="scaler", inputs=Inputs(features=features), **fields
    )


def publish(settings: Settings, topic: str, values: Iterable[tuple[bytes | None, bytes]]) -> int:
    producer = clients.producer(settings.kafka, role=ProducerRole.FEED)
    errors: list[object] = []
    count = 0
    for key, value in values:
        producer.produce(
            topic, value, key=key, on_delivery=lambda e, _m: errors.append(e) if e else None
        )
        producer.poll(0)
        count += 1
    assert producer.flush(30) == 0
    assert errors == []
    return count


def publish_requests(settings: Settings, topic: str, requests: Iterable[InferenceRequest]) -> int:
    return publish(
        settings, topic, ((str(r.request_id).encode(), schemas.encode(r)) for r in requests)
    )


@dataclass
class Collected:
    results: list[InferenceResult]
    dead_letters: list[DeadLetter]


def collect(
    settings: Settings,
    results_topic: str,
    dlq_topic: str,
    expected: int,
    timeout_s: float,
    read_committed: bool = True,
) -> Collected:
    """Read outcomes until ``expected`` distinct request outcomes arrived or time runs out."""
    consumer = clients.consumer(
        settings.kafka,
        group_id=clients.throwaway_group("collector"),
        role=ConsumerRole.COMMITTED,
        overrides={"isolation.level": "read_committed" if read_committed else "read_uncommitted"},
    )
    consumer.subscribe([results_topic, dlq_topic])
    results: list[InferenceResult] = []
    letters: list[DeadLetter] = []
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while len(seen) < expected and time.monotonic() < deadline:
            for message in consumer.consume(1000, 0.5):
                if message.error() is not None:
                    continue
                if message.topic() == dlq_topic:
                    letter = schemas.decode(message.value() or b"", DeadLetter)
                    letters.append(letter)
                    seen.add(
                        f"dlq:{letter.original_topic}:{letter.original_partition}:"
                        f"{letter.original_offset}"
                    )
                else:
                    result = schemas.decode(message.value() or b"", InferenceResult)
                    results.append(result)
                    seen.add(str(result.request_id))
    finally:
        consumer.close()
    return Collected(results, letters)


def committed_offsets(
    settings: Settings, group: str, topic: str, partitions: int
) -> dict[int, int]:
    consumer = clients.consumer(settings.kafka, group_id=group, role=ConsumerRole.READER)
    try:
        committed = consumer.committed(
            [TopicPartition(topic, p) for p in range(partitions)], timeout=10
        )
        return {tp.partition: tp.offset for tp in committed}
    finally:
        consumer.close()


def end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    return kafka_admin.end_offsets(settings.kafka, topic)


def events_on_topic(settings: Settings, topic: str, kind: type[E]) -> list[E]:
    """Every event on ``topic`` now (read to its end offsets), decoded as ``kind``."""
    ends = end_offsets(settings, topic)
    consumer = clients.consumer(
        settings.kafka,
        group_id=clients.throwaway_group("topic-reader"),
        role=ConsumerRole.SNAPSHOT,
    )
    found: list[E] = []
    try:
        open_partitions = {p for p, end in ends.items() if end > 0}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in open_partitions])
        while open_partitions:
            message = consumer.poll(10)
            assert message is not None, f"{topic} did not answer"
            error = message.error()
            if error is not None:
                assert error.code() == KafkaError._PARTITION_EOF, error
                open_partitions.discard(int(message.partition() or 0))
                continue
            found.append(schemas.decode(message.value() or b"", kind))
    finally:
        consumer.close()
    return found


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment that points a worker subprocess at the test services and namespace."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICEWAY_")}
    env.update(
        SLUICEWAY_NAMESPACE=settings.namespace,
        SLUICEWAY_KAFKA__BOOTSTRAP_SERVERS=settings.kafka.bootstrap_servers,
        SLUICEWAY_OBJECT_STORE__ENDPOINT=settings.object_store.endpoint,
        SLUICEWAY_OBJECT_STORE__ACCESS_KEY=settings.object_store.access_key,
        SLUICEWAY_OBJECT_STORE__SECRET_KEY=settings.object_store.secret_key.get_secret_value(),
        SLUICEWAY_OBJECT_STORE__BUCKET=settings.object_store.bucket,
        SLUICEWAY_BACKENDS__TRITON__GRPC_URL=settings.backends.triton.grpc_url,
        SLUICEWAY_BACKENDS__TRITON__HTTP_URL=settings.backends.triton.http_url,
        SLUICEWAY_WORKERS__PROCESSES=str(settings.workers.processes or 1),
        # A runtime process serves only the models it is told of.
        SLUICEWAY_MODELS=json.dumps(settings.as_dict()["models"]),
    )
    env.update(extra)
    return env


def start_worker(
    settings: Settings,
    log_path: Path,
    models: Sequence[str] = ("scaler",),
    **extra_env: str,
) -> subprocess.Popen[bytes]:
    model_args = [arg for model in models for arg in ("--model", model)]
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "sluiceway", "worker", *model_args],
            cwd=REPO_ROOT,
            env=worker_env(settings, **extra_env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def realtime_latencies(
    settings: Settings, model: str, count: int, rate_per_s: float
) -> list[float]:
    """Publish ``count`` real-time invoice requests for ``model`` at a steady rate and return
    the seconds from each send to its result; raise when results stop coming."""
    topics = ModelTopics(settings.namespace, model)
    # Linger 0: each request leaves at once, so the latency measured is the pipeline's.
    producer = clients.producer(settings.kafka, role=ProducerRole.FEED, overrides={"linger.ms": 0})
    consumer = clients.consumer(
        settings.kafka, group_id=f"latency-{uuid.uuid4().hex[:6]}", role=ConsumerRole.READER
    )
    ends = kafka_admin.end_offsets(settings.kafka, topics.results)
    consumer.assign([TopicPartition(topics.results, p, o) for p, o in ends.items()])
    records = [
        {k: v for k, v in record.items() if k not in ("custom_id", "explain")}
        for record in invoice_records(count, seed=5)
    ]
    sent_at: dict[str, float] = {}
    sent = 0
    latencies: list[float] = []
    started = time.monotonic()
    # The measuring client's own garbage collections would show up as the worker's latency.
    gc.disable()
    try:
        while len(latencies) < count:
            due = min(count, int((time.monotonic() - started) * rate_per_s) + 1)
            while sent < due:
                request = InferenceRequest(
                    request_id=uuid.uuid4(), model=model, inputs=Inputs(features=records[sent])
                )
                sent_at[str(request.request_id)] = time.monotonic()
                producer.produce(topics.requests, schemas.encode(request), str(request.request_id))
                sent += 1
            producer.poll(0)
            for result in decode_records(consumer.consume(100, 0.002), InferenceResult):
                at = sent_at.pop(str(result.request_id), None)
                if at is not None:
                    latencies.append(time.monotonic() - at)
            if time.monotonic() - started > count / rate_per_s + 60:
                raise AssertionError(f"only {len(latencies)} of {count} real-time results")
    finally:
        gc.enable()
        producer.flush(10)
        consumer.close()
    return latencies


def p99(latencies: Sequence[float]) -> float:
    return float(np.percentile(latencies, 99))


def latency_summary(latencies: Sequence[float]) -> str:
    p50, p90, p99_ms = np.percentile(latencies, [50, 90, 99]) * 1e3
    return (
        f"p50 {p50:.1f} ms, p90 {p90:.1f} ms, p99 {p99_ms:.1f} ms, "
        f"max {max(latencies) * 1e3:.1f} ms"
    )
