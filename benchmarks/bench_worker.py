"""Worker throughput and CPU per request against its practical ceilings, in one run.

Run on the local stack (``sluiceway stack up`` first, or let this script do it)::

    .venv/bin/python benchmarks/bench_worker.py [--requests 50000] [--processes 1 2]

Figures, all measured in this process run on this machine (absolute numbers on shared
machines drift; the ratios are the result):

(a) ceiling: a direct async tritonclient load on the same model, same rows per request
    (``workers.max_batch_size``) and same concurrency (``workers.max_in_flight_batches``);
(b) ceiling: a Kafka pass-through: consume and decode the same requests and encode an outcome
    for each with the worker's own codec paths, produce them with the worker's client settings,
    no inference; with its CPU time (user + system, all threads) per message;
worker, N processes: ``sluiceway worker --processes N`` serving pre-published requests end to
    end (Avro decode, batching, Triton, segment objects in MinIO, results produced, offsets
    committed), for each N asked for, counted from the group's last rebalance (the members'
    joins at start); with the CPU time per request of the worker processes
    (supervisor and children, all threads) and of the stack's own processes (Kafka, MinIO,
    Triton) over the same stretch: on a machine with few cores the stack's share is what caps
    the scaling with N;
bulk alone: the same requests published to the model's batch-job topic, no real-time traffic,
    one worker process: records/s against the real-time full-load rate (one process);
naive: consume one record, call Triton with one row, produce, commit, repeat.
Then end-to-end latency (publish -> result consumed) at half the one-process worker's rate.

Targets (issue 19): worker CPU per request <= 2x the pass-through's CPU per message;
real-time >= 0.5x of (b); bulk alone >= 0.8x of real-time full load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_aio
from confluent_kafka import Consumer

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import schemas  # noqa: E402
from devkit.settings import load_local_settings  # noqa: E402
from devkit.stack import manager  # noqa: E402
from pipeline.kafka import clients  # noqa: E402
from pipeline.kafka.admin import (  # noqa: E402
    TopicSpec,
    control_topic_spec,
    ensure_topics,
    model_topic_specs,
)
from pipeline.kafka.clients import ConsumerRole, ProducerRole  # noqa: E402
from pipeline.settings import Settings  # noqa: E402
from pipeline.storage.client import ensure_bucket, make_client  # noqa: E402
from pipeline.topics import ModelTopics  # noqa: E402
from schemas.models import InferenceRequest, InferenceResult, Inputs, ResultStatus  # noqa: E402
from tests.integration.traffic import worker_env  # noqa: E402
from workers.inference import contracts  # noqa: E402

MODEL = "scaler"


def progress(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def make_requests(count: int) -> list[bytes]:
    rng = np.random.default_rng(1)
    values = rng.normal(100, 20, size=(count, 4))
    return [
        schemas.encode(
            InferenceRequest(
                request_id=uuid.uuid4(),
                model=MODEL,
                inputs=Inputs(features={f"f{i}": float(v) for i, v in enumerate(row)}),
            )
        )
        for row in values
    ]


def publish_all(settings: Settings, topic: str, values: list[bytes]) -> None:
    producer = clients.producer(settings.kafka, role=ProducerRole.FEED)
    for index, value in enumerate(values):
        while True:
            try:
                producer.produce(topic, value, key=str(index).encode())
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    producer.flush(60)


def consumer_for(settings: Settings, topic: str, group: str) -> Consumer:
    consumer = clients.consumer(
        settings.kafka,
        group_id=group,
        role=ConsumerRole.COMMITTED,
        # Large fetches: a benchmark loop should wait on the pipeline, not on small fetches.
        overrides={"fetch.max.bytes": 16 * 1024 * 1024},
    )
    consumer.subscribe([topic])
    return consumer


# ------------------------------------------------------------------- (a) Triton direct


async def triton_direct(settings: Settings, rows_total: int) -> float:
    batch = settings.workers.max_batch_size
    concurrency = settings.workers.max_in_flight_batches
    client = triton_aio.InferenceServerClient(settings.backends.triton.grpc_url)
    data = np.random.default_rng(2).normal(100, 20, size=(batch, 4)).astype(np.float32)
    calls = rows_total // batch
    next_call = 0

    async def lane() -> None:
        nonlocal next_call
        while next_call < calls:
            next_call += 1
            tensor = triton_aio.InferInput("x", [batch, 4], "FP32")
            tensor.set_data_from_numpy(data)
            await client.infer(MODEL, [tensor], model_version="1")

    try:
        await lane()  # warm-up call
        next_call = 0
        started = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        return calls * batch / (time.perf_counter() - started)
    finally:
        await client.close()


# ------------------------------------------------------------ (b) Kafka pass-through


@dataclass(frozen=True)
class Run:
    """One measured stretch: records per second and CPU seconds spent on it."""

    rate: float
    records: int
    cpu_s: float
    stack_cpu_s: float = 0.0
    wall_s: float = 0.0
    machine_busy_s: float = 0.0
    """CPU seconds every process on the machine used over the stretch (other tenants too)."""
    threads_s: dict[str, float] | None = None
    """The worker's CPU seconds by kind of thread."""

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / self.records * 1e6

    @property
    def stack_cpu_us(self) -> float:
        return self.stack_cpu_s / self.records * 1e6


def kafka_passthrough(settings: Settings, source: str, sink: str, count: int) -> Run:
    consumer = consumer_for(settings, source, f"bench-pass-{uuid.uuid4().hex[:6]}")
    # The worker's producer profile.
    producer = clients.producer(settings.kafka, role=ProducerRole.LOW_LATENCY)
    max_message_bytes = settings.workers.max_message_bytes
    done = 0
    started: float | None = None
    while done < count:
        messages = consumer.consume(500, 1.0)
        if messages and started is None:
            started = time.perf_counter()
            # user + system of this process, all threads (librdkafka's included)
            cpu_started = sum(os.times()[:2])
        for message in messages:
            if message.error() is not None:
                continue
            # The architecture's definition: decode and encode the same messages. With the
            # worker's own codec paths, so the ratio measures what the worker adds around them.
            request = contracts.decode_request(message.value() or b"", max_message_bytes)
            outcome = contracts.expired_result(request, model=MODEL, worker_id="passthrough")
            value, headers = contracts.encode_result(outcome)
            producer.produce(sink, value, key=message.key(), headers=headers)
            producer.poll(0)
            done += 1
    producer.flush(60)
    consumer.commit(asynchronous=False)
    took = time.perf_counter() - started if started is not None else 0.0
    cpu_s = sum(os.times()[:2]) - cpu_started
    consumer.close()
    assert started is not None
    return Run(count / took, count, cpu_s)


# ----------------------------------------------------------------------- worker


def _thread_kind(name: str) -> str:
    if name.startswith("rdk:"):
        return "librdkafka"
    if name.startswith(("grpc", "default-executo", "resolver-execut")):
        return "gRPC"
    return "Python (event loop, pools)"


def _ticks(stat: Path) -> int:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def thread_cpu(pid: int) -> dict[str, float]:
    """User + system CPU seconds of ``pid`` and its live descendants, by kind of thread;
    threads that already ended count under "ended threads"."""
    hertz = os.sysconf("SC_CLK_TCK")
    kinds: dict[str, float] = {}
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            total = _ticks(Path(f"/proc/{current}/stat"))
            for task in Path(f"/proc/{current}/task").iterdir():
                ticks = _ticks(task / "stat")
                total -= ticks
                kind = _thread_kind((task / "comm").read_text().strip())
                kinds[kind] = kinds.get(kind, 0.0) + ticks / hertz
                pending.extend(int(child) for child in (task / "children").read_text().split())
            kinds["ended threads"] = kinds.get("ended threads", 0.0) + total / hertz
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return kinds


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` (all its threads) and of its live descendants."""
    return sum(thread_cpu(pid).values())


def machine_busy_seconds() -> float:
    """CPU seconds all processes on this machine used since boot (not idle, not iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def last_assignment_s(log: Path) -> float:
    """When a worker process last logged a new assignment (epoch seconds; 0 if none)."""
    stamps = [
        time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000
        for line in log.read_text(errors="replace").splitlines()
        if 'logger="sluiceway.worker" assigned' in line
    ]
    return max(stamps, default=0.0)


def stack_pids(settings: Settings) -> list[int]:
    return [row.pid for row in manager.status(settings) if row.pid is not None]


def count_results(
    settings: Settings, topic: str, count: int, timeout_s: float, on_first: object = None
) -> list[int]:
    """Broker timestamps (ms) of the first ``count`` results; ``on_first()`` is called when
    the first results arrive."""
    consumer = consumer_for(settings, topic, f"bench-read-{uuid.uuid4().hex[:6]}")
    stamps: list[int] = []
    deadline = time.monotonic() + timeout_s
    last_report = time.monotonic()
    while len(stamps) < count and time.monotonic() < deadline:
        for message in consumer.consume(1000, 0.5):
            if message.error() is None:
                if not stamps and callable(on_first):
                    on_first()
                stamps.append(message.timestamp()[1])
        if time.monotonic() - last_report > 5:
            progress(f"  {len(stamps)}/{count} results")
            last_report = time.monotonic()
    consumer.close()
    if len(stamps) < count:
        raise RuntimeError(f"only {len(stamps)} of {count} results within {timeout_s}s")
    return stamps


def start_worker(settings: Settings, log: Path, processes: int = 1) -> subprocess.Popen[bytes]:
    with log.open("wb") as output:
        return subprocess.Popen(
            [
                *(sys.executable, "-m", "sluiceway", "worker", "--model", MODEL),
                *("--processes", str(processes)),
            ],
            cwd=REPO_ROOT,
            env=worker_env(settings),
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def worker_throughput(
    settings: Settings, topics: ModelTopics, count: int, log: Path, processes: int = 1
) -> Run:
    """The worker over ``count`` pre-published requests. CPU is counted from the first result
    to the last (start-up and the first batch excluded), for the worker and for the stack."""
    worker = start_worker(settings, log, processes)
    stack = stack_pids(settings)

    def sample() -> tuple[float, dict[str, float], float, float]:
        stack_s = sum(cpu_seconds(pid) for pid in stack)
        return time.time(), thread_cpu(worker.pid), stack_s, machine_busy_seconds()

    first: list[tuple[float, dict[str, float], float, float]] = []
    try:
        stamps = count_results(settings, topics.results, count, 600, lambda: first.append(sample()))
        last = sample()
    finally:
        worker.terminate()
        worker.wait(90)
    started, threads_before, stack_before, busy_before = first[0]
    ended, threads_after, stack_after, busy_after = last
    threads = {k: v - threads_before.get(k, 0.0) for k, v in threads_after.items()}
    # Results the broker stamped before the CPU baseline were paid for before it.
    measured = max(sum(1 for stamp in stamps if stamp > started * 1000), 1)
    # The rate counts from the last change of assignment: with N processes the members join
    # one after another, and each join revokes every partition (the range assignor is
    # eager) while the first member already serves. A steady group is what N should show.
    settled_ms = max(last_assignment_s(log) * 1000, min(stamps))
    steady = sorted(stamp for stamp in stamps if stamp >= settled_ms)
    if len(steady) < count // 4:
        progress(f"  only {len(steady)} results after the group settled: rate over all")
        steady = sorted(stamps)
    rate = len(steady) / max((steady[-1] - steady[0]) / 1000.0, 1e-3)
    return Run(
        rate,
        measured,
        sum(threads.values()),
        stack_after - stack_before,
        wall_s=ended - started,
        machine_busy_s=busy_after - busy_before,
        threads_s=threads,
    )


# ------------------------------------------------------------------------ naive


def naive_loop(settings: Settings, source: str, sink: str, count: int) -> float:
    consumer = consumer_for(settings, source, f"bench-naive-{uuid.uuid4().hex[:6]}")
    producer = clients.producer(settings.kafka, role=ProducerRole.FEED)
    client = triton_grpc.InferenceServerClient(settings.backends.triton.grpc_url)
    done = 0
    started: float | None = None
    while done < count:
        message = consumer.poll(1.0)
        if message is None or message.error() is not None:
            continue
        started = started or time.perf_counter()
        request = schemas.decode(message.value() or b"", InferenceRequest)
        features = request.inputs.features or {}
        row = np.array([[float(features[f"f{i}"] or 0.0) for i in range(4)]], dtype=np.float32)
        tensor = triton_grpc.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(row)
        client.infer(MODEL, [tensor], model_version="1")
        result = InferenceResult(request_id=request.request_id, status=ResultStatus.OK, model=MODEL)
        producer.produce(sink, schemas.encode(result), key=message.key())
        producer.flush(10)
        consumer.commit(message, asynchronous=False)
        done += 1
    client.close()
    consumer.close()
    assert started is not None
    return count / (time.perf_counter() - started)


# ---------------------------------------------------------------------- latency


def latency_at(
    settings: Settings, topics: ModelTopics, rate: float, seconds: float, log: Path
) -> list[float]:
    """Publish at ``rate`` req/s to a running worker; return publish->consume latencies (ms)."""
    worker = start_worker(settings, log)
    sent: dict[str, float] = {}
    received: dict[str, float] = {}
    reader = consumer_for(settings, topics.results, f"bench-lat-{uuid.uuid4().hex[:6]}")
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            first = reader.poll(0.2)
            for message in [first, *reader.consume(499, 0)] if first is not None else []:
                # Results carry their request's key (the request id here): no decoding, so
                # the reader takes as little CPU from the worker as it can.
                key = message.key()
                if message.error() is None and key is not None:
                    received[key.decode()] = time.perf_counter()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    try:
        warm = make_requests(200)
        publish_all(settings, topics.requests, warm)
        time.sleep(3)  # let the worker join its group and serve the warm-up before timing
        # Publishing as the SDK does (pipeline/client.py: linger 2 ms): with linger 0 every
        # request is a produce request of its own, and at thousands per second that load on
        # the broker (on the worker's 2 cores) measured the load generator, not the worker.
        producer = clients.producer(
            settings.kafka, role=ProducerRole.FEED, overrides={"linger.ms": 2}
        )
        total = int(rate * seconds)
        bodies = make_requests(total)
        ids = [str(schemas.decode(b, InferenceRequest).request_id) for b in bodies]
        started = time.perf_counter()
        for index, (request_id, body) in enumerate(zip(ids, bodies, strict=True)):
            target = started + index / rate
            while (now := time.perf_counter()) < target:
                time.sleep(min(target - now, 0.001))
            sent[request_id] = time.perf_counter()
            producer.produce(topics.requests, body, key=request_id.encode())
            producer.poll(0)
        producer.flush(30)
        deadline = time.monotonic() + 60
        while len(set(ids) & received.keys()) < total and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(5)
        reader.close()
        worker.terminate()
        worker.wait(60)
    return [(received[i] - sent[i]) * 1000 for i in ids if i in received]


def fresh_namespace(prefix: str) -> tuple[Settings, ModelTopics]:
    """Settings and topics of a namespace of its own: every worker run starts a new group."""
    settings = load_local_settings(namespace=f"{prefix}-{uuid.uuid4().hex[:6]}")
    topics = ModelTopics(settings.namespace, MODEL)
    ensure_topics(
        settings.kafka, [control_topic_spec(settings.namespace), *model_topic_specs(topics)]
    )
    return settings, topics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--naive-requests", type=int, default=1_000)
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    args = parser.parse_args()
    if 1 not in args.processes:
        parser.error("--processes must include 1 (the ratios are against one process)")

    base = load_local_settings()
    manager.up(base, progress=progress)
    settings, topics = fresh_namespace("bench")
    ensure_bucket(make_client(settings.object_store), settings.object_store.bucket)
    logs = REPO_ROOT / ".sluiceway" / "bench"
    logs.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1

    progress(f"encoding and publishing {args.requests} requests")
    bodies = make_requests(args.requests)
    publish_all(settings, topics.requests, bodies)

    progress("(a) direct async tritonclient load")
    ceiling_triton = asyncio.run(triton_direct(settings, args.requests))
    progress("(b) Kafka pass-through (consume, decode, encode, produce)")
    passthrough_sink = f"{settings.namespace}.passthrough"
    passthrough = kafka_passthrough(settings, topics.requests, passthrough_sink, args.requests)
    workers: dict[int, Run] = {}
    for processes in args.processes:
        progress(f"worker end to end, {processes} process(es)")
        run_settings, run_topics = (settings, topics) if not workers else fresh_namespace("bench")
        if workers:
            publish_all(run_settings, run_topics.requests, bodies)
        workers[processes] = worker_throughput(
            run_settings, run_topics, args.requests, logs / f"worker-{processes}.log", processes
        )
    progress("bulk alone: the same requests on the batch-job topic, one process")
    bulk_settings, bulk_topics = fresh_namespace("bench-bulk")
    publish_all(bulk_settings, bulk_topics.batch, bodies)
    bulk = worker_throughput(bulk_settings, bulk_topics, args.requests, logs / "bulk.log")
    progress(f"naive loop over {args.naive_requests} requests")
    naive_topic = f"{settings.namespace}.naive"
    ensure_topics(settings.kafka, [TopicSpec(naive_topic), TopicSpec(f"{naive_topic}.out")])
    publish_all(settings, naive_topic, bodies[: args.naive_requests])
    naive_rate = naive_loop(settings, naive_topic, f"{naive_topic}.out", args.naive_requests)
    one = workers[1]
    half = one.rate / 2
    progress(f"latency at half the worker's rate ({half:.0f} req/s for {args.latency_seconds}s)")
    latency_settings, latency_topics = fresh_namespace("bench-latency")
    latencies = latency_at(
        latency_settings, latency_topics, half, args.latency_seconds, logs / "latency.log"
    )

    ceiling_kafka = passthrough.rate
    ceiling = min(ceiling_triton, ceiling_kafka)
    bound = "Kafka pass-through (b)" if ceiling_kafka < ceiling_triton else "Triton direct (a)"
    quantiles = statistics.quantiles(latencies, n=100)
    print()
    print(f"{'figure':<44}{'rows or req/s':>14}{'CPU us/req':>12}{'stack us/req':>14}")
    print(f"{'(a) Triton direct, async, same batch':<44}{ceiling_triton:>14,.0f}")
    print(
        f"{'(b) Kafka pass-through, decode+encode':<44}{ceiling_kafka:>14,.0f}"
        f"{passthrough.cpu_us:>12.1f}"
    )
    for processes, run in workers.items():
        name = f"worker, {processes} process{'es' if processes > 1 else ''}"
        print(f"{name:<44}{run.rate:>14,.0f}{run.cpu_us:>12.1f}{run.stack_cpu_us:>14.1f}")
    print(f"{'bulk alone (batch-job topic), 1 process':<44}{bulk.rate:>14,.0f}{bulk.cpu_us:>12.1f}")
    print(f"{'naive consume-call-produce-commit loop':<44}{naive_rate:>14,.0f}")
    print(f"ceiling bound by: {bound}; worker vs naive {one.rate / naive_rate:.1f}x")
    print(
        f"latency at {half:,.0f} req/s: p50 {quantiles[49]:.1f} ms, p99 {quantiles[98]:.1f} ms "
        f"({len(latencies)} requests)"
    )
    print()
    print("ratios (target in brackets):")
    cpu_ratio = one.cpu_us / passthrough.cpu_us
    print(f"  worker CPU/req vs (b) CPU/msg:        {cpu_ratio:5.2f}x  (<= 2x)")
    print(f"  worker real-time vs (b):              {one.rate / ceiling_kafka:5.2f}x  (>= 0.5x)")
    print(f"  worker vs min((a), (b)):              {one.rate / ceiling:5.2f}x")
    print(f"  bulk alone vs real-time full load:    {bulk.rate / one.rate:5.2f}x  (>= 0.8x)")
    for processes, run in workers.items():
        if processes != 1:
            print(f"  {processes} processes vs 1:                  {run.rate / one.rate:5.2f}x")
    print()
    print("where the CPU went (µs per request, one process; cores busy over the stretch):")
    for kind, seconds in sorted((one.threads_s or {}).items(), key=lambda kv: -kv[1]):
        print(f"  worker, {kind + ':':<36}{seconds / one.records * 1e6:7.1f}")
    for processes, run in workers.items():
        wall = max(run.wall_s, 1e-3)
        worker_cores, stack_cores = run.cpu_s / wall, run.stack_cpu_s / wall
        rest = run.machine_busy_s / wall - worker_cores - stack_cores
        print(
            f"  {processes} process(es): worker {worker_cores:.2f} cores, stack"
            f" {stack_cores:.2f}, everything else (other tenants, this reader) {rest:.2f}"
            f" of {cores}"
        )
    # Each served request costs the worker's CPU and the stack's (broker, object store,
    # Triton): with every core busy, no number of worker processes goes beyond this.
    per_request_s = (one.cpu_us + one.stack_cpu_us) / 1e6
    print(
        f"  {cores} cores / (worker {one.cpu_us:.0f} + stack {one.stack_cpu_us:.0f} us/req):"
        f" at most {cores / per_request_s:,.0f} req/s on this machine, whatever N"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
