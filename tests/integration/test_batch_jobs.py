"""Bulk batch jobs end to end: real Kafka, MinIO, Triton and a real worker process.

Each test submits a file, runs the job (in this process, or as `sluiceway batch run` in its
own process where it gets killed), and checks the output files against the input: one line
per custom id across results.jsonl and errors.jsonl, in input order.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import TopicPartition

from devkit.demo.examples import invoice_records, write_example
from pipeline.batchjobs.store import JobStore
from pipeline.batchjobs.submit import submit
from pipeline.kafka import clients
from pipeline.kafka.admin import end_offsets
from pipeline.kafka.clients import ConsumerRole
from pipeline.settings import BatchSettings, Settings
from pipeline.storage.client import make_client
from pipeline.topics import ModelTopics
from schemas.models import (
    BatchInputFormat,
    BatchJob,
    BatchJobStatus,
)
from sluiceway import main as cli_main
from tests.integration.traffic import latency_summary, realtime_latencies
from tests.integration.waiting import wait_until
from workers.batch.runner import JobRunner
from workers.inference.runner import prepare_topics_and_bucket
from workers.processes import ServiceProcess

MODEL = "invoice_risk"


@dataclass
class Scene:
    settings: Settings
    store: JobStore
    logs: Path
    worker: ServiceProcess


@pytest.fixture
def scene(settings: Settings, tmp_path: Path) -> Iterator[Scene]:
    tuned = settings.model_copy(
        update={
            "batch": BatchSettings(
                chunk_records=500, max_outstanding=4_000, progress_interval_s=0.5
            )
        }
    )
    prepare_topics_and_bucket(tuned, [MODEL])
    worker = ServiceProcess(tuned, ["worker", "--model", MODEL], tmp_path / "worker.log")
    with worker:
        yield Scene(tuned, JobStore(tuned), tmp_path, worker)


def _lines(store: JobStore, uri: str | None) -> list[dict[str, object]]:
    assert uri is not None
    body = b"".join(store.stream(uri))
    return [json.loads(line) for line in body.splitlines()]


def _outputs(
    scene: Scene, job: BatchJob
) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    return _lines(scene.store, job.output_uri), _lines(scene.store, job.error_uri)


def _assert_one_line_per_custom_id_in_order(
    expected_ids: list[str], results: list[dict[str, object]], errors: list[dict[str, object]]
) -> None:
    position = {custom_id: index for index, custom_id in enumerate(expected_ids)}
    result_ids = [str(line["custom_id"]) for line in results]
    error_ids = [str(line["custom_id"]) for line in errors]
    assert sorted(result_ids + error_ids, key=position.__getitem__) == expected_ids
    assert result_ids == sorted(result_ids, key=position.__getitem__), "results out of order"
    assert error_ids == sorted(error_ids, key=position.__getitem__), "errors out of order"


def _published_keys(settings: Settings, job_id: str) -> list[bytes]:
    """Every committed record of the job on the batch topic (what the worker could see)."""
    topic = ModelTopics(settings.namespace, MODEL).batch
    ends = end_offsets(settings.kafka, topic)
    consumer = clients.consumer(
        settings.kafka, group_id=f"audit-{uuid.uuid4().hex[:6]}", role=ConsumerRole.READER
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in ends])
    keys: list[bytes] = []
    prefix = f"{job_id}/".encode()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for message in consumer.consume(1000, 0.5):
                key = message.key()
                if message.error() is None and key and key.startswith(prefix):
                    keys.append(key)
            # The position steps over transaction markers; it is negative until a partition
            # yields a record, which an empty partition never does.
            positions = consumer.position(consumer.assignment())
            if all(max(tp.offset, 0) >= ends[tp.partition] for tp in positions):
                return keys
        raise AssertionError("could not read the batch topic to its end")
    finally:
        consumer.close()


def _submit(scene: Scene, path: Path, **options: object) -> BatchJob:
    submission = submit(scene.settings, scene.store, str(path), MODEL, **options)  # type: ignore[arg-type]
    assert submission.validation.ok, submission.validation.summary()
    assert submission.job.status is BatchJobStatus.VALIDATING
    return submission.job


def _answered(scene: Scene, job_id: str) -> int:
    job = scene.store.load(job_id)
    return job.counts.completed + job.counts.failed


# ------------------------------------------------------------------ tests


def test_jsonl_job_of_100k_records_completes_in_input_order(scene: Scene, tmp_path: Path) -> None:
    rows = 100_000
    path = write_example(
        tmp_path / "invoices.jsonl", rows, BatchInputFormat.JSONL, explain_every=97
    )
    job = _submit(scene, path)
    assert job.counts.total == rows

    done = JobRunner(scene.settings).run(job.job_id)

    assert done.status is BatchJobStatus.COMPLETED, scene.worker.tail()
    assert (done.counts.total, done.counts.completed, done.counts.failed) == (rows, rows, 0)
    assert done.started_at is not None
    assert done.finalizing_at is not None
    assert done.finished_at is not None
    results, errors = _outputs(scene, done)
    expected = [str(r["custom_id"]) for r in invoice_records(rows, explain_every=97)]
    _assert_one_line_per_custom_id_in_order(expected, results, errors)
    assert errors == []
    asked = {str(r["custom_id"]) for r in invoice_records(rows, explain_every=97) if r["explain"]}
    explained = {str(line["custom_id"]) for line in results if "explanation" in line}
    assert explained == asked
    scores = np.array([line["outputs"]["score"][0][0] for line in results])  # type: ignore[index]
    assert np.all((scores > 0) & (scores < 1))
    assert all(line["status"] == "ok" and line["model_version"] == "1" for line in results)
    # The runner published each record exactly once.
    keys = _published_keys(scene.settings, done.job_id)
    assert len(keys) == rows
    assert len(set(keys)) == rows


def test_parquet_job_with_a_pinned_version_and_generated_ids(scene: Scene, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = 3_000
    records = list(invoice_records(rows))
    for record in records[::3]:
        record["custom_id"] = None  # every third row: the id comes from its row number
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "invoices.parquet")
    job = _submit(scene, tmp_path / "invoices.parquet", model_version="2")
    assert job.attributes["sluiceway.generated_custom_ids"] == str(rows // 3)

    done = JobRunner(scene.settings).run(job.job_id)

    assert done.status is BatchJobStatus.COMPLETED
    results, errors = _outputs(scene, done)
    expected = [str(r["custom_id"] or f"line-{n}") for n, r in enumerate(records, start=1)]
    _assert_one_line_per_custom_id_in_order(expected, results, errors)
    assert {line["model_version"] for line in results} == {"2"}


def test_records_invalid_under_the_runners_settings_land_in_errors_in_order(
    scene: Scene, tmp_path: Path
) -> None:
    rows = 2_000
    path = write_example(tmp_path / "invoices.jsonl", rows, BatchInputFormat.JSONL)
    job = _submit(scene, path)
    sizes = sorted(len(line) for line in path.read_bytes().splitlines(keepends=True))
    limit = sizes[rows // 2]
    # The operator lowered the record limit after this job was accepted.
    stricter = scene.settings.model_copy(
        update={"batch": scene.settings.batch.model_copy(update={"max_record_bytes": limit})}
    )

    done = JobRunner(stricter).run(job.job_id)

    assert done.status is BatchJobStatus.COMPLETED
    results, errors = _outputs(scene, done)
    expected = [str(r["custom_id"]) for r in invoice_records(rows)]
    _assert_one_line_per_custom_id_in_order(expected, results, errors)
    too_large = sum(1 for size in sizes if size > limit)
    assert len(errors) == done.counts.failed == too_large > 0
    assert {(line["status"], line["error_code"]) for line in errors} == {("rejected", "too_large")}
    assert len(results) == done.counts.completed == rows - too_large


def test_cli_submits_from_the_object_store_and_shows_status_list_and_results(
    scene: Scene,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in scene.settings.as_environment().items():
        monkeypatch.setenv(name, value)
    rows = 1_200
    local = write_example(tmp_path / "invoices.csv", rows, BatchInputFormat.CSV, explain_every=10)
    source_key = f"uploads/{uuid.uuid4().hex[:8]}/invoices.csv"
    make_client(scene.settings.object_store).fput_object(
        scene.settings.object_store.bucket, source_key, str(local)
    )
    source = f"s3://{scene.settings.object_store.bucket}/{source_key}"

    assert cli_main(["batch", "submit", source, "--model", MODEL, "--wait"]) == 0
    job_id = capsys.readouterr().out.splitlines()[0]
    assert cli_main(["batch", "status", job_id]) == 0
    status = capsys.readouterr().out
    assert f"{job_id}  completed" in status
    assert f"{rows}/{rows}  ok {rows}  failed 0" in status
    assert cli_main(["batch", "list"]) == 0
    assert job_id in capsys.readouterr().out
    assert cli_main(["batch", "results", job_id, "-o", str(tmp_path / "results.jsonl")]) == 0
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["custom_id"] for line in lines] == [
        r["custom_id"] for r in invoice_records(rows)
    ]
    capsys.readouterr()
    assert cli_main(["batch", "results", job_id, "--errors"]) == 0
    assert capsys.readouterr().out == ""
    job = scene.store.load(job_id)
    assert job.input_uri == scene.store.uri(job_id, "input.csv")


def test_killed_runner_and_worker_resume_without_publishing_twice(
    scene: Scene, tmp_path: Path
) -> None:
    rows = 15_000
    path = write_example(tmp_path / "invoices.csv", rows, BatchInputFormat.CSV)
    job = _submit(scene, path)
    runner = ServiceProcess(scene.settings, ["batch", "run", job.job_id], tmp_path / "runner.log")
    with runner:
        wait_until(lambda: _answered(scene, job.job_id) >= 2_000, 120, "first answers")
        runner.stop(signal.SIGKILL)
        scene.worker.restart(signal.SIGKILL)
        interrupted = scene.store.load(job.job_id)
        assert interrupted.status is BatchJobStatus.IN_PROGRESS
        runner.start()
        wait_until(runner.exited, 300, "the resumed runner to finish")
    assert runner.process is not None
    assert runner.process.returncode == 0, runner.tail()

    done = scene.store.load(job.job_id)
    assert done.status is BatchJobStatus.COMPLETED, runner.tail()
    assert (done.counts.completed, done.counts.failed) == (rows, 0)
    results, errors = _outputs(scene, done)
    expected = [str(r["custom_id"]) for r in invoice_records(rows)]
    _assert_one_line_per_custom_id_in_order(expected, results, errors)
    keys = _published_keys(scene.settings, job.job_id)
    assert len(keys) == rows, f"{len(keys) - len(set(keys))} records published twice"
    assert len(set(keys)) == rows


def test_cancel_stops_publishing_and_finalizes_with_partial_results(
    scene: Scene, tmp_path: Path
) -> None:
    rows = 40_000
    path = write_example(tmp_path / "invoices.avro", rows, BatchInputFormat.AVRO)
    job = _submit(scene, path)
    runner = ServiceProcess(scene.settings, ["batch", "run", job.job_id], tmp_path / "runner.log")
    with runner:
        wait_until(lambda: _answered(scene, job.job_id) >= 1_000, 120, "first answers")
        assert cli_main(["batch", "cancel", job.job_id, "--wait"]) == 0
        wait_until(runner.exited, 120, "the runner to finish the cancelled job")

    done = scene.store.load(job.job_id)
    assert done.status is BatchJobStatus.CANCELLED, runner.tail()
    results, errors = _outputs(scene, done)
    expected = [str(r["custom_id"]) for r in invoice_records(rows)]
    _assert_one_line_per_custom_id_in_order(expected, results, errors)
    assert len(results) == done.counts.completed >= 1_000
    cancelled = [line for line in errors if line["status"] == "cancelled"]
    assert len(cancelled) == len(errors) == done.counts.failed > 0
    published = _published_keys(scene.settings, job.job_id)
    assert len(published) < rows
    # Everything published before the cancel still got its answer (in-flight finished).
    assert len(results) == len(published)


def test_a_job_past_its_completion_window_expires_with_every_record_named(
    scene: Scene, tmp_path: Path
) -> None:
    rows = 500
    brief = scene.settings.model_copy(
        update={"batch": scene.settings.batch.model_copy(update={"completion_window_s": 0.5})}
    )
    path = write_example(tmp_path / "invoices.jsonl", rows, BatchInputFormat.JSONL)
    submission = submit(brief, scene.store, str(path), MODEL)
    expires_at = submission.job.expires_at
    assert expires_at is not None
    wait_until(lambda: datetime.now(UTC) > expires_at, 10, "the completion window to end")

    done = JobRunner(brief).run(submission.job.job_id)

    assert done.status is BatchJobStatus.EXPIRED
    assert (done.counts.completed, done.counts.failed) == (0, rows)
    results, errors = _outputs(scene, done)
    expected = [str(r["custom_id"]) for r in invoice_records(rows)]
    _assert_one_line_per_custom_id_in_order(expected, results, errors)
    assert {line["status"] for line in errors} == {"expired"}
    assert _published_keys(scene.settings, done.job_id) == []


def test_real_time_traffic_is_served_while_a_large_batch_job_flows(
    scene: Scene, tmp_path: Path
) -> None:
    """Outcomes only: every real-time request is answered while the job keeps flowing. How
    its latency compares with real-time traffic alone is a benchmark's question
    (benchmarks/bench_batch_beside_realtime.py), not a test's."""
    count, rate = 1_000, 50.0
    alone = realtime_latencies(scene.settings, MODEL, count, rate)
    path = write_example(tmp_path / "big.jsonl", 200_000, BatchInputFormat.JSONL)
    job = _submit(scene, path)
    runner = ServiceProcess(scene.settings, ["batch", "run", job.job_id], tmp_path / "runner.log")
    with runner:
        wait_until(lambda: _answered(scene, job.job_id) >= 2_000, 120, "the batch job to flow")
        answered_before = _answered(scene, job.job_id)
        beside = realtime_latencies(scene.settings, MODEL, count, rate)
        answered_after = _answered(scene, job.job_id)
        scene.store.request_cancel(job.job_id, "test over")
        wait_until(runner.exited, 120, "the runner to stop")
    print(f"\nreal-time latency alone: {latency_summary(alone)}")
    print(f"beside the batch job: {latency_summary(beside)}")
    print(f"batch records answered meanwhile: {answered_after - answered_before}")
    # Every real-time request got its result (realtime_latencies raises otherwise), and the
    # batch job was answered during the measurement, not parked behind it.
    assert len(alone) == len(beside) == count
    assert answered_after > answered_before
