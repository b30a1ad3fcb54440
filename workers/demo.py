"""The end-to-end job ``make demo`` runs: requests through Kafka, the worker, Triton and MinIO.

It starts the inference worker for the ``scaler`` model, publishes Avro ``InferenceRequest``
events the way a connector would, reads every ``InferenceResult`` back from the results
topic, checks each output against the model's arithmetic and one record against its segment
object (fetched by byte range, as the SDK does), and summarises what happened.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tritonclient.grpc as triton_grpc
from confluent_kafka import Consumer, Producer, TopicPartition

import schemas
from pipeline.kafka.admin import end_offsets
from pipeline.settings import Settings
from pipeline.storage.client import make_client
from pipeline.storage.store import SegmentStore
from pipeline.topics import ModelTopics
from schemas.models import InferenceRequest, InferenceResult, Inputs, ResultStatus
from workers.inference.runner import build_backends, prepare_topics_and_bucket
from workers.inference.worker import InferenceWorker

Progress = Callable[[str], None]
MODEL = "scaler"
SCALE_BY_VERSION = {"1": 2.0, "2": 3.0}


@dataclass
class DemoReport:
    run_id: str
    requests_topic: str
    results_topic: str
    bucket: str
    published: int = 0
    results_read: int = 0
    results_correct: int = 0
    versions: dict[str, int] = field(default_factory=dict)
    segments: set[str] = field(default_factory=set)
    ranged_get_matched: bool = False
    batches: int = 0
    commits: int = 0
    dead_lettered: int = 0
    triton_inferences: int = 0
    triton_executions: int = 0
    seconds: float = 0.0
    sample: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (
            self.published == self.results_read == self.results_correct
            and self.ranged_get_matched
            and self.dead_lettered == 0
        )


def _requests(count: int, run_id: str) -> list[InferenceRequest]:
    rng = np.random.default_rng(7)
    rows = rng.normal(100.0, 25.0, size=(count, 4))
    return [
        InferenceRequest(
            request_id=uuid.uuid4(),
            model=MODEL,
            inputs=Inputs(features={f"f{i}": round(float(v), 4) for i, v in enumerate(row)}),
            correlation_id=f"{run_id}-{index}",
            attributes={"demo_run": run_id},
        )
        for index, row in enumerate(rows)
    ]


def _publish(settings: Settings, topic: str, requests: list[InferenceRequest]) -> None:
    producer = Producer({**settings.kafka.client_config(), "linger.ms": 5, "acks": "all"})
    failures: list[str] = []
    for index, request in enumerate(requests):
        producer.produce(
            topic,
            schemas.encode(request),
            key=f"invoice-{index}",
            headers=list(schemas.message_headers(request.AVRO_NAME)),
            on_delivery=lambda err, _msg: failures.append(str(err)) if err else None,
        )
        producer.poll(0)
    if producer.flush(30) or failures:
        raise RuntimeError(f"requests not acknowledged: {failures[:3]}")


def _end_offsets(settings: Settings, topic: str) -> list[TopicPartition]:
    return [
        TopicPartition(topic, partition, offset)
        for partition, offset in sorted(end_offsets(settings.kafka, topic).items())
    ]


def _read_results(
    settings: Settings,
    start: list[TopicPartition],
    wanted: set[str],
    timeout_s: float,
    progress: Progress,
) -> dict[str, tuple[InferenceResult, float]]:
    consumer = Consumer(
        {
            **settings.kafka.client_config(),
            "group.id": f"sluiceway-demo-reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
        }
    )
    consumer.assign(start)
    found: dict[str, tuple[InferenceResult, float]] = {}
    deadline = time.monotonic() + timeout_s
    shown = 0
    try:
        while len(found) < len(wanted) and time.monotonic() < deadline:
            for message in consumer.consume(500, 0.5):
                if message.error() is not None:
                    continue
                result = schemas.decode(message.value() or b"", InferenceResult)
                if str(result.request_id) in wanted:
                    found[str(result.request_id)] = (result, time.monotonic())
            if len(found) - shown >= max(len(wanted) // 4, 1):
                shown = len(found)
                progress(f"  {shown}/{len(wanted)} results")
    finally:
        consumer.close()
    return found


def _triton_counts(settings: Settings) -> tuple[int, int]:
    client = triton_grpc.InferenceServerClient(settings.backends.triton.grpc_url)
    try:
        inferences = executions = 0
        for version in SCALE_BY_VERSION:
            stats = client.get_inference_statistics(MODEL, version, as_json=True)
            model = stats["model_stats"][0]
            inferences += int(model.get("inference_count", 0))
            executions += int(model.get("execution_count", 0))
        return inferences, executions
    finally:
        client.close()


def _check(
    report: DemoReport,
    requests: list[InferenceRequest],
    found: dict[str, tuple[InferenceResult, float]],
    settings: Settings,
) -> None:
    for request in requests:
        entry = found.get(str(request.request_id))
        if entry is None:
            continue
        result = entry[0]
        report.results_read += 1
        version = result.model_version or "?"
        report.versions[version] = report.versions.get(version, 0) + 1
        if result.payload_ref is not None:
            report.segments.add(result.payload_ref.key)
        tensors = result.outputs.tensors if result.outputs else None
        features = request.inputs.features or {}
        expected = np.array([[features[f"f{i}"] for i in range(4)]], dtype=np.float32)
        if result.status is ResultStatus.OK and tensors:
            got = np.frombuffer(tensors[0].data, dtype="<f4").reshape(tensors[0].shape)
            if np.allclose(got, expected * SCALE_BY_VERSION.get(version, np.nan), rtol=1e-5):
                report.results_correct += 1
    if found:
        sample_request = requests[len(requests) // 2]
        sample = found[str(sample_request.request_id)][0]
        ref = sample.payload_ref
        if ref is not None:
            store = make_client(settings.object_store)
            body = store.get_object(ref.bucket, ref.key, offset=ref.offset, length=ref.length)
            try:
                record = json.loads(body.read())
            finally:
                body.close()
                body.release_conn()
            report.ranged_get_matched = record["request_id"] == str(sample.request_id)
            report.sample = {
                "result_event": _readable(sample),
                "segment_record": record,
            }


def _readable(result: InferenceResult) -> dict[str, Any]:
    """The event as a person reads it: tensors as numbers instead of raw bytes."""
    readable = result.model_dump(mode="json", exclude_none=True, exclude={"outputs"})
    tensors = result.outputs.tensors if result.outputs else None
    if tensors:
        readable["outputs"] = {
            t.name: np.frombuffer(t.data, dtype="<f4").reshape(t.shape).round(4).tolist()
            for t in tensors
            if t.datatype.value == "FP32"
        }
    return readable


async def _run(settings: Settings, count: int, progress: Progress) -> DemoReport:
    topics = ModelTopics(settings.namespace, MODEL)
    run_id = uuid.uuid4().hex[:12]
    report = DemoReport(run_id, topics.requests, topics.results, settings.object_store.bucket)
    prepare_topics_and_bucket(settings, [MODEL])
    start = _end_offsets(settings, topics.results)
    inferences_before, executions_before = _triton_counts(settings)
    backends = build_backends(settings, [MODEL])
    store = SegmentStore(make_client(settings.object_store), settings.object_store.bucket)
    worker = InferenceWorker(settings, [MODEL], backends, store)
    progress(f"starting the inference worker (group {worker.group_id})")
    serving = asyncio.ensure_future(worker.run())
    loop = asyncio.get_running_loop()
    try:
        requests = _requests(count, run_id)
        progress(f"publishing {count} Avro requests to {topics.requests} (run {run_id})")
        started = time.monotonic()
        await loop.run_in_executor(None, _publish, settings, topics.requests, requests)
        wanted = {str(r.request_id) for r in requests}
        found = await loop.run_in_executor(
            None, _read_results, settings, start, wanted, 120.0, progress
        )
        report.seconds = time.monotonic() - started
        report.published = count
    finally:
        worker.stop()
        stats = await serving
        for backend in backends.values():
            await backend.close()
        store.close()
    report.batches, report.commits, report.dead_lettered = (
        stats.batches,
        stats.commits,
        stats.dead_lettered,
    )
    _check(report, requests, found, settings)
    inferences_after, executions_after = _triton_counts(settings)
    report.triton_inferences = inferences_after - inferences_before
    report.triton_executions = executions_after - executions_before
    return report


def run_demo(settings: Settings, count: int = 2000, progress: Progress = print) -> DemoReport:
    """Run one round trip of ``count`` requests through the real worker; return what happened."""
    return asyncio.run(_run(settings, count, progress))


def render_report(report: DemoReport) -> str:
    """A summary a person reads in ten seconds."""
    verdict = "OK" if report.ok else "FAILED"
    versions = ", ".join(f"v{v}: {n}" for v, n in sorted(report.versions.items()))
    rate = report.published / report.seconds if report.seconds else 0.0
    lines = [
        f"Sluiceway round trip {verdict}: Kafka -> worker -> Triton -> MinIO -> Kafka "
        f"(run {report.run_id})",
        f"  published  {report.published} Avro InferenceRequests to {report.requests_topic}",
        f"  served     {report.results_read} in {report.batches} micro-batches "
        f"({versions or 'none'}); Triton ran {report.triton_inferences} rows in "
        f"{report.triton_executions} executions",
        f"  stored     {len(report.segments)} segment objects under s3://{report.bucket}/{MODEL}/",
        f"  results    {report.results_read} on {report.results_topic}, "
        f"{report.results_correct} with correct outputs; {report.dead_lettered} dead-lettered; "
        f"offsets committed {report.commits} times",
        f"  took       {report.seconds:.2f}s publish-to-last-result ({rate:,.0f} requests/s)",
        "  ranged GET of one result's record "
        + ("matched its event" if report.ranged_get_matched else "DID NOT match"),
    ]
    if report.sample:
        lines.append("  sample result event:")
        lines.append("    " + json.dumps(report.sample["result_event"], default=str)[:600])
        lines.append("  its full record in the segment (fetched by byte range):")
        lines.append("    " + json.dumps(report.sample["segment_record"])[:600])
    return "\n".join(lines)
