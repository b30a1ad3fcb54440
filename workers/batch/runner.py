"""The batch-job runner: publishes a job's records, gathers their outcomes, writes the outputs.

One runner drives one job at a time, in four steps:

1. **Index** the input into a local ledger (custom id -> position), streaming.
2. **Publish** records to ``<ns>.<model>.batch`` in Kafka transactions of
   ``batch.chunk_records``; each transaction also writes the job's checkpoint (records
   published so far, and where the results topic stood when the job started) to the compacted
   ``<ns>.batch.progress`` topic. A runner that dies mid-chunk leaves an aborted transaction
   the worker never sees (it reads committed), and its successor (same transactional id)
   fences it and resumes after the last committed chunk: no record is published twice.
3. **Gather** outcomes from the model's results and dead-letter topics, read from the offsets
   of the checkpoint, keeping the records of this job: message key ``<job id>/<custom id>``
   *and* the request id this runner gave that record. Request ids are HMAC-SHA256 of the
   record's key under a random job key kept in the job's checkpoint, so nobody without it can
   make an outcome that counts: a result or dead letter published by an outsider with a job's
   key is counted as forged, logged and ignored. A restarted runner reads the job key back
   from the checkpoint and recognises its earlier requests.
   At most ``batch.max_outstanding`` records wait for an outcome, so a cancel or the
   deadline stops work quickly and memory stays flat.
4. **Finalize**: ``results.jsonl`` and ``errors.jsonl`` in input order, then the manifest.

Everything the runner knows is rebuilt from the object store and the topics when it starts,
so ``sluiceway batch run JOB`` after a crash simply goes on.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition

from pipeline.batchjobs.formats import read_records, values_are_text
from pipeline.batchjobs.ledger import Ledger
from pipeline.batchjobs.lifecycle import advance, final_status, is_final
from pipeline.batchjobs.records import (
    BatchItem,
    RecordParser,
    UnservableLine,
    custom_id_of,
    generated_custom_id,
)
from pipeline.batchjobs.store import ERRORS_FILE, RESULTS_FILE, JobStore
from pipeline.kafka import clients
from pipeline.kafka.admin import (
    batch_progress_topic_spec,
    end_offsets,
    ensure_topics,
    model_topic_specs,
)
from pipeline.kafka.clients import ConsumerRole, ProducerRole
from pipeline.settings import Settings
from pipeline.topics import ModelTopics, batch_progress_topic
from schemas import default_codec
from schemas.codec import AvroCodec
from schemas.errors import SluicewayError
from schemas.exceptions import DecodeError
from schemas.identity import request_id_for
from schemas.models import (
    BatchCounts,
    BatchJob,
    BatchJobStatus,
    DeadLetter,
    InferenceRequest,
    InferenceResult,
    ResultStatus,
)
from schemas.rendering import readable

log = logging.getLogger(__name__)

_CONSUME_BATCH = 1_000
_TRANSACTION_TIMEOUT_S = 60.0
_RESULT_FIELDS_DROPPED = ("batch_job_id", "input_features", "trace", "worker_id")


class JobTakenOverError(SluicewayError):
    """Another runner started the same job; this one stops without touching it."""


@dataclass(frozen=True)
class Checkpoint:
    """A job's position, committed with the records it counts."""

    published: int
    """Input positions done (published, or answered locally as invalid)."""
    results_from: dict[int, int]
    dead_letters_from: dict[int, int]
    job_key: str | None = None
    """Hex key of the job's request ids (:func:`request_id`), made with the first checkpoint;
    ``None`` only in checkpoints of runners older than it."""

    def encode(self) -> bytes:
        data: dict[str, Any] = {
            "published": self.published,
            "results_from": self.results_from,
            "dead_letters_from": self.dead_letters_from,
        }
        if self.job_key is not None:
            data["job_key"] = self.job_key
        return json.dumps(data).encode()

    @classmethod
    def decode(cls, value: bytes) -> Checkpoint:
        data = json.loads(value)
        job_key = data.get("job_key")
        return cls(
            int(data["published"]),
            {int(p): int(o) for p, o in data["results_from"].items()},
            {int(p): int(o) for p, o in data["dead_letters_from"].items()},
            str(job_key) if job_key is not None else None,
        )


def new_job_key() -> str:
    return secrets.token_hex(32)


def request_id(job_id: str, custom_id: str, job_key: str | None) -> uuid.UUID:
    """The same record of the same job is always the same request, and only a holder of the
    job key can tell which id that is (an outsider cannot make an outcome that counts).

    ``job_key=None``: the public derivation of runners before job keys, kept so that a job
    they started still finishes."""
    if job_key is None:
        return request_id_for(f"batch/{job_id}", custom_id)
    digest = hmac.new(
        bytes.fromhex(job_key), message_key(job_id, custom_id), hashlib.sha256
    ).digest()
    return uuid.UUID(bytes=digest[:16], version=4)


def message_key(job_id: str, custom_id: str) -> bytes:
    return f"{job_id}/{custom_id}".encode()


def error_line(
    request: uuid.UUID, custom_id: str, status: str, code: str, message: str, **extra: Any
) -> str:
    """One line of errors.jsonl: whose record, what became of it, and why."""
    return json.dumps(
        {
            "custom_id": custom_id,
            "request_id": str(request),
            "status": status,
            "error_code": code,
            "error_message": message,
            **extra,
        }
    )


Progress = Callable[[BatchJob], None]


class JobRunner:
    def __init__(
        self,
        settings: Settings,
        store: JobStore | None = None,
        *,
        on_progress: Progress | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.store = store or JobStore(settings)
        self.on_progress = on_progress
        self.now = now

    def run(self, job_id: str) -> BatchJob:
        """Drive the job to a final status (or return it as it is when already final)."""
        job = self.store.load(job_id)
        if is_final(job.status):
            return job
        with tempfile.TemporaryDirectory(prefix=f"sluiceway-{job_id}-") as scratch:
            return _JobRun(self, job, Path(scratch)).execute()

    def pending_jobs(self) -> list[BatchJob]:
        """Jobs a runner should pick up, oldest first."""
        return sorted(
            (job for job in self.store.list() if not is_final(job.status)),
            key=lambda job: job.created_at,
        )


class _JobRun:
    def __init__(self, runner: JobRunner, job: BatchJob, scratch: Path) -> None:
        self.settings = runner.settings
        self.store = runner.store
        self.on_progress = runner.on_progress
        self.now = runner.now
        self.job = job
        self.scratch = scratch
        self.topics = ModelTopics(self.settings.namespace, job.model)
        self.progress_topic = batch_progress_topic(self.settings.namespace)
        self.codec = default_codec()
        self.prefix = f"{job.job_id}/".encode()
        self.ledger = Ledger(scratch / "ledger.sqlite")
        self.total = 0
        self.job_key: str | None = None
        self.forged = 0
        """Outcomes with this job's key but not one of its request ids: ignored."""
        self._last_progress = 0.0
        self._read_from: dict[tuple[str, int], int] = {}
        """Where this run started reading each outcome partition."""

    # ---------------------------------------------------------------- steps

    def execute(self) -> BatchJob:
        ensure_topics(
            self.settings.kafka,
            [*model_topic_specs(self.topics), batch_progress_topic_spec(self.settings.namespace)],
        )
        try:
            local = self.store.download(
                self.job.input_uri, self.scratch / f"input.{self.job.input_format.value}"
            )
            self._index(local)
        except SluicewayError as exc:
            return self._fail("input_unreadable", str(exc))
        producer = self._transactional_producer()
        try:
            checkpoint = self._latest_checkpoint() or self._first_checkpoint(producer)
            self.job_key = checkpoint.job_key
            if self.job_key is None:
                log.warning(
                    'batch job="%s" was started by a runner without job keys: its outcomes '
                    "are matched by their public request ids",
                    self.job.job_id,
                )
            if self.job.status is BatchJobStatus.FINALIZING:
                # Died while writing the outputs: collect what arrived, and write them again.
                stop = self._stop_reason() if checkpoint.published < self.total else None
                self._catch_up(checkpoint)
            else:
                if self.job.status is BatchJobStatus.VALIDATING:
                    self._save(advance(self.job, BatchJobStatus.IN_PROGRESS, self.now()))
                stop = self._publish_and_gather(producer, local, checkpoint)
        finally:
            producer.flush(10)
        return self._finalize(stop)

    def _index(self, local: Path) -> None:
        """Positions and custom ids into the ledger (the full record rules run when
        publishing: submission already checked them, so this pass only reads ids)."""
        for position, source in enumerate(read_records(local, self.job.input_format)):
            self.ledger.add_item(position, source.line, custom_id_of(source.fields, source.line))
            self.total = position + 1
        self.ledger.checkpoint()

    def _answer_invalid(self, position: int, error: UnservableLine) -> None:
        # Submission refuses such records; this covers model settings changed since then.
        custom_id = error.custom_id or generated_custom_id(error.line)
        self.ledger.record_by_position(
            position, ok=False, body=self._rejected_line(custom_id, error)
        )

    def _parsed(self, local: Path) -> Iterator[BatchItem | UnservableLine]:
        parser = RecordParser(
            self.settings.models[self.job.model],
            values_are_text=values_are_text(self.job.input_format),
            max_record_bytes=self.settings.batch.max_record_bytes,
        )
        for source in read_records(local, self.job.input_format):
            yield parser.parse(source)

    def _publish_and_gather(
        self, producer: Producer, local: Path, checkpoint: Checkpoint
    ) -> str | None:
        """Publish and collect until every record is answered, or the job must stop.

        Returns why it stopped early ("cancelled", "expired"), or None when all answered.
        """
        batch_settings = self.settings.batch
        consumer = self._outcome_consumer(checkpoint)
        records = enumerate(self._parsed(local))
        published = checkpoint.published
        for _ in range(published):
            position, parsed = next(records)  # committed by an earlier run
            if isinstance(parsed, UnservableLine):
                self._answer_invalid(position, parsed)
        stop = self._stop_reason()
        stopped_at = time.monotonic()
        try:
            while True:
                outstanding = published - self.ledger.answered
                can_publish = (
                    stop is None
                    and published < self.total
                    and outstanding < batch_settings.max_outstanding
                )
                self._gather(consumer, timeout_s=0.0 if can_publish else 0.2)
                if can_publish:
                    published = self._publish_chunk(producer, records, published, checkpoint)
                if self._progress_due():
                    if stop is None:
                        stop = self._stop_reason()
                        stopped_at = time.monotonic()
                    self._report_progress()
                if self.ledger.answered >= self.total:
                    return None
                if stop is not None and (
                    published <= self.ledger.answered
                    or time.monotonic() - stopped_at > batch_settings.finish_grace_s
                ):
                    return stop
        finally:
            consumer.close()

    def _catch_up(self, checkpoint: Checkpoint) -> None:
        """Read the outcome topics up to where they end now."""
        ends = {
            self.topics.results: end_offsets(self.settings.kafka, self.topics.results),
            self.topics.dlq: end_offsets(self.settings.kafka, self.topics.dlq),
        }
        consumer = self._outcome_consumer(checkpoint)
        deadline = time.monotonic() + 120
        try:
            while time.monotonic() < deadline:
                self._gather(consumer, timeout_s=0.2)
                # The consumer's position steps over transaction markers; before a partition
                # yields its first record it is unknown (negative): then where reading began.
                positions = {
                    (tp.topic, tp.partition): tp.offset
                    for tp in consumer.position(consumer.assignment())
                }
                if all(
                    max(positions.get((topic, partition), -1), self._read_from[(topic, partition)])
                    >= end
                    for topic, topic_ends in ends.items()
                    for partition, end in topic_ends.items()
                ):
                    return
            raise SluicewayError("could not read the outcome topics to their end in 120 s")
        finally:
            consumer.close()

    def _publish_chunk(
        self,
        producer: Producer,
        records: Iterator[tuple[int, BatchItem | UnservableLine]],
        published: int,
        checkpoint: Checkpoint,
    ) -> int:
        job = self.job
        deadline = job.expires_at
        end = min(published + self.settings.batch.chunk_records, self.total)
        headers: list[tuple[str, str | bytes | None]] = list(self.codec.headers(InferenceRequest))
        try:
            producer.begin_transaction()
            for _ in range(published, end):
                position, parsed = next(records)
                if isinstance(parsed, UnservableLine):
                    self._answer_invalid(position, parsed)
                    continue
                request = InferenceRequest(
                    request_id=self._request_id(parsed.custom_id),
                    model=job.model,
                    model_version=job.model_version,
                    inputs=parsed.inputs,
                    explain=parsed.explain,
                    deadline=deadline,
                    tenant=job.tenant,
                    batch_job_id=job.job_id,
                    custom_id=parsed.custom_id,
                )
                _produce(
                    producer,
                    self.topics.batch,
                    self.codec.encode(request),
                    message_key(job.job_id, parsed.custom_id),
                    headers,
                )
            moved = Checkpoint(
                end, checkpoint.results_from, checkpoint.dead_letters_from, checkpoint.job_key
            )
            _produce(producer, self.progress_topic, moved.encode(), job.job_id.encode(), [])
            producer.commit_transaction(_TRANSACTION_TIMEOUT_S)
        except KafkaException as exc:
            error = exc.args[0]
            if getattr(error, "fatal", lambda: False)():
                raise JobTakenOverError(
                    f"job {job.job_id}: another runner took over ({error})"
                ) from exc
            raise
        return end

    def _gather(self, consumer: Consumer, *, timeout_s: float) -> None:
        messages = consumer.consume(_CONSUME_BATCH, timeout_s)
        for message in messages:
            key = message.key()
            if message.error() is not None or not key or not key.startswith(self.prefix):
                continue
            custom_id = key[len(self.prefix) :].decode(errors="replace")
            outcome = self._outcome(message, custom_id)
            if outcome is None:
                self._count_forged(message)
                continue
            ok, body = outcome
            self.ledger.record_by_custom_id(custom_id, ok=ok, body=body)

    def _count_forged(self, message: Message) -> None:
        # One line, no values: where the message sits lets an operator find it.
        self.forged += 1
        log.warning(
            'batch job="%s" ignored an outcome that is not one of its requests topic="%s" '
            'partition="%s" offset="%s"',
            self.job.job_id,
            message.topic(),
            message.partition(),
            message.offset(),
        )

    def _outcome(self, message: Message, custom_id: str) -> tuple[bool, str] | None:
        """The record's outcome, or ``None`` when the message is not the answer to the
        request this runner published for ``custom_id`` (undecodable, or another id)."""
        value = message.value() or b""
        expected = self._request_id(custom_id)
        if message.topic() == self.topics.dlq:
            try:
                letter = self.codec.decode(value, DeadLetter)
            except DecodeError:
                return None
            if _letter_request_id(letter, self.codec) != str(expected):
                return None
            return False, error_line(
                expected,
                custom_id,
                ResultStatus.ERROR.value,
                letter.reason_code,
                letter.reason_message,
                model=letter.model,
            )
        try:
            result = self.codec.decode(value, InferenceResult)
        except DecodeError:
            return None
        if result.request_id != expected:
            return None
        line: dict[str, Any] = {"custom_id": custom_id, **readable(result)}
        for name in _RESULT_FIELDS_DROPPED:
            line.pop(name, None)
        return result.status is ResultStatus.OK, json.dumps(line)

    def _finalize(self, stop: str | None) -> BatchJob:
        job = self._save(advance(self.job, BatchJobStatus.FINALIZING, self.now()))
        unanswered = {
            "cancelled": "the job was cancelled before this record was answered",
            "expired": "the job's completion window ended before this record was answered",
            None: "no outcome was recorded for this record",
        }[stop]
        results_path = self.scratch / RESULTS_FILE
        errors_path = self.scratch / ERRORS_FILE
        ok = failed = 0
        with results_path.open("w") as results, errors_path.open("w") as errors:
            for row in self.ledger.rows():
                if row.ok:
                    ok += 1
                    results.write(f"{row.body}\n")
                    continue
                failed += 1
                status = stop or "lost"
                body = row.body or error_line(
                    self._request_id(row.custom_id), row.custom_id, status, status, unanswered
                )
                errors.write(f"{body}\n")
        job = job.model_copy(
            update={
                "output_uri": self.store.put_output(job.job_id, RESULTS_FILE, results_path),
                "error_uri": self.store.put_output(job.job_id, ERRORS_FILE, errors_path),
            }
        )
        status = final_status(cancelled=stop == "cancelled", expired=stop == "expired")
        counts = BatchCounts(total=self.total, completed=ok, failed=failed)
        done = self._save(advance(job, status, self.now(), counts=counts))
        log.info(
            'batch job="%s" status="%s" completed="%d" failed="%d" forged_ignored="%d"',
            done.job_id,
            done.status.value,
            ok,
            failed,
            self.forged,
        )
        return done

    def _fail(self, code: str, message: str) -> BatchJob:
        return self._save(
            advance(self.job, BatchJobStatus.FAILED, self.now(), error=(code, message))
        )

    # ------------------------------------------------------------- helpers

    def _request_id(self, custom_id: str) -> uuid.UUID:
        return request_id(self.job.job_id, custom_id, self.job_key)

    def _stop_reason(self) -> str | None:
        if self.store.cancel_request(self.job.job_id) is not None:
            return "cancelled"
        if self.job.expires_at is not None and self.now() >= self.job.expires_at:
            return "expired"
        return None

    def _progress_due(self) -> bool:
        now = time.monotonic()
        if now - self._last_progress < self.settings.batch.progress_interval_s:
            return False
        self._last_progress = now
        return True

    def _report_progress(self) -> None:
        counts = BatchCounts(total=self.total, completed=self.ledger.ok, failed=self.ledger.failed)
        self._save(self.job.model_copy(update={"counts": counts}))

    def _save(self, job: BatchJob) -> BatchJob:
        self.job = self.store.save(job)
        if self.on_progress is not None:
            self.on_progress(self.job)
        return self.job

    def _rejected_line(self, custom_id: str, error: UnservableLine) -> str:
        return error_line(
            self._request_id(custom_id),
            custom_id,
            ResultStatus.REJECTED.value,
            error.refusal.reason_code,
            f"line {error.line}: {error.refusal.message}",
        )

    # ---------------------------------------------------------------- kafka

    def _transactional_producer(self) -> Producer:
        producer = clients.producer(
            self.settings.kafka,
            role=ProducerRole.TRANSACTIONAL,
            # One id per job: a second runner of the same job fences the first.
            transactional_id=f"{self.settings.namespace}.batch-runner.{self.job.job_id}",
            transaction_timeout_ms=int(_TRANSACTION_TIMEOUT_S * 1000),
        )
        producer.init_transactions(_TRANSACTION_TIMEOUT_S)
        return producer

    def _first_checkpoint(self, producer: Producer) -> Checkpoint:
        """Where outcomes start: the topics' ends, taken before the first record goes out."""
        checkpoint = Checkpoint(
            0,
            end_offsets(self.settings.kafka, self.topics.results),
            end_offsets(self.settings.kafka, self.topics.dlq),
            new_job_key(),
        )
        producer.begin_transaction()
        _produce(producer, self.progress_topic, checkpoint.encode(), self.job.job_id.encode(), [])
        producer.commit_transaction(_TRANSACTION_TIMEOUT_S)
        return checkpoint

    def _latest_checkpoint(self) -> Checkpoint | None:
        """The job's last committed checkpoint (the compacted topic read to its end)."""
        consumer = self._consumer()
        try:
            partition = TopicPartition(self.progress_topic, 0, 0)
            _, high = consumer.get_watermark_offsets(partition, timeout=15)
            if high == 0:
                return None
            consumer.assign([partition])
            latest: Checkpoint | None = None
            deadline = time.monotonic() + 60
            key = self.job.job_id.encode()
            while time.monotonic() < deadline:
                message = consumer.poll(0.5)
                if (
                    message is not None
                    and message.error() is None
                    and message.key() == key
                    and message.value()
                ):
                    latest = Checkpoint.decode(message.value() or b"")
                position = consumer.position([partition])[0].offset
                if position >= high:
                    return latest
                if message is None:
                    # Committed reads stop short of another runner's open transaction (or
                    # of the markers ending it): wait for it, it commits every chunk.
                    _, high = consumer.get_watermark_offsets(partition, timeout=15)
            raise SluicewayError(f"could not read {self.progress_topic} to its end in 60 s")
        finally:
            consumer.close()

    def _outcome_consumer(self, checkpoint: Checkpoint) -> Consumer:
        for partition, offset in checkpoint.results_from.items():
            self._read_from[(self.topics.results, partition)] = offset
        for partition, offset in checkpoint.dead_letters_from.items():
            self._read_from[(self.topics.dlq, partition)] = offset
        consumer = self._consumer()
        consumer.assign(
            [TopicPartition(self.topics.results, p, o) for p, o in checkpoint.results_from.items()]
            + [
                TopicPartition(self.topics.dlq, p, o)
                for p, o in checkpoint.dead_letters_from.items()
            ]
        )
        return consumer

    def _consumer(self) -> Consumer:
        return clients.consumer(
            self.settings.kafka,
            group_id=f"{self.settings.namespace}.batch-runner.{self.job.job_id}",
            role=ConsumerRole.COMMITTED,
        )


def _letter_request_id(letter: DeadLetter, codec: AvroCodec) -> str | None:
    """The request id a dead letter is about: its own field, else the original request's."""
    if letter.request_id is not None:
        return letter.request_id
    if letter.original_value is None:
        return None
    try:
        return str(codec.decode(letter.original_value, InferenceRequest).request_id)
    except DecodeError:
        return None


def _produce(
    producer: Producer,
    topic: str,
    value: bytes,
    key: bytes,
    headers: list[tuple[str, str | bytes | None]],
) -> None:
    while True:
        try:
            producer.produce(topic, value, key, headers=headers)
            return
        except BufferError:
            producer.poll(0.05)  # the local queue is full: let deliveries drain it
