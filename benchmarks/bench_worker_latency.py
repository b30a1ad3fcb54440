"""Real-time latency at a fixed request rate, for several partial-batch limits, in one run.

    .venv/bin/python benchmarks/bench_worker_latency.py [--rate 3000] [--seconds 8] [--partial 4,1]

For each value of ``workers.max_in_flight_partial_batches`` a fresh worker serves requests
published at ``--rate`` (as the SDK publishes: linger 2 ms). Latency is the result's broker
CreateTime (stamped when the worker produced the outcome) minus the request's publish time:
the worker's part, without the stalls a reading client adds. The first value is the
baseline the others are compared with.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_worker import (  # noqa: E402
    MODEL,
    consumer_for,
    make_requests,
    progress,
    publish_all,
)
from devkit.settings import load_local_settings  # noqa: E402
from devkit.stack import manager  # noqa: E402
from pipeline.kafka import clients  # noqa: E402
from pipeline.kafka.admin import control_topic_spec, ensure_topics, model_topic_specs  # noqa: E402
from pipeline.kafka.clients import ProducerRole  # noqa: E402
from pipeline.settings import Settings  # noqa: E402
from pipeline.topics import ModelTopics  # noqa: E402
from tests.integration.traffic import start_worker  # noqa: E402

WARM_UP = 200


def publish_at(
    settings: Settings, topic: str, bodies: list[bytes], rate: float, first_key: int
) -> list[float]:
    """Publish ``bodies`` at ``rate`` per second, keyed from ``first_key`` on; return each
    one's publish time (epoch s)."""
    # Linger 2 ms as the SDK publishes (see bench_worker.py's live rate).
    producer = clients.producer(settings.kafka, role=ProducerRole.FEED, overrides={"linger.ms": 2})
    sent: list[float] = []
    started = time.perf_counter()
    for index, body in enumerate(bodies):
        target = started + index / rate
        while (now := time.perf_counter()) < target:
            time.sleep(min(target - now, 0.001))
        sent.append(time.time())
        producer.produce(topic, body, key=str(first_key + index).encode())
        producer.poll(0)
    producer.flush(30)
    return sent


def produced_at(settings: Settings, topic: str, count: int) -> dict[int, float]:
    """Each result's CreateTime (epoch s) by request index, read after the run."""
    consumer = consumer_for(settings, topic, f"bench-latency-{uuid.uuid4().hex[:6]}")
    stamps: dict[int, float] = {}
    deadline = time.monotonic() + 120
    while len(stamps) < count and time.monotonic() < deadline:
        for message in consumer.consume(1000, 0.5):
            key = message.key()
            if message.error() is None and key is not None:
                stamps[int(key)] = message.timestamp()[1] / 1000.0
    consumer.close()
    return stamps


def measure(rate: float, seconds: float, partial: int, log: Path) -> list[float]:
    settings = load_local_settings(namespace=f"bench-{uuid.uuid4().hex[:6]}")
    topics = ModelTopics(settings.namespace, MODEL)
    ensure_topics(
        settings.kafka, [control_topic_spec(settings.namespace), *model_topic_specs(topics)]
    )
    worker = start_worker(
        settings, log, SLUICEWAY_WORKERS__MAX_IN_FLIGHT_PARTIAL_BATCHES=str(partial)
    )
    try:
        publish_all(settings, topics.requests, make_requests(WARM_UP))
        if len(produced_at(settings, topics.results, WARM_UP)) < WARM_UP:
            raise RuntimeError(f"the worker did not serve its warm-up; see {log}")
        total = int(rate * seconds)
        sent = publish_at(settings, topics.requests, make_requests(total), rate, WARM_UP)
        produced = produced_at(settings, topics.results, WARM_UP + total)
    finally:
        worker.terminate()
        worker.wait(60)
    # Results carry their request's key: the warm-up's are 0..WARM_UP-1, the timed ones follow.
    return [
        (produced[WARM_UP + i] - sent[i]) * 1000 for i in range(total) if WARM_UP + i in produced
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=3000.0)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument(
        "--partial", default="4,1", help="comma-separated; the first is the baseline"
    )
    args = parser.parse_args()
    manager.up(load_local_settings(), progress=progress)
    log_dir = REPO_ROOT / ".sluiceway" / "bench"
    log_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for partial in (int(value) for value in args.partial.split(",")):
        progress(
            f"max_in_flight_partial_batches={partial}: {args.rate:.0f} req/s for {args.seconds}s"
        )
        latencies = measure(args.rate, args.seconds, partial, log_dir / f"latency-{partial}.log")
        q = statistics.quantiles(latencies, n=100)
        rows.append((partial, q[49], q[89], q[98], max(latencies), len(latencies)))
    base_p99 = rows[0][3]
    print()
    print(
        f"{'partial batches':<17}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}"
        f"{'p99 vs first':>14}{'requests':>10}"
    )
    for partial, p50, p90, p99, worst, count in rows:
        print(
            f"{partial:<17}{p50:>9.1f}{p90:>9.1f}{p99:>9.1f}{worst:>9.1f}"
            f"{p99 / base_p99:>13.2f}x{count:>10}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
