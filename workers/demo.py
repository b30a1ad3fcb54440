"""The foundation's end-to-end job: requests through Kafka, Triton and MinIO, and back.

This is what ``make demo`` runs on the local stack. It publishes requests for the ``scaler``
model, serves them in micro-batches (one multi-row Triton call and one segment object per
batch), produces one result per request, commits offsets only after the results are acked,
then reads every result back and checks it against the store and the model's arithmetic.
The production worker (micro-batcher, breakers, DLQ, routing) replaces the serving loop here;
the round trip and its guarantees stay the same.
"""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import tritonclient.grpc as triton_grpc
from confluent_kafka import Consumer, Message, Producer, TopicPartition

from pipeline.kafka.admin import TopicSpec, ensure_topics
from pipeline.settings import Settings
from pipeline.storage.client import ensure_bucket, make_client
from pipeline.storage.segments import build_segment
from pipeline.topics import ModelTopics

Progress = Callable[[str], None]
MODEL = "scaler"
FEATURES = 4


@dataclass
class DemoReport:
    run_id: str
    model_version: str
    requests_topic: str
    results_topic: str
    bucket: str
    published: int = 0
    served: int = 0
    batches: int = 0
    segments: list[str] = field(default_factory=list)
    results_read: int = 0
    results_correct: int = 0
    ranged_get_matched: bool = False
    triton_inferences: int = 0
    triton_executions: int = 0
    publish_s: float = 0.0
    serve_s: float = 0.0
    sample: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (
            self.published == self.served == self.results_read == self.results_correct
            and self.ranged_get_matched
        )


def _delivery_checker(failures: list[str]) -> Callable[[Any, Message], None]:
    def on_delivery(error: Any, message: Message) -> None:
        if error is not None:
            failures.append(f"{message.topic()}: {error}")

    return on_delivery


def _publish(settings: Settings, topics: ModelTopics, run_id: str, count: int) -> float:
    producer = Producer({**settings.kafka.client_config(), "linger.ms": 5, "acks": "all"})
    failures: list[str] = []
    on_delivery = _delivery_checker(failures)
    rng = np.random.default_rng(7)
    started = time.monotonic()
    for index in range(count):
        request = {
            "request_id": str(uuid.uuid4()),
            "run_id": run_id,
            "model": MODEL,
            "inputs": [round(float(v), 4) for v in rng.normal(100.0, 25.0, FEATURES)],
        }
        producer.produce(
            topics.requests,
            key=f"invoice-{index}",
            value=json.dumps(request).encode(),
            on_delivery=on_delivery,
        )
        producer.poll(0)
    remaining = producer.flush(30)
    if remaining or failures:
        raise RuntimeError(f"{remaining} requests unacknowledged, failures: {failures[:3]}")
    return time.monotonic() - started


def _serve(settings: Settings, topics: ModelTopics, report: DemoReport, progress: Progress) -> None:
    """Consume this run's requests in micro-batches and answer each batch.

    Per batch:
    1. One Triton call with the batch's rows stacked along the batch dimension.
    2. One segment object in the store holding every full result of the batch.
    3. One result event per request, naming its segment, offset and length.
    4. Offsets committed only after the broker acked every result of the batch.
    """
    store = make_client(settings.object_store)
    triton = triton_grpc.InferenceServerClient(settings.backends.triton.grpc_url)
    consumer = Consumer(
        {
            **settings.kafka.client_config(),
            "group.id": "sluiceway-demo",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    producer = Producer({**settings.kafka.client_config(), "linger.ms": 2, "acks": "all"})
    consumer.subscribe([topics.requests])
    max_batch = settings.workers.max_batch_size
    deadline = time.monotonic() + 60.0
    started = time.monotonic()
    try:
        while report.served < report.published and time.monotonic() < deadline:
            messages = [m for m in consumer.consume(max_batch, timeout=1.0) if m.error() is None]
            requests = [json.loads(m.value() or b"{}") for m in messages]
            mine = [
                (m, r)
                for m, r in zip(messages, requests, strict=True)
                if r.get("run_id") == report.run_id
            ]
            if mine:
                _answer_batch(mine, settings, topics, report, store, triton, producer)
            if messages:
                consumer.commit(asynchronous=False)
                progress(f"  served {report.served}/{report.published} requests")
    finally:
        consumer.close()
        triton.close()
    report.serve_s = time.monotonic() - started


def _answer_batch(
    batch: list[tuple[Message, dict[str, Any]]],
    settings: Settings,
    topics: ModelTopics,
    report: DemoReport,
    store: Any,
    triton: triton_grpc.InferenceServerClient,
    producer: Producer,
) -> None:
    # Step 1.
    rows = np.array([request["inputs"] for _, request in batch], dtype=np.float32)
    tensor = triton_grpc.InferInput("x", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)
    response = triton.infer(MODEL, [tensor], model_version=report.model_version)
    outputs = response.as_numpy("y")
    # Step 2.
    now = datetime.now(UTC)
    request_ids = [request["request_id"] for _, request in batch]
    records = [
        {"request_id": request["request_id"], "inputs": request["inputs"], "outputs": out.tolist()}
        for (_, request), out in zip(batch, outputs, strict=True)
    ]
    segment = build_segment(MODEL, report.model_version, records, request_ids, now)
    store.put_object(
        report.bucket,
        segment.key,
        io.BytesIO(segment.body),
        len(segment.body),
        content_type="application/x-ndjson",
    )
    report.segments.append(segment.key)
    # Step 3.
    failures: list[str] = []
    on_delivery = _delivery_checker(failures)
    for (message, request), out, span in zip(batch, outputs, segment.spans, strict=True):
        result = {
            "request_id": request["request_id"],
            "run_id": report.run_id,
            "status": "ok",
            "model": MODEL,
            "model_version": report.model_version,
            "outputs": [round(float(v), 4) for v in out],
            "segment": {
                "uri": f"s3://{report.bucket}/{segment.key}",
                "offset": span.offset,
                "length": span.length,
            },
        }
        producer.produce(
            topics.results,
            key=message.key(),
            value=json.dumps(result).encode(),
            on_delivery=on_delivery,
        )
    # Step 4 (the commit itself follows in the caller, after this flush).
    if producer.flush(30) or failures:
        raise RuntimeError(f"results not acknowledged: {failures[:3]}")
    report.served += len(batch)
    report.batches += 1


def _end_offsets(settings: Settings, topic: str) -> list[TopicPartition]:
    consumer = Consumer({**settings.kafka.client_config(), "group.id": "sluiceway-demo-probe"})
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        partitions = sorted(metadata.topics[topic].partitions)
        ends = []
        for partition in partitions:
            _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            ends.append(TopicPartition(topic, partition, high))
        return ends
    finally:
        consumer.close()


def _verify(settings: Settings, start: list[TopicPartition], report: DemoReport) -> None:
    """Read this run's results back, check each output and one record by ranged GET."""
    scale = {"1": 2.0, "2": 3.0}[report.model_version]
    consumer = Consumer(
        {
            **settings.kafka.client_config(),
            "group.id": f"sluiceway-demo-verify-{report.run_id}",
            "enable.auto.commit": False,
        }
    )
    consumer.assign(start)
    segments: dict[str, list[dict[str, Any]]] = {}
    deadline = time.monotonic() + 30.0
    results: list[dict[str, Any]] = []
    try:
        while len(results) < report.published and time.monotonic() < deadline:
            for message in consumer.consume(500, timeout=1.0):
                if message.error() is None:
                    result = json.loads(message.value() or b"{}")
                    if result.get("run_id") == report.run_id:
                        results.append(result)
    finally:
        consumer.close()
    store = make_client(settings.object_store)
    report.results_read = len(results)
    for result in results:
        segment = result["segment"]
        key = segment["uri"].removeprefix(f"s3://{report.bucket}/")
        if key not in segments:
            body = store.get_object(report.bucket, key)
            try:
                segments[key] = [json.loads(line) for line in body.read().splitlines()]
            finally:
                body.close()
                body.release_conn()
        record = next(r for r in segments[key] if r["request_id"] == result["request_id"])
        expected = [round(v * scale, 2) for v in record["inputs"]]
        if [round(v, 2) for v in result["outputs"]] == expected:
            report.results_correct += 1
    if results:
        sample = results[len(results) // 2]
        segment = sample["segment"]
        key = segment["uri"].removeprefix(f"s3://{report.bucket}/")
        ranged = store.get_object(
            report.bucket, key, offset=segment["offset"], length=segment["length"]
        )
        try:
            record = json.loads(ranged.read())
        finally:
            ranged.close()
            ranged.release_conn()
        report.ranged_get_matched = record["request_id"] == sample["request_id"]
        report.sample = {"result_event": sample, "segment_record": record}


def _triton_counts(settings: Settings, version: str) -> tuple[int, int]:
    client = triton_grpc.InferenceServerClient(settings.backends.triton.grpc_url)
    try:
        stats = client.get_inference_statistics(MODEL, version, as_json=True)
    finally:
        client.close()
    model = stats["model_stats"][0]
    return int(model.get("inference_count", 0)), int(model.get("execution_count", 0))


def run_demo(
    settings: Settings, count: int = 512, model_version: str = "1", progress: Progress = print
) -> DemoReport:
    """Run one round trip of ``count`` requests and return what happened."""
    topics = ModelTopics(settings.namespace, MODEL)
    run_id = uuid.uuid4().hex[:12]
    bucket = settings.object_store.bucket
    report = DemoReport(run_id, model_version, topics.requests, topics.results, bucket)
    ensure_topics(settings.kafka, [TopicSpec(topics.requests), TopicSpec(topics.results)])
    ensure_bucket(make_client(settings.object_store), bucket)
    results_start = _end_offsets(settings, topics.results)
    inferences_before, executions_before = _triton_counts(settings, model_version)

    progress(f"publishing {count} requests to {topics.requests} (run {run_id})")
    report.publish_s = _publish(settings, topics, run_id, count)
    report.published = count
    progress(f"serving them with Triton model {MODEL} v{model_version} in micro-batches")
    _serve(settings, topics, report, progress)
    progress(f"reading {count} results back from {topics.results}")
    _verify(settings, results_start, report)

    inferences_after, executions_after = _triton_counts(settings, model_version)
    report.triton_inferences = inferences_after - inferences_before
    report.triton_executions = executions_after - executions_before
    return report


def render_report(report: DemoReport) -> str:
    """A summary a person reads in ten seconds."""
    verdict = "OK" if report.ok else "FAILED"
    lines = [
        f"Sluiceway round trip {verdict}: Kafka -> Triton -> MinIO -> Kafka (run {report.run_id})",
        f"  published  {report.published} requests to {report.requests_topic} "
        f"in {report.publish_s:.2f}s",
        f"  served     {report.served} requests in {report.batches} micro-batches by Triton "
        f"model {MODEL} v{report.model_version} in {report.serve_s:.2f}s "
        f"(Triton counted {report.triton_inferences} rows in {report.triton_executions} "
        "executions)",
        f"  stored     {len(report.segments)} segment objects in s3://{report.bucket}/"
        f"{MODEL}/{report.model_version}/...",
        f"  produced   {report.served} results to {report.results_topic}; offsets committed "
        "after the broker acked them",
        f"  verified   {report.results_correct}/{report.results_read} results read back with "
        "correct outputs; ranged GET of one record "
        + ("matched its event" if report.ranged_get_matched else "DID NOT match"),
    ]
    if report.sample:
        lines.append("  sample result event:")
        lines.append("    " + json.dumps(report.sample["result_event"]))
        lines.append("  its record in the segment (fetched by byte range):")
        lines.append("    " + json.dumps(report.sample["segment_record"]))
    return "\n".join(lines)
