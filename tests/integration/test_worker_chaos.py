"""Chaos: one worker serving two models takes good traffic mixed with hostile records for
minutes, against the real Kafka, MinIO and Triton, and must stay up, answer every record
exactly once as the contract says, commit every offset and keep its memory flat.

The hostile kinds and their expected outcomes are catalogued in ``tests/integration/hostile.py``.
``CHAOS_KINDS=random_bytes,truncated`` runs a subset (default: every kind);
``CHAOS_SECONDS`` shortens or lengthens the run (default :data:`CHAOS_SECONDS`).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from pipeline.kafka.admin import TopicSpec, control_topic_spec, ensure_topics, model_topic_specs
from pipeline.settings import Settings
from pipeline.storage.client import ensure_bucket, make_client
from pipeline.topics import ModelTopics, control_topic
from schemas import AvroCodec, Limits, default_catalog
from schemas.models import DeadLetter, InferenceResult, ResultStatus
from tests.integration import hostile, traffic
from tests.integration.hostile import Context, Hostile, Outcome
from tests.integration.waiting import wait_until

CHAOS_SECONDS = 120.0
"""How long good and hostile traffic is published (``CHAOS_SECONDS`` overrides it)."""
GOOD_PER_SECOND = 150
BURST_S = 0.1
"""Records go out in bursts this far apart; the worker is checked after every burst."""
REPEATS = 6
"""How often each hostile kind occurs, spread over the whole run."""
WARM_UP = 500
SEED = 20261127
SETTLE_TIMEOUT_S = 90.0
COMMIT_TIMEOUT_S = 30.0
RSS_GROWTH_LIMIT = 0.10
PROGRESS_EVERY_S = 10.0
REPLY_SHARE = 0.2
REPLY_NAME = "chaos"
CRASH_WINDOW_S = 3.0
"""When the worker dies, the hostile kinds published this long before are the suspects."""
OUTCOME_LIMITS = Limits(max_message_bytes=16 * 1024 * 1024)
"""Read outcomes with room to spare: an oversized one is reported, not a reader failure."""


def worker_group(namespace: str, model: str) -> str:
    """The consumer group whose committed offsets must reach the end of ``model``'s requests."""
    return f"{namespace}.worker.{model}"


def _duration() -> float:
    return float(os.environ.get("CHAOS_SECONDS", CHAOS_SECONDS))


def _kinds() -> list[str]:
    chosen = [k.strip() for k in os.environ.get("CHAOS_KINDS", "").split(",") if k.strip()]
    unknown = sorted(set(chosen) - set(hostile.KINDS))
    if unknown:
        raise pytest.UsageError(f"CHAOS_KINDS names unknown kinds {unknown}")
    return chosen or list(hostile.KINDS)


# ----------------------------------------------------------------------------- reading outcomes


@dataclass
class Seen:
    topic: str
    partition: int
    offset: int
    event: InferenceResult | DeadLetter | None
    headers: dict[str, bytes | None]
    error: str | None = None


class Collector(threading.Thread):
    """Reads the outcome topics from the beginning, on ``read_committed``, until stopped."""

    def __init__(self, settings: Settings, topics: Sequence[str], dlq_topics: set[str]) -> None:
        super().__init__(daemon=True, name="chaos-collector")
        self.codec = AvroCodec(default_catalog(), OUTCOME_LIMITS)
        self.dlq_topics = dlq_topics
        self.consumer = Consumer(
            {
                **settings.kafka.client_config(),
                "group.id": f"chaos-collector-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            }
        )
        metadata = self.consumer.list_topics(timeout=15)
        self.partitions = [
            TopicPartition(topic, p, OFFSET_BEGINNING)
            for topic in topics
            for p in sorted(metadata.topics[topic].partitions)
        ]
        self.consumer.assign(self.partitions)
        self.lock = threading.Lock()
        self.seen: list[Seen] = []
        self.next_offset: dict[tuple[str, int], int] = {}
        self.stopping = threading.Event()
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                for message in self.consumer.consume(500, 0.2):
                    if message.error() is not None:
                        continue
                    self._take(message)
        except BaseException as error:  # reported by the test, not lost in a thread
            self.failure = error
        finally:
            self.consumer.close()

    def _take(self, message: Any) -> None:
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        headers = {(k if isinstance(k, str) else repr(k)): v for k, v in (message.headers() or [])}
        value = message.value() or b""
        event: InferenceResult | DeadLetter | None = None
        error = None
        try:
            if topic in self.dlq_topics:
                event = self.codec.decode(value, DeadLetter)
            else:
                event = self.codec.decode(value, InferenceResult)
        except Exception as exc:
            event, error = None, f"{type(exc).__name__}: {exc}"[:300]
        with self.lock:
            self.seen.append(Seen(topic, partition, offset, event, headers, error))
            self.next_offset[(topic, partition)] = offset + 1

    def snapshot(self) -> list[Seen]:
        with self.lock:
            return list(self.seen)

    def caught_up(self, ends: dict[tuple[str, int], int]) -> bool:
        with self.lock:
            return all(self.next_offset.get(tp, 0) >= end for tp, end in ends.items())

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)


@dataclass
class Outcomes:
    """The outcomes read so far, indexed by request id and by the original's coordinates."""

    results: dict[str, list[Seen]] = field(default_factory=lambda: defaultdict(list))
    replies: dict[str, list[Seen]] = field(default_factory=lambda: defaultdict(list))
    letters: dict[tuple[str, int, int], list[Seen]] = field(
        default_factory=lambda: defaultdict(list)
    )
    unreadable: list[Seen] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)


def index_outcomes(seen: Sequence[Seen], reply_topic: str) -> Outcomes:
    out = Outcomes()
    for item in seen:
        event = item.event
        if event is None:
            out.unreadable.append(item)
            out.counts["unreadable"] += 1
        elif isinstance(event, DeadLetter):
            coordinate = (event.original_topic, event.original_partition, event.original_offset)
            out.letters[coordinate].append(item)
            out.counts["dead letters"] += 1
        elif item.topic == reply_topic:
            out.replies[str(event.request_id)].append(item)
            out.counts["replies"] += 1
        else:
            out.results[str(event.request_id)].append(item)
            out.counts["results"] += 1
    return out


def _outcomes_of(record: Hostile, topic: str, out: Outcomes) -> list[Seen]:
    found = list(out.letters.get((topic, record.partition, record.offset), []))
    if record.request_id is not None:
        found = out.results.get(record.request_id, []) + found
    return found


def _answered(records: Sequence[Hostile], topics: dict[str, ModelTopics], out: Outcomes) -> bool:
    for record in records:
        if record.delivery_error is not None:
            continue
        if not _outcomes_of(record, topics[record.model].requests, out):
            return False
        if record.expect.reply and not out.replies.get(record.request_id or ""):
            return False
    return True


# ----------------------------------------------------------------------------- checking outcomes


def _label(item: Seen) -> str:
    event = item.event
    if isinstance(event, DeadLetter):
        return f"dlq:{event.reason_code}"
    if isinstance(event, InferenceResult):
        status = event.status.value
        return status if event.error_code is None else f"{status}:{event.error_code}"
    return "unreadable"


def _tensor(result: InferenceResult, name: str) -> np.ndarray[Any, Any] | None:
    tensors = result.outputs.tensors if result.outputs is not None else None
    for tensor in tensors or []:
        if tensor.name == name and tensor.datatype.value == "FP32":
            return np.frombuffer(tensor.data, dtype="<f4")
    return None


class Checker:
    def __init__(
        self,
        settings: Settings,
        topics: dict[str, ModelTopics],
        reply_topic: str,
        out: Outcomes,
    ) -> None:
        self.settings = settings
        self.topics = topics
        self.reply_topic = reply_topic
        self.out = out
        self.store = make_client(settings.object_store)
        self.problems: dict[str, Counter[str]] = defaultdict(Counter)
        self.examples: dict[tuple[str, str], str] = {}
        self.outcome_table: dict[str, Counter[str]] = defaultdict(Counter)
        self.dropped_headers: Counter[str] = Counter()
        self.carried: Counter[str] = Counter()

    def problem(self, record: Hostile, what: str, example: str = "") -> None:
        self.problems[record.kind][what] += 1
        if example and (record.kind, what) not in self.examples:
            self.examples[(record.kind, what)] = example[:400]

    def check(self, record: Hostile) -> None:
        if record.delivery_error is not None:
            self.outcome_table[record.kind]["not delivered"] += 1
            self.problem(record, "the test could not publish it", record.delivery_error)
            return
        topics = self.topics[record.model]
        found = _outcomes_of(record, topics.requests, self.out)
        label = (
            "no outcome"
            if not found
            else _label(found[0])
            if len(found) == 1
            else f"{len(found)} outcomes"
        )
        self.outcome_table[record.kind][label] += 1
        expect = record.expect
        wanted = expect.outcome.value + (
            f":{'|'.join(sorted(expect.reasons))}" if expect.reasons else ""
        )
        where = f"{topics.requests}/{record.partition}@{record.offset} id={record.request_id}"
        if len(found) != 1:
            self.problem(
                record,
                f"expected exactly one outcome ({wanted}), got {len(found)}",
                f"{where}: {[(_label(f), f.topic) for f in found]}",
            )
            self._check_replies(record, None)
            return
        item = found[0]
        event = item.event
        if expect.outcome is Outcome.DLQ:
            if not isinstance(event, DeadLetter):
                self.problem(record, f"expected {wanted}, got {_label(item)}", where)
            else:
                self._check_letter(record, item, event, where)
        elif not isinstance(event, InferenceResult):
            self.problem(record, f"expected {wanted}, got {_label(item)}", where)
        else:
            self._check_result(record, item, event, wanted, where)
        self._check_replies(record, event)

    def _check_letter(self, record: Hostile, item: Seen, letter: DeadLetter, where: str) -> None:
        topics = self.topics[record.model]
        wanted = f"dlq:{'|'.join(sorted(record.expect.reasons))}"
        if item.topic != topics.dlq:
            self.problem(record, f"dead letter on {item.topic}, not {topics.dlq}", where)
        if letter.reason_code not in record.expect.reasons:
            self.problem(
                record, f"expected {wanted}, got dlq:{letter.reason_code}", letter.reason_message
            )
        header = item.headers.get("sluiceway-dlq-reason")
        if header != letter.reason_code.encode():
            self.problem(record, "header sluiceway-dlq-reason differs from reason_code", where)
        if record.request_id is not None and letter.request_id != record.request_id:
            self.problem(
                record,
                "the dead letter does not name the request id",
                f"{where}: {letter.request_id!r}",
            )
        if (letter.original_key or b"") != (record.key or b""):
            self.problem(record, "the dead letter's original_key differs", where)
        # Fields the contract is gaining now (read with getattr while older schemas linger).
        original_ref: str | None = getattr(letter, "original_ref", None)
        if getattr(letter, "dropped_headers", None):
            self.dropped_headers[record.kind] += 1
        original = record.value or b""
        if letter.original_value:
            self.carried[f"{record.kind}: inline"] += 1
            if letter.original_value != original:
                self.problem(record, "original_value differs from the bytes published", where)
        elif original_ref:
            self.carried[f"{record.kind}: original_ref"] += 1
            stored = self._fetch(original_ref)
            if stored != original:
                got = "missing" if stored is None else f"{len(stored)} bytes"
                self.problem(
                    record,
                    "original_ref does not hold the bytes published",
                    f"{original_ref}: {got}, published {len(original)}",
                )
        elif original:
            self.problem(record, "the dead letter keeps neither original_value nor original_ref")

    def _fetch(self, uri: str) -> bytes | None:
        if not uri.startswith("s3://") or "/" not in uri[5:]:
            return None
        bucket, key = uri[5:].split("/", 1)
        try:
            response = self.store.get_object(bucket, key)
        except Exception:
            return None
        try:
            return bytes(response.read())
        finally:
            response.close()
            response.release_conn()

    def _check_result(
        self, record: Hostile, item: Seen, result: InferenceResult, wanted: str, where: str
    ) -> None:
        topics = self.topics[record.model]
        expect = record.expect
        if item.topic != topics.results:
            self.problem(record, f"result on {item.topic}, not {topics.results}", where)
        if result.status.value != expect.outcome.value or (
            expect.reasons and result.error_code not in expect.reasons
        ):
            self.problem(
                record, f"expected {wanted}, got {_label(item)}", f"{where}: {result.error_message}"
            )
            return
        if expect.outcome is not Outcome.OK:
            return
        if record.model == hostile.SCALER:
            y = _tensor(result, "y")
            if y is None or expect.scaled is None or y.shape != (4,):
                self.problem(record, "an ok scaler result without an inline y of 4", where)
            elif not np.allclose(y, expect.scaled, rtol=1e-5, atol=1e-3):
                self.problem(record, "scaler y is not 2x", f"{where}: {y} vs {expect.scaled}")
        else:
            score = _tensor(result, "score")
            if score is None or score.shape != (1,) or not 0.0 <= float(score[0]) <= 1.0:
                self.problem(record, "an ok invoice_risk result without a score in [0,1]", where)

    def _check_replies(self, record: Hostile, event: InferenceResult | DeadLetter | None) -> None:
        replies = self.out.replies.get(record.request_id or "", [])
        expected = 1 if record.expect.reply else 0
        if len(replies) != expected:
            self.problem(record, f"expected {expected} replies, got {len(replies)}")
            return
        if not replies:
            return
        reply = replies[0].event
        assert isinstance(reply, InferenceResult)
        if isinstance(event, DeadLetter):
            if reply.status is not ResultStatus.REJECTED or reply.error_code != event.reason_code:
                self.problem(
                    record,
                    "the reply to a dead-lettered request is not rejected with its reason",
                    f"{reply.status.value}:{reply.error_code} vs {event.reason_code}",
                )
        elif isinstance(event, InferenceResult) and (
            reply.status is not event.status or reply.error_code != event.error_code
        ):
            self.problem(record, "the reply differs from the result")

    def strays(self, records: Sequence[Hostile]) -> list[str]:
        ids = {r.request_id for r in records if r.request_id is not None}
        coordinates = {
            (self.topics[r.model].requests, r.partition, r.offset)
            for r in records
            if r.delivery_error is None
        }
        found = []
        stray_results = sum(len(v) for k, v in self.out.results.items() if k not in ids)
        stray_replies = sum(len(v) for k, v in self.out.replies.items() if k not in ids)
        stray_letters = sum(len(v) for k, v in self.out.letters.items() if k not in coordinates)
        if stray_results:
            found.append(f"{stray_results} results for requests never published")
        if stray_replies:
            found.append(f"{stray_replies} replies for requests never published")
        if stray_letters:
            found.append(f"{stray_letters} dead letters for records never published")
        for item in self.out.unreadable[:5]:
            found.append(f"unreadable outcome on {item.topic}@{item.offset}: {item.error}")
        return found


# ----------------------------------------------------------------------------- the run


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _metric_sum(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            lines = response.read().decode().splitlines()
    except OSError:
        return None
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith(name) and not line.startswith("#")
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _all_topics(settings: Settings) -> set[str]:
    return set(AdminClient(settings.kafka.client_config()).list_topics(timeout=15).topics)


def _ends(settings: Settings, topics: Sequence[str]) -> dict[tuple[str, int], int]:
    return {
        (topic, partition): end
        for topic in topics
        for partition, end in traffic.end_offsets(settings, topic).items()
    }


class Publisher:
    def __init__(self, settings: Settings, topics: dict[str, ModelTopics]) -> None:
        self.topics = topics
        self.producer = Producer(
            {
                **settings.kafka.client_config(),
                "acks": "all",
                "linger.ms": 5,
                "message.max.bytes": hostile.PRODUCER_MESSAGE_MAX_BYTES,
            }
        )
        self.records: list[Hostile] = []

    def send(self, records: Sequence[Hostile]) -> None:
        for record in records:
            record.published_at = time.monotonic()
            self.records.append(record)

            def delivered(error: Any, message: Any, record: Hostile = record) -> None:
                if error is not None:
                    record.delivery_error = str(error)
                else:
                    record.partition, record.offset = message.partition(), message.offset()

            try:
                self.producer.produce(
                    self.topics[record.model].requests,
                    record.value,
                    key=record.key,
                    headers=record.headers,  # type: ignore[arg-type]  # bytes names too
                    on_delivery=delivered,
                )
            except Exception as error:
                record.delivery_error = f"produce refused: {error}"
            self.producer.poll(0)

    def flush(self) -> None:
        assert self.producer.flush(60) == 0, "records still unacknowledged after 60 s"


@pytest.fixture
def say(pytestconfig: pytest.Config) -> Callable[[str], None]:
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")

    def emit(line: str) -> None:
        with capture.global_and_fixture_disabled():
            print(f"[chaos] {line}", flush=True)

    return emit


def _last_error(log: Path) -> str:
    """The last line of the worker's last traceback, if it logged one."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
    if not starts:
        return "(no traceback)"
    tail = [line for line in lines[starts[-1] + 1 :] if line and not line[0].isspace()]
    return tail[0][:300] if tail else "(traceback without an error line)"


def _log_tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


def test_worker_survives_hostile_records_and_answers_each_exactly_once(
    settings: Settings, say: Callable[[str], None], tmp_path: Path
) -> None:
    ns = settings.namespace
    topics = {model: ModelTopics(ns, model) for model in hostile.MODELS}
    reply_topic = hostile.reply_topic_for(ns, REPLY_NAME)
    ensure_topics(
        settings.kafka,
        [
            control_topic_spec(ns),
            *(spec for t in topics.values() for spec in model_topic_specs(t)),
            TopicSpec(reply_topic, 1),
        ],
    )
    ensure_bucket(make_client(settings.object_store), settings.object_store.bucket)
    control_before = traffic.end_offsets(settings, control_topic(ns))
    kinds = _kinds()
    duration = _duration()

    collector = Collector(
        settings,
        [*(t.results for t in topics.values()), *(t.dlq for t in topics.values()), reply_topic],
        {t.dlq for t in topics.values()},
    )
    collector.start()
    publisher = Publisher(settings, topics)
    ctx = Context(ns, reply_topic, random.Random(SEED))
    metrics_port = _free_port()
    log = tmp_path / "worker.log"
    worker = traffic.start_worker(
        settings,
        log,
        models=hostile.MODELS,
        SLUICEWAY_WORKERS__METRICS_PORT=str(metrics_port),
        # One process: its memory and its metrics are what this test bounds.
        SLUICEWAY_WORKERS__PROCESSES="1",
        SLUICEWAY_WORKERS__MAX_MESSAGE_BYTES=str(hostile.WORKER_MAX_MESSAGE_BYTES),
    )
    general: list[str] = []
    try:
        # Warm-up: good requests only, every one answered before the clock starts.
        warm = [hostile.good(ctx, REPLY_SHARE) for _ in range(WARM_UP)]
        for record in warm:
            record.kind = "warmup"
        publisher.send(warm)
        publisher.flush()

        def warmed() -> bool:
            if worker.poll() is not None:
                raise AssertionError(f"worker exited during warm-up\n{_log_tail(log)}")
            return _answered(warm, topics, index_outcomes(collector.snapshot(), reply_topic))

        wait_until(warmed, 120, "every warm-up request to be answered", poll_s=0.5)
        rss_warm = _rss_kib(worker.pid)
        say(
            f"warm: {WARM_UP} requests answered; worker RSS {rss_warm / 1024:.1f} MiB; "
            f"{len(kinds)} hostile kinds x {REPEATS} over {duration:.0f}s at "
            f"{GOOD_PER_SECOND} good/s"
        )

        # The hostile schedule: every kind REPEATS times, shuffled, spread over the run.
        schedule_rng = random.Random(SEED + 1)
        plan = [kind for kind in kinds for _ in range(REPEATS)]
        schedule_rng.shuffle(plan)
        slots = [(i + 0.5) * duration / len(plan) for i in range(len(plan))]
        exit_info: str | None = None
        start = time.monotonic()
        next_progress = start + PROGRESS_EVERY_S
        burst = 0
        per_burst = round(GOOD_PER_SECOND * BURST_S)
        good_count = hostile_count = 0
        while True:
            due = start + burst * BURST_S
            if due - start >= duration:
                break
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)  # pacing the publisher, not waiting for a condition
            batch = [hostile.good(ctx, REPLY_SHARE) for _ in range(per_burst)]
            good_count += len(batch)
            while slots and slots[0] <= due - start:
                slots.pop(0)
                built = hostile.KINDS[plan.pop(0)](ctx)
                hostile_count += 1
                batch.insert(ctx.rng.randrange(len(batch) + 1), built[0])
                if len(built) > 1:  # neighbours stay together, in order
                    at = batch.index(built[0])
                    batch[at + 1 : at + 1] = built[1:]
            publisher.send(batch)
            burst += 1
            rc = worker.poll()
            if rc is not None:
                now = time.monotonic()
                suspects = sorted(
                    {
                        r.kind
                        for r in publisher.records
                        if now - r.published_at <= CRASH_WINDOW_S
                        and not r.kind.startswith(("good_", "warmup"))
                    }
                )
                exit_info = (
                    f"worker exited with rc {rc} {now - start:.1f}s into the run; hostile "
                    f"kinds published in the {CRASH_WINDOW_S:.0f}s before: {suspects}; "
                    f"last error: {_last_error(log)}"
                )
                say(exit_info)
                break
            if time.monotonic() >= next_progress:
                next_progress += PROGRESS_EVERY_S
                out = index_outcomes(collector.snapshot(), reply_topic)
                in_flight = _metric_sum(metrics_port, "sluiceway_in_flight")
                say(
                    f"t={time.monotonic() - start:5.1f}s published good={good_count} "
                    f"hostile={hostile_count} | read {dict(out.counts)} | worker alive, RSS "
                    f"{_rss_kib(worker.pid) / 1024:.1f} MiB, in flight {in_flight}"
                )
        publisher.flush()
        records = publisher.records
        say(f"published {len(records)} records ({hostile_count} hostile occurrences)")

        # Settle: every record answered, every offset committed (unless the worker died).
        if exit_info is None:
            try:
                wait_until(
                    lambda: (
                        worker.poll() is not None
                        or _answered(
                            records, topics, index_outcomes(collector.snapshot(), reply_topic)
                        )
                    ),
                    SETTLE_TIMEOUT_S,
                    "every published record to have its outcome",
                    poll_s=0.5,
                )
            except AssertionError as error:
                general.append(str(error))
        committed: dict[str, dict[int, int]] = {}
        request_ends = {m: traffic.end_offsets(settings, t.requests) for m, t in topics.items()}

        def all_committed() -> bool:
            for model, t in topics.items():
                group = worker_group(ns, model)
                committed[model] = traffic.committed_offsets(settings, group, t.requests, 3)
            return all(committed[m] == request_ends[m] for m in topics)

        try:
            wait_until(all_committed, COMMIT_TIMEOUT_S, "committed offsets to reach the end", 0.5)
        except AssertionError:
            for model, t in topics.items():
                if committed[model] != request_ends[model]:
                    general.append(
                        f"group {worker_group(ns, model)} on {t.requests}: committed "
                        f"{committed[model]}, end {request_ends[model]}"
                    )
        if exit_info is None and worker.poll() is not None:
            exit_info = f"worker exited with rc {worker.returncode} after publishing ended"
        if exit_info is not None:
            general.insert(0, exit_info)
        rss_end = _rss_kib(worker.pid) if worker.poll() is None else None
        dead_lettered = _metric_sum(metrics_port, "sluiceway_dead_lettered_total")

        # Read every outcome up to the end offsets as they stand now.
        outcome_topics = [
            *(t.results for t in topics.values()),
            *(t.dlq for t in topics.values()),
            reply_topic,
        ]
        ends = _ends(settings, outcome_topics)
        try:
            wait_until(lambda: collector.caught_up(ends), 60, "the outcome reader to catch up")
        except AssertionError as error:
            general.append(str(error))
    finally:
        collector.stop()
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(30)
    if collector.failure is not None:
        general.append(f"outcome reader failed: {collector.failure!r}")
    if exit_info is None and worker.returncode != 0:
        general.append(f"worker stopped with rc {worker.returncode} on SIGTERM")

    # Memory: flat against the warmed-up worker.
    if rss_end is not None and rss_end > rss_warm * (1 + RSS_GROWTH_LIMIT):
        general.append(
            f"worker RSS grew from {rss_warm / 1024:.1f} MiB after warm-up to "
            f"{rss_end / 1024:.1f} MiB (limit +{RSS_GROWTH_LIMIT:.0%})"
        )

    # Nothing written where it must not be.
    control_after = traffic.end_offsets(settings, control_topic(ns))
    if control_after != control_before:
        general.append(f"{control_topic(ns)} was written: {control_before} -> {control_after}")
    for model, t in topics.items():
        delivered = sum(1 for r in records if r.model == model and r.delivery_error is None)
        total = sum(traffic.end_offsets(settings, t.requests).values())
        if total != delivered:
            general.append(f"{t.requests} holds {total} records, the test published {delivered}")
    existing = _all_topics(settings)
    guarded = {
        r.reply_to
        for r in records
        if r.reply_to is not None
        and r.kind
        in (
            "reply_to_checkpoints",
            "reply_to_batch_progress",
            "reply_to_lookalike",
            "reply_to_missing_topic",
        )
    }
    for topic in sorted(guarded & existing):
        written = sum(traffic.end_offsets(settings, topic).values())
        if written:
            general.append(f"{written} records were written to {topic}")

    # Every record: exactly one outcome, the expected one.
    out = index_outcomes(collector.snapshot(), reply_topic)
    checker = Checker(settings, topics, reply_topic, out)
    for record in records:
        checker.check(record)
    general.extend(checker.strays(records))

    # The summary.
    say("outcomes per kind (published records -> outcome: count):")
    for kind in sorted(checker.outcome_table):
        table = checker.outcome_table[kind]
        say(f"  {kind:30} {sum(table.values()):6}  {dict(table.most_common())}")
    totals: Counter[str] = Counter()
    for table in checker.outcome_table.values():
        totals.update(table)
    say(f"  {'ALL':30} {sum(totals.values()):6}  {dict(totals.most_common())}")
    say(f"read: {dict(out.counts)}; worker's dead_lettered_total {dead_lettered}")
    say(f"originals in dead letters: {dict(checker.carried)}")
    if checker.dropped_headers:
        say(f"dead letters with dropped_headers: {dict(checker.dropped_headers)}")
    say(
        f"worker RSS after warm-up {rss_warm / 1024:.1f} MiB, at the end "
        + (f"{rss_end / 1024:.1f} MiB" if rss_end is not None else "(not running)")
    )
    failures = []
    for kind in sorted(checker.problems):
        for what, count in checker.problems[kind].most_common():
            example = checker.examples.get((kind, what))
            failures.append(f"{kind}: {what} (x{count})" + (f" e.g. {example}" if example else ""))
    if failures or general:
        say("PROBLEMS:")
        for line in general + failures:
            say(f"  {line}")
    report = "\n".join(general + failures)
    assert not report, f"{report}\n--- worker log tail ---\n{_log_tail(log)}"
