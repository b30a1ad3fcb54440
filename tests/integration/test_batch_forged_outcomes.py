"""A batch job's output is made only of outcomes of the requests its runner published: an
outsider who publishes requests, results or dead letters under a job's message keys changes
nothing (real Kafka, MinIO, Triton and a real worker process)."""

from __future__ import annotations

import logging
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import TopicPartition

import schemas
from devkit.demo.examples import invoice_records, write_example
from pipeline.batchjobs.store import JobStore
from pipeline.batchjobs.submit import submit
from pipeline.kafka import clients
from pipeline.kafka.admin import end_offsets
from pipeline.kafka.clients import ConsumerRole
from pipeline.settings import BatchSettings, Settings
from pipeline.topics import ModelTopics
from schemas.models import (
    BatchInputFormat,
    BatchJob,
    BatchJobStatus,
    DeadLetter,
    InferenceRequest,
    InferenceResult,
    Inputs,
    Outputs,
    ResultStatus,
    Tensor,
    TensorDatatype,
)
from tests.integration.test_batch_jobs import _lines, _published_keys
from tests.integration.traffic import publish
from tests.integration.waiting import wait_until
from workers.batch.runner import JobRunner, message_key, request_id
from workers.inference.runner import prepare_topics_and_bucket
from workers.processes import ServiceProcess

MODEL = "invoice_risk"
ROWS = 200
T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def _forged_result(request: uuid.UUID, job_id: str, custom_id: str) -> bytes:
    return schemas.encode(
        InferenceResult(
            request_id=request,
            status=ResultStatus.OK,
            model=MODEL,
            model_version="forged",
            outputs=Outputs(
                tensors=[
                    Tensor(
                        name="score",
                        datatype=TensorDatatype.FP32,
                        shape=[1, 1],
                        data=np.array([[0.999]], dtype="<f4").tobytes(),
                    )
                ]
            ),
            batch_job_id=job_id,
            custom_id=custom_id,
        )
    )


def _forged_letter(request: str | None) -> bytes:
    return schemas.encode(
        DeadLetter(
            original_topic="inference.invoice_risk.batch",
            original_partition=0,
            original_offset=0,
            error_class="Refused",
            reason_code="forged_failure",
            reason_message="an outsider says this record failed",
            attempts=1,
            first_failure_at=T0,
            last_failure_at=T0,
            request_id=request,
        )
    )


def _runner_requests(settings: Settings, job_id: str) -> dict[bytes, set[uuid.UUID]]:
    """The request ids on the batch topic under each of the job's keys (anybody's)."""
    topic = ModelTopics(settings.namespace, MODEL).batch
    ends = end_offsets(settings.kafka, topic)
    consumer = clients.consumer(
        settings.kafka, group_id=f"audit-{uuid.uuid4().hex[:6]}", role=ConsumerRole.READER
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in ends])
    found: dict[bytes, set[uuid.UUID]] = {}
    prefix = f"{job_id}/".encode()

    def read_to_end() -> bool:
        for message in consumer.consume(1000, 0.5):
            key = message.key()
            if message.error() is None and key and key.startswith(prefix):
                request = schemas.decode(message.value() or b"", InferenceRequest)
                found.setdefault(key, set()).add(request.request_id)
        # The position steps over transaction markers (negative before a partition's first
        # record, which an empty partition never yields).
        positions = consumer.position(consumer.assignment())
        return all(max(tp.offset, 0) >= ends[tp.partition] for tp in positions)

    try:
        wait_until(read_to_end, 60, "the batch topic read to its end", poll_s=0)
    finally:
        consumer.close()
    return found


def test_outsider_requests_results_and_letters_with_a_jobs_keys_change_nothing(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tuned = settings.model_copy(
        update={
            "batch": BatchSettings(chunk_records=50, max_outstanding=4_000, progress_interval_s=0.5)
        }
    )
    prepare_topics_and_bucket(tuned, [MODEL])
    store = JobStore(tuned)
    topics = ModelTopics(tuned.namespace, MODEL)
    path = write_example(tmp_path / "invoices.jsonl", ROWS, BatchInputFormat.JSONL)
    submission = submit(tuned, store, str(path), MODEL)
    assert submission.validation.ok, submission.validation.summary()
    job_id = submission.job.job_id
    records = list(invoice_records(ROWS))
    custom_ids = [str(record["custom_id"]) for record in records]

    # 1. Before the runner: requests of the outsider's own inputs under the job's keys. The
    # worker (started last) serves them first, so their results come before the real ones.
    forged_requests = [
        InferenceRequest(
            request_id=uuid.uuid4(),
            model=MODEL,
            inputs=Inputs(
                features={
                    **{k: v for k, v in record.items() if k not in ("custom_id", "explain")},
                    "amount_eur": 1e7,
                }
            ),
            batch_job_id=job_id,
            custom_id=str(record["custom_id"]),
        )
        for record in records[:50]
    ]
    publish(
        tuned,
        topics.batch,
        (
            (message_key(job_id, request.custom_id or ""), schemas.encode(request))
            for request in forged_requests
        ),
    )

    caplog.set_level(logging.INFO, logger="workers.batch.runner")
    finished: list[BatchJob] = []
    failures: list[BaseException] = []

    def run_job() -> None:
        try:
            finished.append(JobRunner(tuned, store).run(job_id))
        except BaseException as error:  # handed to the test thread
            failures.append(error)

    runner = threading.Thread(target=run_job, daemon=True)
    runner.start()
    wait_until(
        lambda: failures or len(_published_keys(tuned, job_id)) >= ROWS + len(forged_requests),
        120,
        "the runner to publish every record",
        poll_s=0.5,
    )
    assert failures == []

    # 2. After the runner's checkpoint, before any real outcome: results and dead letters
    # with the job's keys and the request ids a runner without job keys would have used.
    public_ids = {cid: request_id(job_id, cid, None) for cid in custom_ids}
    publish(
        tuned,
        topics.results,
        (
            (message_key(job_id, cid), _forged_result(public_ids[cid], job_id, cid))
            for cid in custom_ids[50:100]
        ),
    )
    publish(
        tuned,
        topics.dlq,
        (
            (message_key(job_id, cid), _forged_letter(str(public_ids[cid])))
            for cid in custom_ids[100:150]
        ),
    )

    # 3. Only now the real worker.
    worker = ServiceProcess(tuned, ["worker", "--model", MODEL], tmp_path / "worker.log")
    with worker:
        wait_until(lambda: not runner.is_alive(), 300, "the job to finish", poll_s=0.5)
    assert failures == []
    (done,) = finished

    assert done.status is BatchJobStatus.COMPLETED, worker.tail()
    assert (done.counts.completed, done.counts.failed) == (ROWS, 0)
    results = _lines(store, done.output_uri)
    errors = _lines(store, done.error_uri)
    assert errors == []
    assert [line["custom_id"] for line in results] == custom_ids
    assert all(line["model_version"] == "1" for line in results), "a forged result counted"
    scores = np.array([line["outputs"]["score"][0][0] for line in results])  # type: ignore[index]
    assert np.all((scores > 0) & (scores < 1))
    # Every line answers the runner's own request for that record, nobody else's.
    forged_ids = {r.request_id for r in forged_requests} | set(public_ids.values())
    published = _runner_requests(tuned, job_id)
    for line in results:
        key = message_key(job_id, str(line["custom_id"]))
        (own,) = published[key] - forged_ids
        assert line["request_id"] == str(own)
    # 50 served outsider requests, 50 forged results, 50 forged letters: each one ignored.
    ignored = [r for r in caplog.records if "not one of its requests" in r.getMessage()]
    assert len(ignored) == 150
    assert any('forged_ignored="150"' in r.getMessage() for r in caplog.records)
