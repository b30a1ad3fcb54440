"""OutcomeSink: outcomes in, acknowledged offsets out.

Every record ends here in exactly one outcome on a topic the worker owns: an ``ok`` result
(after its segment is stored), an ``expired`` or ``rejected`` result, or a dead letter. An
allowed ``reply_to`` gets the same answer when its topic exists. A record's offset is marked
done in the tracker only once its outcome is acknowledged by the broker.

1. Segments are written with retries until the object store takes them; a segment the store
   refuses for good (a key it will not accept) dead-letters its records instead.
2. A dead letter whose original is too large to carry stores the original first and points
   at it; building a letter cannot fail (see ``contracts.build_dead_letter``).
3. Results and letters are delivered and awaited; replies are delivered beside them, and a
   reply that cannot be delivered is counted and logged, never the record's outcome.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from pipeline import tracing
from pipeline.backends import RowOutput
from pipeline.kafka.exceptions import DeliveryError
from pipeline.kafka.ports import ProducerPort
from pipeline.kafka.producer import OutgoingMessage
from pipeline.kafka.watermark import OffsetTracker
from pipeline.metrics import WorkerMetrics
from pipeline.payload_log import PayloadLogger
from pipeline.privacy import FeaturePolicy, original_policy
from pipeline.resilience import RetryPolicy
from pipeline.settings import Settings
from pipeline.storage.exceptions import ObjectKeyRefused, ObjectStoreError
from pipeline.storage.segments import Segment, build_segment
from pipeline.topics import ModelTopics
from schemas.models import InferenceRequest
from workers.inference import contracts
from workers.inference.intake import Record, Refusal
from workers.inference.serving import RecordFailure

log = logging.getLogger("sluiceway.worker.sink")

REPLY_TOPIC_CACHE = 1024
"""Reply topics whose existence is remembered; the oldest are forgotten first."""
REPLY_TOPIC_KNOWN_S = 300.0
REPLY_TOPIC_MISSING_S = 10.0


class ObjectWriter(Protocol):
    """What the sink needs of the object store (``SegmentStore`` fits)."""

    @property
    def bucket(self) -> str: ...

    async def put(self, segment: Segment) -> str: ...

    async def put_bytes(self, key: str, body: bytes, content_type: str) -> str: ...


class ReplyTopics:
    """A bounded memory of which reply topics exist, so a reply never waits on a missing one.

    Producing into a topic that does not exist would either create it (where the broker
    auto-creates topics) or hold the reply until librdkafka gives up; in exactly-once mode
    the failed reply would doom the whole transaction.
    """

    def __init__(
        self,
        exists: Callable[[str], bool],
        clock: Callable[[], float] = time.monotonic,
        capacity: int = REPLY_TOPIC_CACHE,
    ) -> None:
        self._exists = exists
        self._clock = clock
        self._capacity = capacity
        self._known: OrderedDict[str, tuple[bool, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._known)

    def cached(self, topic: str) -> bool | None:
        entry = self._known.get(topic)
        if entry is None or entry[1] < self._clock():
            return None
        self._known.move_to_end(topic)
        return entry[0]

    def look_up(self, topic: str) -> bool:
        """Ask (blocking: call it off the event loop) and remember the answer."""
        try:
            found = self._exists(topic)
        except Exception as error:
            log.warning('reply topic look-up failed topic="%s" error="%s"', topic, error)
            found = False
        ttl = REPLY_TOPIC_KNOWN_S if found else REPLY_TOPIC_MISSING_S
        self._known[topic] = (found, self._clock() + ttl)
        self._known.move_to_end(topic)
        while len(self._known) > self._capacity:
            self._known.popitem(last=False)
        return found


@dataclass(frozen=True, slots=True)
class _Answer:
    """One record's outcome message, and its reply where it gets one."""

    partition_key: tuple[str, int]
    offset: int
    message: OutgoingMessage
    reply: OutgoingMessage | None
    """Sent to the request's (allowed) reply topic when that topic exists."""


class OutcomeSink:
    def __init__(
        self,
        settings: Settings,
        producer: ProducerPort,
        store: ObjectWriter,
        tracker: OffsetTracker,
        metrics: WorkerMetrics,
        replies: ReplyTopics,
        *,
        worker_id: str,
        retry: RetryPolicy,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        run_blocking: Callable[[Callable[[], Any]], Awaitable[Any]] | None = None,
    ) -> None:
        self._settings = settings
        self._producer = producer
        self._store = store
        self._tracker = tracker
        self._metrics = metrics
        self._replies = replies
        self._worker_id = worker_id
        self._retry = retry
        self._clock = clock
        self._sleep = sleep
        self._run_blocking = run_blocking or _to_thread
        self._topics: dict[str, ModelTopics] = {}
        self.results = 0
        self.dead_lettered = 0
        self._letter_limits = letter_limits(
            settings.workers.max_message_bytes, settings.workers.dead_letter_inline_bytes
        )
        self._policies: dict[str, FeaturePolicy] = {}
        self._originals = original_policy(settings)
        self._payload_log = PayloadLogger(settings, producer, store)

    def policy(self, model: str) -> FeaturePolicy:
        """The model's personal data policy: applied to everything this sink sends out."""
        found = self._policies.get(model)
        if found is None:
            found = self._policies[model] = feature_policy(self._settings, model)
        return found

    def _key_of(self, message: Any) -> bytes | str | None:
        """The original key, unless too large to travel with an outcome (then none: the
        outcome must fit the producer's limit; the key is in the dead letter's account)."""
        key = message.key()
        if key is None or len(key) <= self._letter_limits["key_limit"]:
            return key  # type: ignore[no-any-return]
        return None

    def topics(self, model: str) -> ModelTopics:
        found = self._topics.get(model)
        if found is None:
            found = self._topics[model] = ModelTopics(self._settings.namespace, model)
        return found

    # ------------------------------------------------------------------ outcomes

    async def served(
        self,
        model: str,
        version: str | None,
        served: Sequence[tuple[Record, RowOutput]],
        backend_s: float,
    ) -> None:
        """Segment first, then results; the offsets complete only when both are acknowledged."""
        served_version = version or "latest"
        model_settings = self._settings.models[model]
        policy = self.policy(model)
        ids = [contracts.request_id(record.request) for record, _ in served]
        full = [
            contracts.full_record(
                r.request,
                out,
                model,
                served_version,
                model_settings.feature_order,
                request_id,
                policy,
            )
            for (r, out), request_id in zip(served, ids, strict=True)
        ]
        segment = build_segment(model, served_version, full, ids, datetime.now(UTC))
        try:
            etag = await tracing.traced(
                self._put_until_stored(segment.key, lambda: self._store.put(segment)),
                tracing.SEGMENT_WRITE,
                {"sluiceway.segment.key": segment.key, "sluiceway.records": len(full)},
            )
        except ObjectStoreError as error:
            failures = [
                RecordFailure(record, "store_refused", str(error), type(error).__name__, 1)
                for record, _ in served
            ]
            await self.failed(model, failures)
            return
        now = self._clock()
        answers = []
        for (record, output), span in zip(served, segment.spans, strict=True):
            result = contracts.ok_result(
                record.request,
                output,
                model=model,
                version=served_version,
                worker_id=self._worker_id,
                feature_names=model_settings.feature_order,
                bucket=self._store.bucket,
                key=segment.key,
                etag=etag,
                offset=span.offset,
                length=span.length,
                queued_ms=(now - record.received_at - backend_s) * 1000,
                backend_ms=backend_s * 1000,
                total_ms=(now - record.received_at) * 1000,
                echo_features=model_settings.echo_features,
                policy=policy,
            )
            answers.append(self._result_answer(model, record, result))
        await tracing.traced(
            self._deliver(answers),
            tracing.OUTCOME_PRODUCE,
            {"sluiceway.status": "ok", "sluiceway.records": len(answers)},
        )
        self._count(model, "ok", len(answers))
        if self._payload_log.logs(model):
            await self._payload_log.served(
                model, served_version, [r.request for r, _ in served], full, policy
            )

    async def expired(self, records: Sequence[Record]) -> None:
        by_model: dict[str, list[_Answer]] = {}
        for record in records:
            result = contracts.expired_result(
                record.request,
                model=record.model,
                worker_id=self._worker_id,
                echo_features=self._settings.models[record.model].echo_features,
                policy=self.policy(record.model),
            )
            by_model.setdefault(record.model, []).append(
                self._result_answer(record.model, record, result)
            )
        for model, answers in by_model.items():
            await self._deliver(answers)
            self._count(model, "expired", len(answers))

    async def failed(self, model: str, failures: Sequence[RecordFailure]) -> None:
        """Records the backend (or the store) refused for good: dead letters."""
        await self.refused(
            [
                Refusal(
                    f.record.message,
                    model,
                    f.reason,
                    f.detail,
                    f.error_class,
                    dead_letter=True,
                    request=f.record.request,
                    reply_to=f.record.reply_to,
                    attempts=f.attempts,
                )
                for f in failures
            ]
        )

    async def refused(self, refusals: Sequence[Refusal]) -> None:
        """Dead letters for bad records, ``rejected`` results for refused requests."""
        answers: list[_Answer] = []
        now_ms = int(time.time() * 1000)
        for refusal in refusals:
            answers.append(await self._refusal_answer(refusal, now_ms))
        await self._deliver(answers)
        for refusal in refusals:
            if refusal.dead_letter:
                self.dead_lettered += 1
                self._metrics.dead_lettered.labels(refusal.model, refusal.reason).inc()
            else:
                self.results += 1
                self._metrics.rejected.labels(refusal.model, refusal.reason).inc()
                self._metrics.produced.labels(refusal.model, "rejected").inc()
            log.info(
                'refused model="%s" reason="%s" dlq="%s" partition="%s[%s]" offset="%s"',
                refusal.model,
                refusal.reason,
                refusal.dead_letter,
                refusal.message.topic(),
                refusal.message.partition(),
                refusal.message.offset(),
            )

    # ------------------------------------------------------------------ building

    def _result_answer(self, model: str, record: Record, result: Any) -> _Answer:
        value, headers = contracts.encode_result(result)
        key = self._key_of(record.message)
        message = OutgoingMessage(self.topics(model).results, value, key, headers)
        reply = (
            None
            if record.reply_to is None
            else OutgoingMessage(record.reply_to, value, key, headers)
        )
        return _Answer(record.partition_key, record.offset, message, reply)

    async def _refusal_answer(self, refusal: Refusal, now_ms: int) -> _Answer:
        request = refusal.request
        reply = None
        if request is not None:
            value, headers = contracts.encode_result(self._rejected(refusal, request))
            key = self._key_of(refusal.message)
            if refusal.reply_to is not None:
                reply = OutgoingMessage(refusal.reply_to, value, key, headers)
            if not refusal.dead_letter:
                topic = self.topics(refusal.model).results
                message = OutgoingMessage(topic, value, key, headers)
                return _Answer(refusal.partition_key, refusal.offset, message, reply)
        draft = contracts.build_dead_letter(
            refusal.message,
            refusal.reason,
            refusal.detail,
            refusal.error_class,
            refusal.attempts,
            now_ms,
            model=refusal.model,
            worker_id=self._worker_id,
            request_id=None if request is None else contracts.request_id(request),
            bucket=self._store.bucket,
            **self._letter_limits,
            originals=self._originals,
            policy=self.policy(refusal.model),
            features=None if request is None else request.inputs.features,
        )
        if draft.offload_key is not None and draft.offload_body is not None:
            body, key = draft.offload_body, draft.offload_key
            await self._put_until_stored(
                key, lambda: self._store.put_bytes(key, body, "application/octet-stream")
            )
        message = OutgoingMessage(
            self.topics(refusal.model).dlq,
            draft.value,
            self._key_of(refusal.message),
            draft.headers,
        )
        return _Answer(refusal.partition_key, refusal.offset, message, reply)

    def _rejected(self, refusal: Refusal, request: InferenceRequest) -> Any:
        return contracts.rejected_result(
            request,
            model=refusal.model,
            worker_id=self._worker_id,
            code=refusal.reason,
            message=refusal.detail,
            policy=self.policy(refusal.model),
        )

    # ------------------------------------------------------------------ delivery

    async def _deliver(self, answers: Sequence[_Answer]) -> None:
        """Deliver outcomes (and replies); mark the offsets done once outcomes are acked."""
        if not answers:
            return
        replies = await self._replies_for(answers)
        delivered = self._submit_until_acked([a.message for a in answers])
        if replies:
            outcome, reply_outcome = await asyncio.gather(
                delivered, self._producer.submit_all(replies), return_exceptions=True
            )
            if isinstance(reply_outcome, BaseException):
                self._metrics.replies_skipped.labels("delivery_failed").inc(len(replies))
                log.warning('reply delivery failed error="%s"', reply_outcome)
            if isinstance(outcome, BaseException):
                raise outcome
        else:
            await delivered
        for answer in answers:
            self._tracker.complete(answer.partition_key[0], answer.partition_key[1], answer.offset)

    async def _submit_until_acked(self, messages: Sequence[OutgoingMessage]) -> None:
        """Outcomes must reach the broker: librdkafka retried within its delivery timeout,
        so the broker has been gone for long. Try again (the offset stays uncommitted) rather
        than skip an outcome or stop. In exactly-once mode the transaction is doomed by a
        failed delivery, so that is the worker's to stop on."""
        attempts = 0
        while True:
            try:
                await self._producer.submit_all(messages)
                return
            except DeliveryError as error:
                if self._settings.workers.exactly_once or not error.transient:
                    raise
                attempts += 1
                log.error('delivery failed topic="%s" error="%s"; retrying', error.topic, error)
                await self._sleep(min(self._retry.max_delay_s, 0.5 * attempts))

    async def _replies_for(self, answers: Sequence[_Answer]) -> list[OutgoingMessage]:
        replies = []
        for answer in answers:
            if answer.reply is None:
                continue
            topic = answer.reply.topic
            exists = self._replies.cached(topic)
            if exists is None:
                exists = bool(
                    await self._run_blocking(functools.partial(self._replies.look_up, topic))
                )
                self._metrics.known_reply_topics.set(len(self._replies))
            if not exists:
                self._metrics.replies_skipped.labels("unknown_topic").inc()
                continue
            replies.append(answer.reply)
        return replies

    async def _put_until_stored(self, key: str, put: Callable[[], Awaitable[str]]) -> str:
        """Retry while the store is away; raise only when it refuses the object for good."""
        attempts = 0
        started = self._clock()
        while True:
            attempts += 1
            try:
                return await put()
            except ObjectKeyRefused:
                raise
            except ObjectStoreError as error:
                delay = (
                    self._retry.next_delay(attempts, self._clock() - started)
                    if error.transient
                    else None
                )
                if delay is None:
                    delay = self._retry.max_delay_s  # the object store must come back
                log.warning(
                    'object="%s" put failed error="%s" retry_in_s="%.2f"', key[:200], error, delay
                )
                await self._sleep(delay)

    def _count(self, model: str, status: str, count: int) -> None:
        self.results += count
        self._metrics.produced.labels(model, status).inc(count)


def feature_policy(settings: Settings, model: str) -> FeaturePolicy:
    """``models.<model>.pii`` with the hash key, ready to apply."""
    key = settings.workers.pii_hash_key
    return FeaturePolicy(
        dict(settings.models[model].pii),
        None if key is None else key.get_secret_value().encode(),
    )


def letter_limits(max_message_bytes: int, dead_letter_inline_bytes: int) -> dict[str, int]:
    """Limits that keep a dead letter under the worker's producer limit (the request limit
    plus 64 KiB): half the request limit for the original value, a quarter for headers, an
    eighth for the key; the rest of the letter (reason, ids) fits in the 64 KiB."""
    return {
        "inline_limit": min(dead_letter_inline_bytes, max_message_bytes // 2),
        "header_budget": min(contracts.MAX_LETTER_HEADER_BYTES, max_message_bytes // 4),
        "key_limit": min(contracts.MAX_LETTER_KEY_BYTES, max_message_bytes // 8),
    }


async def _to_thread(fn: Callable[[], Any]) -> Any:
    return await asyncio.to_thread(fn)
