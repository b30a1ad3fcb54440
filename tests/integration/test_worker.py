"""The inference worker against the real Kafka, MinIO and Triton, run as a real process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from confluent_kafka import KafkaException

import schemas
from devkit.demo.examples import invoice_records
from devkit.modeling.invoices import FEATURES as INVOICE_RISK_FEATURES
from devkit.settings import load_local_settings
from devkit.stack import manager
from devkit.stack.services import MinioService, TritonService
from pipeline.kafka import clients
from pipeline.kafka.admin import control_topic_spec, ensure_topics, model_topic_specs
from pipeline.settings import Settings
from pipeline.storage.client import ensure_bucket, make_client
from pipeline.topics import ModelTopics
from schemas.models import InferenceRequest, Inputs, ResultStatus
from tests.integration import traffic
from tests.integration.endpoints import Endpoints
from tests.integration.waiting import wait_for
from workers.inference.worker import worker_group_id

GROUP = "{namespace}.worker.scaler"


@pytest.fixture
def topics(settings: Settings) -> ModelTopics:
    model_topics = ModelTopics(settings.namespace, "scaler")
    ensure_topics(
        settings.kafka,
        [control_topic_spec(settings.namespace), *model_topic_specs(model_topics)],
    )
    ensure_bucket(make_client(settings.object_store), settings.object_store.bucket)
    return model_topics


class Workers:
    """Worker subprocesses of one test; every one is stopped at the end."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, models: Sequence[str] = ("scaler",), **env: str) -> subprocess.Popen[bytes]:
        """One worker process (no supervisor): these tests signal it and read its memory."""
        log = self.log_dir / f"worker-{len(self.processes)}.log"
        env = {"SLUICEWAY_WORKERS__PROCESSES": "1", **env}
        process = traffic.start_worker(self.settings, log, models, **env)
        self.processes.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> int:
        process.send_signal(signal.SIGTERM)
        return process.wait(60)

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait(30)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in self.log_dir.glob("*.log"))


@pytest.fixture
def workers(settings: Settings, tmp_path: Path) -> Iterator[Workers]:
    running = Workers(settings, tmp_path)
    yield running
    running.close()


def _assert_stored(settings: Settings, results: list[schemas.InferenceResult]) -> None:
    store = make_client(settings.object_store)
    keys = {r.payload_ref.key for r in results if r.payload_ref is not None}
    for key in keys:
        assert store.stat_object(settings.object_store.bucket, key).size > 0
    sample = next(r for r in results if r.payload_ref is not None)
    ref = sample.payload_ref
    assert ref is not None
    body = store.get_object(ref.bucket, ref.key, offset=ref.offset, length=ref.length)
    try:
        assert str(sample.request_id) in body.read().decode()
    finally:
        body.close()
        body.release_conn()


def test_every_request_gets_exactly_one_result_and_offsets_are_committed(
    settings: Settings, topics: ModelTopics, workers: Workers
) -> None:
    count = 10_000
    requests = [traffic.scaler_request(i) for i in range(count)]
    traffic.publish_requests(settings, topics.requests, requests)
    worker = workers.start()

    got = traffic.collect(settings, topics.results, topics.dlq, count, timeout_s=120)
    assert workers.stop(worker) == 0, workers.logs()

    per_request = Counter(str(r.request_id) for r in got.results)
    assert set(per_request) == {str(r.request_id) for r in requests}
    assert max(per_request.values()) == 1
    assert got.dead_letters == []
    assert {r.status for r in got.results} == {ResultStatus.OK}
    by_id = {str(r.request_id): r for r in got.results}
    first = by_id[str(requests[7].request_id)]
    assert first.model_version == "1"
    assert first.outputs is not None
    assert first.outputs.tensors is not None
    _assert_stored(settings, got.results)
    group = GROUP.format(namespace=settings.namespace)
    assert traffic.committed_offsets(settings, group, topics.requests, 3) == traffic.end_offsets(
        settings, topics.requests
    )


SMALL_MESSAGE_LIMIT = 64 * 1024


def _poison_values() -> dict[str, bytes]:
    wrong_model = InferenceRequest(
        request_id=traffic.scaler_request(0).request_id,
        model="fraud",
        inputs=Inputs(features={"f0": 1.0}),
    )
    missing_feature = InferenceRequest(
        request_id=traffic.scaler_request(0).request_id,
        model="scaler",
        inputs=Inputs(features={"f0": 1.0, "f1": 2.0}),
    )
    return {
        "random_bytes": os.urandom(64),
        "truncated": schemas.encode(traffic.scaler_request(1))[:-7],
        "unknown_model": schemas.encode(wrong_model),
        "missing_feature": schemas.encode(missing_feature),
        "oversized": b"\xc3\x01" + b"x" * (SMALL_MESSAGE_LIMIT + 10),
    }


def test_poison_messages_go_to_the_dlq_with_reasons_and_good_ones_are_served(
    settings: Settings, topics: ModelTopics, workers: Workers
) -> None:
    poison = _poison_values()
    good = [traffic.scaler_request(i) for i in range(300)]
    values: list[tuple[bytes | None, bytes]] = []
    for index, request in enumerate(good):
        values.append((str(index).encode(), schemas.encode(request)))
        if index % 60 == 0:
            for name, value in poison.items():
                values.append((name.encode(), value))
    traffic.publish(settings, topics.requests, values)
    poison_count = len(values) - len(good)
    worker = workers.start(SLUICEWAY_WORKERS__MAX_MESSAGE_BYTES=str(SMALL_MESSAGE_LIMIT))

    got = traffic.collect(settings, topics.results, topics.dlq, len(values), timeout_s=90)
    assert workers.stop(worker) == 0, workers.logs()

    assert sorted(str(r.request_id) for r in got.results) == sorted(str(r.request_id) for r in good)
    assert len(got.dead_letters) == poison_count
    reasons = Counter(
        (letter.original_key or b"").decode() + "->" + letter.reason_code
        for letter in got.dead_letters
    )
    assert reasons == {
        "random_bytes->bad_marker": 5,
        "truncated->truncated": 5,
        "unknown_model->unknown_model": 5,
        "missing_feature->missing_feature": 5,
        "oversized->too_large": 5,
    }
    # The dead letter keeps the original bytes, so nothing is lost.
    letter = next(x for x in got.dead_letters if x.reason_code == "truncated")
    assert letter.original_value == poison["truncated"]
    # No partition stalls: every offset of the request topic is committed.
    group = GROUP.format(namespace=settings.namespace)
    assert traffic.committed_offsets(settings, group, topics.requests, 3) == traffic.end_offsets(
        settings, topics.requests
    )


SLOW_WORKER = {
    # Small batches, one at a time: slow enough that "mid-stream" is a real moment.
    "SLUICEWAY_WORKERS__MAX_BATCH_SIZE": "8",
    "SLUICEWAY_WORKERS__MAX_IN_FLIGHT_BATCHES": "1",
}


@pytest.mark.parametrize("exactly_once", [False, True], ids=["at-least-once", "exactly-once"])
def test_sigkill_mid_stream_then_restart_loses_nothing(
    settings: Settings, topics: ModelTopics, workers: Workers, exactly_once: bool
) -> None:
    count = 6000
    requests = [traffic.scaler_request(i) for i in range(count)]
    traffic.publish_requests(settings, topics.requests, requests)
    env = {**SLOW_WORKER, "SLUICEWAY_WORKERS__WORKER_ID": "restartable"}
    if exactly_once:
        env["SLUICEWAY_WORKERS__EXACTLY_ONCE"] = "true"
    first = workers.start(**env)
    # Mid-stream: some results are out (committed or not), most are not.
    traffic.collect(settings, topics.results, topics.dlq, 800, timeout_s=60, read_committed=False)
    first.send_signal(signal.SIGKILL)
    assert first.wait(30) == -signal.SIGKILL

    second = workers.start(**{k: v for k, v in env.items() if k not in SLOW_WORKER})
    got = traffic.collect(settings, topics.results, topics.dlq, count, timeout_s=120)
    assert workers.stop(second) == 0, workers.logs()

    per_request = Counter(str(r.request_id) for r in got.results)
    assert set(per_request) == {str(r.request_id) for r in requests}, workers.logs()
    duplicates = sum(n - 1 for n in per_request.values())
    print(f"exactly_once={exactly_once} duplicates={duplicates} of {count}")
    if exactly_once:
        assert duplicates == 0
    assert got.dead_letters == []


def _metric_lines(port: int, name: str) -> list[float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return [
            float(line.rsplit(" ", 1)[1])
            for line in response.read().decode().splitlines()
            if line.startswith(name) and not line.startswith("#")
        ]


def _metric(port: int, name: str) -> float:
    values = _metric_lines(port, name)
    if not values:
        raise AssertionError(f"metric {name} not exposed")
    return values[0]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _serving_worker_with_metrics(
    settings: Settings, topics: ModelTopics, workers: Workers, warm_up: int
) -> tuple[subprocess.Popen[bytes], int, list[InferenceRequest]]:
    """A worker with /metrics on a free port and 1,000 in-flight records at most, which has
    served ``warm_up`` requests (returned), so it is assigned and warm before an outage."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    worker = workers.start(
        SLUICEWAY_WORKERS__METRICS_PORT=str(metrics_port),
        SLUICEWAY_WORKERS__MAX_IN_FLIGHT_RECORDS="1000",
    )
    before = [traffic.scaler_request(i) for i in range(warm_up)]
    traffic.publish_requests(settings, topics.requests, before)
    traffic.collect(settings, topics.results, topics.dlq, len(before), timeout_s=60)
    return worker, metrics_port, before


def test_object_store_outage_saturates_then_pauses_and_recovers_without_dlq(
    settings: Settings, topics: ModelTopics, workers: Workers, endpoints: Endpoints
) -> None:
    """Segment PUTs fail while MinIO is down: the worker stops taking records at its in-flight
    limit, pauses its partitions once saturated for long (and keeps polling), and serves
    everything once MinIO is back."""
    if endpoints.source != "native stack":
        pytest.fail("the outage test stops and restarts the native stack's MinIO")
    worker, metrics_port, _ = _serving_worker_with_metrics(settings, topics, workers, 500)

    minio = MinioService(load_local_settings())
    assert minio.process.stop()
    try:
        during = [traffic.scaler_request(i) for i in range(4000)]
        traffic.publish_requests(settings, topics.requests, during)

        def every_partition_paused() -> bool:
            # Only saturation pauses the request partitions here (the breaker stays closed:
            # Triton answers), and then every assigned partition pauses.
            assigned = len(_metric_lines(metrics_port, "sluiceway_consumer_lag{"))
            paused = _metric(metrics_port, "sluiceway_paused_partitions")
            return assigned > 0 and paused == assigned

        wait_for(every_partition_paused, 60, "every partition to pause after 5 s saturated")
        in_flight_paused = _metric(metrics_port, "sluiceway_in_flight")
    finally:
        manager.up(load_local_settings(), progress=lambda _line: None)

    got = traffic.collect(settings, topics.results, topics.dlq, 4500, timeout_s=120)
    # At most one fetch beyond the limit: a saturated worker stops taking records.
    assert 1000 <= in_flight_paused < 1000 + 500
    assert got.dead_letters == []
    assert len({r.request_id for r in got.results}) == 4500
    wait_for(
        lambda: _metric(metrics_port, "sluiceway_paused_partitions") == 0,
        30,
        "partitions to resume",
    )
    assert workers.stop(worker) == 0, workers.logs()


def test_triton_outage_opens_the_breaker_pauses_and_recovers_without_dlq(
    settings: Settings, topics: ModelTopics, workers: Workers, endpoints: Endpoints
) -> None:
    if endpoints.source != "native stack":
        pytest.fail("the outage test stops and restarts the native stack's Triton")
    worker, metrics_port, before = _serving_worker_with_metrics(settings, topics, workers, 1000)

    triton = TritonService(load_local_settings())
    assert triton.process.stop()
    try:
        during = [traffic.scaler_request(i) for i in range(5000)]
        traffic.publish_requests(settings, topics.requests, during)
        wait_for(
            lambda: _metric(metrics_port, "sluiceway_breaker_state{") == 2.0,
            60,
            "the breaker to open",
        )
        wait_for(
            lambda: _metric(metrics_port, "sluiceway_paused_partitions") > 0,
            30,
            "partitions to pause",
        )
        rss_open = _rss_kib(worker.pid)
        in_flight_peak = 0.0
        outage_end = time.monotonic() + 30
        while time.monotonic() < outage_end:
            in_flight_peak = max(in_flight_peak, _metric(metrics_port, "sluiceway_in_flight"))
            traffic.collect(settings, topics.results, topics.dlq, 1, timeout_s=2)
        rss_late = _rss_kib(worker.pid)
        lag_during = sum(_metric_lines(metrics_port, "sluiceway_consumer_lag{"))
    finally:
        manager.up(load_local_settings(), progress=lambda _line: None)

    got = traffic.collect(settings, topics.results, topics.dlq, 6000, timeout_s=120)
    # The paused partitions' backlog showed as lag, and it is gone once everything is served.
    assert lag_during >= 5000 - 1500
    lag_after: list[float] = []

    def lag_is_zero() -> bool:
        lag_after[:] = _metric_lines(metrics_port, "sluiceway_consumer_lag{")
        return sum(lag_after) == 0

    try:
        wait_for(lag_is_zero, 60, "the consumer lag to reach zero")
    except AssertionError as error:
        raise AssertionError(f"{error}; lag per partition {lag_after}\n{workers.logs()}") from None
    assert workers.stop(worker) == 0, workers.logs()
    served = {str(r.request_id) for r in got.results}
    assert served == {str(r.request_id) for r in before + during}
    assert got.dead_letters == []
    # Bounded: consumption stopped at the in-flight limit and memory did not keep growing.
    assert in_flight_peak <= 1000 + 500  # the limit plus at most one fetch
    assert rss_late - rss_open < 50 * 1024


def test_workers_joining_and_leaving_mid_stream_lose_nothing(
    settings: Settings, topics: ModelTopics, workers: Workers
) -> None:
    count = 8000
    requests = [traffic.scaler_request(i) for i in range(count)]
    first, _second = workers.start(**SLOW_WORKER), workers.start(**SLOW_WORKER)
    traffic.publish_requests(settings, topics.requests, requests)
    traffic.collect(settings, topics.results, topics.dlq, 1500, timeout_s=60)
    workers.start(**SLOW_WORKER)
    traffic.collect(settings, topics.results, topics.dlq, 3000, timeout_s=60)
    assert workers.stop(first) == 0, workers.logs()

    got = traffic.collect(settings, topics.results, topics.dlq, count, timeout_s=180)
    per_request = Counter(str(r.request_id) for r in got.results)
    assert set(per_request) == {str(r.request_id) for r in requests}, workers.logs()
    print(f"duplicates after two rebalances: {sum(n - 1 for n in per_request.values())}")
    assert got.dead_letters == []


def test_expired_requests_are_answered_expired_and_never_served(
    settings: Settings, topics: ModelTopics, workers: Workers
) -> None:
    from datetime import UTC, datetime, timedelta

    late = [
        traffic.scaler_request(i, deadline=datetime.now(UTC) - timedelta(seconds=1))
        for i in range(20)
    ]
    timely = [
        traffic.scaler_request(i, deadline=datetime.now(UTC) + timedelta(minutes=5))
        for i in range(20)
    ]
    traffic.publish_requests(settings, topics.requests, late + timely)
    worker = workers.start()
    got = traffic.collect(settings, topics.results, topics.dlq, 40, timeout_s=60)
    assert workers.stop(worker) == 0, workers.logs()

    status = {str(r.request_id): r.status for r in got.results}
    assert {status[str(r.request_id)] for r in late} == {ResultStatus.EXPIRED}
    assert {status[str(r.request_id)] for r in timely} == {ResultStatus.OK}
    expired = [r for r in got.results if r.status is ResultStatus.EXPIRED]
    assert all(r.payload_ref is None and r.error_code == "deadline_exceeded" for r in expired)


def test_workers_serving_overlapping_models_share_one_group_per_model(
    settings: Settings, topics: ModelTopics, workers: Workers
) -> None:
    """``--model invoice_risk --model scaler`` and ``--model invoice_risk`` share the load of
    invoice_risk (one consumer group per model): every request served once, by both."""
    invoices = ModelTopics(settings.namespace, "invoice_risk")
    ensure_topics(settings.kafka, model_topic_specs(invoices))
    both = workers.start(["invoice_risk", "scaler"], SLUICEWAY_WORKERS__WORKER_ID="both")
    alone = workers.start(["invoice_risk"], SLUICEWAY_WORKERS__WORKER_ID="alone")
    group = worker_group_id(settings.namespace, "invoice_risk")
    admin = clients.admin(settings.kafka)

    def both_members_assigned() -> bool:
        described = admin.describe_consumer_groups([group], request_timeout=5)[group]
        try:
            members = described.result().members
        except KafkaException:
            return False
        return len(members) == 2 and all(m.assignment.topic_partitions for m in members)

    wait_for(both_members_assigned, 60, "both workers in the invoice_risk group")
    rows = list(invoice_records(3000))
    requests = [
        InferenceRequest(
            request_id=uuid.uuid4(),
            model="invoice_risk",
            inputs=Inputs(features={k: v for k, v in row.items() if k in INVOICE_RISK_FEATURES}),
        )
        for row in rows
    ]
    scaler_requests = [traffic.scaler_request(i) for i in range(500)]
    # Real-time and batch-job partitions alike: however the sticky assignor splits the six
    # partitions of the group, each worker holds some that carry traffic.
    traffic.publish_requests(settings, invoices.requests, requests[:2000])
    traffic.publish_requests(settings, invoices.batch, requests[2000:])
    traffic.publish_requests(settings, topics.requests, scaler_requests)

    got = traffic.collect(settings, invoices.results, invoices.dlq, len(requests), timeout_s=120)
    scaled = traffic.collect(settings, topics.results, topics.dlq, 500, timeout_s=60)
    assert workers.stop(alone) == 0, workers.logs()
    assert workers.stop(both) == 0, workers.logs()

    per_request = Counter(str(r.request_id) for r in got.results)
    assert set(per_request) == {str(r.request_id) for r in requests}
    assert max(per_request.values()) == 1, "an invoice served by both workers"
    by_worker = Counter(r.worker_id for r in got.results)
    assert set(by_worker) == {"both", "alone"}, by_worker
    assert {r.worker_id for r in scaled.results} == {"both"}
    assert len({str(r.request_id) for r in scaled.results}) == 500
    for topic in (invoices.requests, invoices.batch):
        committed = traffic.committed_offsets(settings, group, topic, 3)
        assert committed == traffic.end_offsets(settings, topic)
