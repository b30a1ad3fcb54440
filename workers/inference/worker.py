"""The inference worker: Kafka requests in, micro-batches to a backend, outcomes out.

One asyncio loop owns all state; confluent-kafka's consumer runs on one dedicated thread
(every consumer call goes through it, rebalance callbacks included), the producer acknowledges
through futures, and the object store writes on a small thread pool.

Life of a record:

1. Consumed: its offset is tracked in the partition's watermark.
2. Decoded and validated; anything wrong goes to the DLQ with a reason at once.
3. Queued in the micro-batcher under (model, serving version); real-time ahead of bulk.
4. Served in a batch: one backend call (retried with backoff while transient, never past the
   deadline), one segment object, one result per request (and one on ``reply_to``).
5. Completed when every outcome is acknowledged; the committer then commits the partition's
   low watermark. An expired request is answered ``expired``; a transient outage never
   dead-letters: the breaker opens, partitions pause, and the batch waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from pipeline.backends import Backend, BackendError, RowOutput
from pipeline.batching import Batch, Lane, MicroBatcher, Pending
from pipeline.batching.governor import BulkGovernor
from pipeline.kafka.admin import end_offsets_with
from pipeline.kafka.exceptions import TopicAdminError
from pipeline.kafka.producer import AsyncProducer, DeliveryError, OutgoingMessage
from pipeline.kafka.watermark import OffsetTracker
from pipeline.metrics import BREAKER_STATE_VALUES, WorkerMetrics
from pipeline.resilience import BreakerState, CircuitBreaker, RetryPolicy
from pipeline.routing import RoutingTable
from pipeline.settings import Settings, SettingsError
from pipeline.storage.exceptions import ObjectStoreError
from pipeline.storage.segments import build_segment
from pipeline.storage.store import SegmentStore
from pipeline.topics import ModelTopics, control_topic
from workers.inference import contracts
from workers.inference.contracts import RejectedRecord
from workers.inference.control import ControlFollower

log = logging.getLogger("sluiceway.worker")

BatchKey = tuple[str, str | None]  # (model, version)
CONTROL_POLL_INTERVAL_S = 0.2
LAG_INTERVAL_S = 5.0
LAG_QUERY_TIMEOUT_S = 3.0
"""Lag asks the broker for each partition's end offset, so it is refreshed less often."""
REALTIME_ACTIVE_S = 1.0
"""Real-time traffic counts as flowing for this long after its last record arrived."""
SATURATION_PAUSE_AFTER_S = 5.0
"""How long the worker stops polling when saturated before it pauses its partitions instead.

A short saturation (the common case at full load) just skips polling: librdkafka keeps its
bounded prefetch, so records flow again the moment outcomes complete. Pausing would drop that
prefetch, and the refetch after resuming was measured at 0.3-0.7 s of idle worker each time.
A long saturation (an object store outage) pauses, so the worker polls again and keeps its
place in the consumer group (``max.poll.interval.ms``).
"""


@dataclass(slots=True)
class Record:
    """A consumed record on its way through the worker."""

    message: Message
    request: contracts.Request
    row: Any
    received_at: float
    attempts: int = 0
    first_failure_ms: int | None = None

    @property
    def position(self) -> tuple[str, int, int]:
        return (
            str(self.message.topic()),
            int(self.message.partition() or 0),
            int(self.message.offset() or 0),
        )


@dataclass
class WorkerStats:
    consumed: int = 0
    results: int = 0
    dead_lettered: int = 0
    expired: int = 0
    batches: int = 0
    commits: int = 0
    retries: int = 0
    paused: set[tuple[str, int]] = field(default_factory=set)


def worker_group_id(namespace: str, models: Sequence[str]) -> str:
    """The consumer group of a worker serving ``models``: one group per set of models."""
    return f"{namespace}.worker.{'-'.join(sorted(models))}"


class InferenceWorker:
    """Serves the named models until :meth:`stop` is called or the task is cancelled."""

    def __init__(
        self,
        settings: Settings,
        models: Sequence[str],
        backends: Mapping[str, Backend],
        store: SegmentStore,
        *,
        routing: RoutingTable | None = None,
        retry: RetryPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        group_id: str | None = None,
    ) -> None:
        unknown = [m for m in models if m not in settings.models]
        if unknown:
            raise SettingsError(f"models not in settings.models: {unknown}")
        self.settings = settings
        self.models = list(models)
        self.backends = dict(backends)
        self.store = store
        self.routing = routing or RoutingTable(
            {m: v for m in models if (v := settings.models[m].default_version) is not None}
        )
        self.retry = retry or RetryPolicy()
        self.clock = clock
        self.worker_id = settings.workers.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.group_id = group_id or worker_group_id(settings.namespace, models)
        self.topics = {m: ModelTopics(settings.namespace, m) for m in models}
        self.metrics = WorkerMetrics()
        self.stats = WorkerStats()
        workers = settings.workers
        self.batcher: MicroBatcher[BatchKey, Record] = MicroBatcher(
            workers.max_batch_size, workers.max_wait_ms / 1000.0, clock
        )
        self.tracker = OffsetTracker()
        self.breakers: dict[tuple[str, str], CircuitBreaker] = {}
        self._in_flight_batches: dict[str, int] = dict.fromkeys(
            {self._backend_name(m) for m in models}, 0
        )
        self._in_flight_bulk_batches: dict[str, int] = dict.fromkeys(self._in_flight_batches, 0)
        self.governor = BulkGovernor(
            clock,
            target_s=workers.realtime_latency_target_ms / 1000.0,
            active_window_s=REALTIME_ACTIVE_S,
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._consumer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="consumer")
        self._lag_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lag")
        self._lag_query: Future[None] | None = None
        self._lag_admin: AdminClient | None = None
        self._consumer: Consumer | None = None
        self._producer: AsyncProducer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_commit = 0.0
        self._last_control_poll = 0.0
        self._last_lag_update = 0.0
        self._control: ControlFollower | None = None
        self._fatal: BaseException | None = None
        self._assignment: set[tuple[str, int]] = set()
        self._saturated_since: float | None = None
        self._topic_models: dict[str, str] = {}

    # ----------------------------------------------------------------- wiring

    def _backend_name(self, model: str) -> str:
        return self.settings.models[model].backend

    def _breaker(self, model: str) -> CircuitBreaker:
        backend = self.backends[self._backend_name(model)]
        key = (backend.endpoint, model)
        if key not in self.breakers:
            name = f"{backend.endpoint}/{model}"
            self.breakers[key] = CircuitBreaker(
                name, clock=self.clock, on_state_change=self._on_breaker
            )
            self.metrics.breaker_state.labels(name).set(0)
        return self.breakers[key]

    def _on_breaker(self, name: str, old: BreakerState, new: BreakerState) -> None:
        log.warning('breaker="%s" from="%s" to="%s"', name, old.value, new.value)
        self.metrics.breaker_state.labels(name).set(BREAKER_STATE_VALUES[new.value])

    def _consumer_config(self) -> dict[str, Any]:
        return {
            **self.settings.kafka.client_config(),
            "group.id": self.group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "partition.assignment.strategy": "cooperative-sticky",
            "max.poll.interval.ms": 300_000,
            # Small prefetch: records already fetched are served in arrival order, so a large
            # prefetched run of batch-job records would hold real-time records back behind it.
            "max.partition.fetch.bytes": 64 * 1024,
            "fetch.max.bytes": 1024 * 1024,  # librdkafka: at least message.max.bytes
            "queued.max.messages.kbytes": 1024,
        }

    def _producer_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            **self.settings.kafka.client_config(),
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 2,
            "compression.type": "lz4",
            "message.max.bytes": self.settings.workers.max_message_bytes + 65536,
        }
        if self.settings.workers.exactly_once:
            config["transactional.id"] = f"{self.group_id}-{self.worker_id}"
            config["transaction.timeout.ms"] = 15_000
        return config

    async def _on_consumer(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._consumer_thread, fn, *args)

    # ------------------------------------------------------------- main loop

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> WorkerStats:
        """Consume, batch, serve and commit until stopped; then drain and let go."""
        self._loop = asyncio.get_running_loop()
        self._producer = AsyncProducer(self._producer_config())
        if self.settings.workers.exactly_once:
            await self._on_consumer(self._producer.raw.init_transactions, 30)
            self._producer.raw.begin_transaction()
        self._control = ControlFollower(
            self.settings.kafka.client_config(),
            control_topic(self.settings.namespace),
            self.routing,
        )
        await self._on_consumer(self._control.poll, 1.0)
        self._consumer = Consumer(self._consumer_config())
        topics = [t.requests for t in self.topics.values()] + [
            t.batch for t in self.topics.values()
        ]
        self._consumer.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke)
        log.info(
            'worker="%s" group="%s" topics="%s" starting', self.worker_id, self.group_id, topics
        )
        try:
            while not self._stop.is_set():
                await self._step()
            if self._fatal is None:
                await self._drain(flush_all=True)
                await self._commit()
        finally:
            if self._fatal is None:
                await self._on_consumer(self._consumer.close)
            if self._control is not None:
                await self._on_consumer(self._control.close)
            remaining = self._producer.close(timeout_s=5 if self._fatal else 30)
            self._consumer_thread.shutdown(wait=self._fatal is None)
            self._lag_thread.shutdown(wait=False, cancel_futures=True)
            log.info('worker="%s" stopped undelivered="%d"', self.worker_id, remaining)
        if self._fatal is not None:
            raise self._fatal
        return self.stats

    async def _step(self) -> None:
        assert self._consumer is not None
        wait = self.batcher.next_due_in()
        # A batch still due after dispatching waits for a slot or the governor: poll briefly
        # instead of spinning (a new record still ends the poll at once).
        timeout = 0.05 if wait is None else min(max(wait, 0.002), 0.05)
        messages: list[Message] = []
        if not self._saturated():
            messages = await self._on_consumer(self._fetch, timeout)
        elif self._saturated_for_long():
            # Paused first, so the poll that keeps the group membership brings no records.
            await self._apply_backpressure()
            messages = await self._on_consumer(self._fetch, timeout)
        else:
            await self._await_outcomes(min(timeout, 0.01))
        consumed: dict[str, int] = {}
        for message in messages:
            topic = self._accept(message)
            if topic is not None:
                consumed[topic] = consumed.get(topic, 0) + 1
        for topic, count in consumed.items():
            self.metrics.consumed.labels(topic).inc(count)
        if self._control and self.clock() - self._last_control_poll >= CONTROL_POLL_INTERVAL_S:
            self._last_control_poll = self.clock()
            await self._on_consumer(self._control.poll, 0.0)
        self._dispatch()
        await self._apply_backpressure()
        if self.clock() - self._last_commit >= self.settings.workers.commit_interval_ms / 1000:
            await self._commit()
        lag_idle = self._lag_query is None or self._lag_query.done()
        if lag_idle and self.clock() - self._last_lag_update >= LAG_INTERVAL_S:
            self._last_lag_update = self.clock()
            positions = await self._on_consumer(self._positions)
            # Asking the broker takes round trips: never on the loop or the consumer thread,
            # where it would hold every request back while it waits.
            self._lag_query = self._lag_thread.submit(self._update_lag, positions)

    def _fetch(self, timeout_s: float) -> list[Message]:
        """Up to 500 records; returns as soon as one arrives rather than when 500 have.

        ``consume(500, timeout)`` alone holds the first record back until the batch fills or
        the timeout passes, which adds up to the timeout to every record's latency when
        traffic is light.
        """
        assert self._consumer is not None
        first = self._consumer.poll(timeout_s)
        if first is None:
            return []
        return [first, *self._consumer.consume(499, 0)]

    def _saturated(self) -> bool:
        """Too many records without an outcome: take no more until some complete."""
        saturated = self.tracker.in_flight() >= self.settings.workers.max_in_flight_records
        if not saturated:
            self._saturated_since = None
        elif self._saturated_since is None:
            self._saturated_since = self.clock()
        return saturated

    def _saturated_for_long(self) -> bool:
        """Saturated past ``SATURATION_PAUSE_AFTER_S``: time to pause instead of not polling."""
        since = self._saturated_since
        return since is not None and self.clock() - since >= SATURATION_PAUSE_AFTER_S

    async def _await_outcomes(self, timeout_s: float) -> None:
        if self._tasks:
            await asyncio.wait(
                set(self._tasks), timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        else:
            await asyncio.sleep(timeout_s)

    # ------------------------------------------------------------ intake

    def _accept(self, message: Message) -> str | None:
        """Track, decode and queue one consumed record; return its topic (``None``: no record)."""
        if message.error() is not None:
            log.warning('consumer error="%s"', message.error())
            return None
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        assert topic is not None
        assert partition is not None
        assert offset is not None
        self.tracker.track(topic, partition, offset)
        self.stats.consumed += 1
        model = self._model_of_topic(topic)
        try:
            request = contracts.decode_request(
                message.value() or b"", self.settings.workers.max_message_bytes
            )
            contracts.check_model(request, model)
            row = contracts.to_row(request, self.settings.models[model])
        except RejectedRecord as rejected:
            self._spawn(
                self._dead_letter(
                    [message], model, rejected.reason, str(rejected), rejected.error_class, 0
                )
            )
            return topic
        except Exception as error:
            # A record that breaks the decoder in a way no rule foresaw is still bad input:
            # it goes to the DLQ under its own reason, and the log keeps the trace for a fix.
            log.exception('unforeseen decode failure topic="%s" offset="%s"', topic, offset)
            self._spawn(
                self._dead_letter(
                    [message], model, "unprocessable", str(error), type(error).__name__, 0
                )
            )
            return topic
        record = Record(message, request, row, self.clock())
        version = contracts.pinned_version(request) or self.routing.version_for(
            model, contracts.routing_key(request, message)
        )
        lane = Lane.BULK if topic == self.topics[model].batch else Lane.REALTIME
        if lane is Lane.REALTIME:
            self.governor.realtime_arrived()
        self.batcher.add((model, version), record, lane=lane, deadline=self._deadline(request))
        return topic

    def _model_of_topic(self, topic: str) -> str:
        model = self._topic_models.get(topic)
        if model is None:  # computed once per topic: this runs for every record
            model = topic[len(self.settings.namespace) + 1 :].rsplit(".", 1)[0]
            self._topic_models[topic] = model
        return model

    def _deadline(self, request: contracts.Request) -> float | None:
        deadline_ms = contracts.deadline_ms(request)
        if deadline_ms is None:
            return None
        return self.clock() + (deadline_ms / 1000.0 - time.time())

    # ---------------------------------------------------------- dispatch

    def _dispatch(self, *, flush: bool = False) -> None:
        limit = self.settings.workers.max_in_flight_batches
        partial_limit = self.settings.workers.max_in_flight_partial_batches
        bulk_limit = self._bulk_batch_limit()

        def servable(key: BatchKey) -> bool:
            backend = self._backend_name(key[0])
            return (
                self._in_flight_batches[backend] < limit
                and self._breaker(key[0]).state is not BreakerState.OPEN
            )

        def partial_servable(key: BatchKey, lane: Lane) -> bool:
            if lane is Lane.BULK:
                return True  # batch-job calls have their own limit (bulk_servable)
            backend = self._backend_name(key[0])
            realtime_calls = (
                self._in_flight_batches[backend] - self._in_flight_bulk_batches[backend]
            )
            return partial_limit is None or realtime_calls < partial_limit

        def bulk_servable(key: BatchKey) -> bool:
            return (
                self._in_flight_bulk_batches[self._backend_name(key[0])] < bulk_limit
                and self.governor.bulk_wait_s() == 0.0
            )

        while True:
            batches, expired = self.batcher.take_due(
                limit=1,
                flush=flush,
                accept=servable,
                accept_bulk_only=bulk_servable,
                accept_partial=None if partial_limit is None else partial_servable,
            )
            if expired:
                self._spawn(self._answer_expired([p.item for p in expired]))
            if not batches:
                return
            batch = batches[0]
            backend = self._backend_name(batch.key[0])
            self._in_flight_batches[backend] += 1
            bulk_only = all(pending.lane is Lane.BULK for pending in batch.items)
            if bulk_only:
                self._in_flight_bulk_batches[backend] += 1
                self.governor.bulk_dispatched()
            self._spawn(self._serve(batch, bulk_only=bulk_only))

    def _bulk_batch_limit(self) -> int:
        workers = self.settings.workers
        if self.governor.realtime_active():
            return workers.bulk_batches_beside_realtime
        return max(workers.max_in_flight_batches - workers.realtime_reserved_batches, 1)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        # An outcome that could not be delivered must not be skipped: stop, and let the
        # restart reprocess from the last committed offset.
        log.error("worker task failed; stopping", exc_info=task.exception())
        self._fatal = task.exception()
        self._stop.set()

    # ------------------------------------------------------------- serve

    async def _serve(self, batch: Batch[BatchKey, Record], *, bulk_only: bool) -> None:
        model, version = batch.key
        backend_name = self._backend_name(model)
        try:
            await self._serve_batch(batch, model, version)
        finally:
            self._in_flight_batches[backend_name] -= 1
            if bulk_only:
                self._in_flight_bulk_batches[backend_name] -= 1

    async def _serve_batch(
        self, batch: Batch[BatchKey, Record], model: str, version: str | None
    ) -> None:
        backend = self.backends[self._backend_name(model)]
        breaker = self._breaker(model)
        records = [pending.item for pending in batch.items]
        now = self.clock()
        queue_wait = self.metrics.queue_wait.labels(model)
        for pending in batch.items:
            queue_wait.observe(now - pending.enqueued_at)
        self.metrics.batch_size.labels(model).observe(len(records))
        started = self.clock()
        attempts = 0
        while True:
            if not breaker.allow():
                self.batcher.requeue(batch.key, batch.items)
                return
            attempts += 1
            call_started = self.clock()
            try:
                outputs = await backend.infer(model, version, [r.row for r in records])
            except BackendError as error:
                duration = self.clock() - call_started
                if not error.transient:
                    breaker.record_success(duration)  # the backend answered; the input is wrong
                    await self._dead_letter(
                        [r.message for r in records],
                        model,
                        error.reason,
                        str(error),
                        type(error).__name__,
                        attempts,
                    )
                    return
                breaker.record_failure(duration)
                delay = self.retry.next_delay(
                    attempts,
                    self.clock() - started,
                    self._time_left(batch.items),
                    not_before_s=getattr(error, "retry_after_s", None),
                )
                if delay is None:
                    # Out of retries, not out of hope: the batch waits for the backend.
                    self.batcher.requeue(batch.key, batch.items)
                    return
                self.stats.retries += 1
                self.metrics.retries.labels(backend.endpoint, model).inc()
                log.info(
                    'model="%s" retry="%d" delay_s="%.3f" reason="%s"',
                    model,
                    attempts,
                    delay,
                    error.reason,
                )
                await asyncio.sleep(delay)
                continue
            breaker.record_success(self.clock() - call_started)
            self.metrics.backend_latency.labels(backend.endpoint, model).observe(
                self.clock() - call_started
            )
            break
        served, retry_rows, rejected = self._split_outcomes(records, outputs)
        if retry_rows:
            retry_ids = {id(record) for record in retry_rows}
            self.batcher.requeue(batch.key, [p for p in batch.items if id(p.item) in retry_ids])
        for record, row_error in rejected:
            self._spawn(
                self._dead_letter(
                    [record.message],
                    model,
                    row_error.reason,
                    str(row_error),
                    type(row_error).__name__,
                    attempts,
                )
            )
        if served:
            await self._publish_results(model, version, served, backend_s=self.clock() - started)

    def _time_left(self, items: Sequence[Pending[Record]]) -> float | None:
        deadlines = [p.deadline for p in items if p.deadline is not None]
        return min(deadlines) - self.clock() if deadlines else None

    @staticmethod
    def _split_outcomes(
        records: Sequence[Record], outputs: Sequence[RowOutput | BackendError]
    ) -> tuple[list[tuple[Record, RowOutput]], list[Record], list[tuple[Record, BackendError]]]:
        if len(outputs) != len(records):
            raise RuntimeError(f"backend returned {len(outputs)} outputs for {len(records)} rows")
        served: list[tuple[Record, RowOutput]] = []
        retry: list[Record] = []
        rejected: list[tuple[Record, BackendError]] = []
        for record, output in zip(records, outputs, strict=True):
            if isinstance(output, BackendError):
                (retry.append(record) if output.transient else rejected.append((record, output)))
            else:
                served.append((record, output))
        return served, retry, rejected

    async def _publish_results(
        self,
        model: str,
        version: str | None,
        served: Sequence[tuple[Record, RowOutput]],
        backend_s: float,
    ) -> None:
        """Segment first, then results; the offsets complete only when both are acknowledged."""
        assert self._producer is not None
        served_version = version or "latest"
        model_settings = self.settings.models[model]
        ids = [contracts.request_id(r.request) for r, _ in served]
        full = [
            contracts.full_record(
                r.request, out, model, served_version, model_settings.feature_order, request_id
            )
            for (r, out), request_id in zip(served, ids, strict=True)
        ]
        segment = build_segment(model, served_version, full, ids, datetime.now(UTC))
        etag = await self._put_with_retry(segment)
        now = self.clock()
        outcomes = []
        for (record, output), span in zip(served, segment.spans, strict=True):
            result = contracts.ok_result(
                record.request,
                output,
                model=model,
                version=served_version,
                worker_id=self.worker_id,
                feature_names=model_settings.feature_order,
                bucket=self.store.bucket,
                key=segment.key,
                etag=etag,
                offset=span.offset,
                length=span.length,
                queued_ms=(now - record.received_at - backend_s) * 1000,
                backend_ms=backend_s * 1000,
                total_ms=(now - record.received_at) * 1000,
                echo_features=model_settings.echo_features,
            )
            outcomes.append((record, result))
        await self._send_outcomes(model, outcomes, "ok")
        self.stats.batches += 1

    async def _put_with_retry(self, segment: Any) -> str:
        attempts = 0
        started = self.clock()
        while True:
            attempts += 1
            try:
                return await self.store.put(segment)
            except ObjectStoreError as error:
                delay = (
                    self.retry.next_delay(attempts, self.clock() - started)
                    if error.transient
                    else None
                )
                if delay is None:
                    delay = self.retry.max_delay_s  # the object store must come back; keep trying
                log.warning(
                    'segment="%s" put failed error="%s" retry_in_s="%.2f"',
                    segment.key,
                    error,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _send_outcomes(
        self, model: str, outcomes: Sequence[tuple[Record, Any]], status: str
    ) -> None:
        """Produce each result (and its reply); complete the offsets once all are acked."""
        results_topic = self.topics[model].results
        messages: list[OutgoingMessage] = []
        for record, result in outcomes:
            value, headers = contracts.encode_result(result)
            key = record.message.key()
            messages.append(OutgoingMessage(results_topic, value, key, headers))
            reply_to = contracts.reply_to(record.request)
            if reply_to:
                messages.append(OutgoingMessage(reply_to, value, key, headers))
        await self._deliver(messages)
        self._observe_realtime_latency(model, [record for record, _ in outcomes])
        for record, _ in outcomes:
            self.tracker.complete(*record.position)
        self.stats.results += len(outcomes)
        self.metrics.produced.labels(model, status).inc(len(outcomes))

    def _observe_realtime_latency(self, model: str, records: Sequence[Record]) -> None:
        """Publish-to-outcome time of the slowest real-time record: what the governor steers."""
        now_ms = time.time() * 1000
        bulk_topic = self.topics[model].batch
        slowest = max(
            (
                now_ms - created_ms
                for record in records
                if record.message.topic() != bulk_topic
                for kind, created_ms in [record.message.timestamp()]
                if kind != TIMESTAMP_NOT_AVAILABLE
            ),
            default=None,
        )
        if slowest is not None:
            self.governor.observe_realtime(slowest / 1000.0)

    async def _deliver(self, messages: Sequence[OutgoingMessage]) -> None:
        assert self._producer is not None
        try:
            await self._producer.submit_all(messages)
        except DeliveryError as error:
            # librdkafka already retried within its delivery timeout: the broker is gone for
            # long. The offset stays uncommitted and the task failure stops the worker.
            log.error('delivery failed topic="%s" error="%s"', error.topic, error)
            raise

    async def _answer_expired(self, records: Sequence[Record]) -> None:
        by_model: dict[str, list[tuple[Record, Any]]] = {}
        for record in records:
            model = self._model_of_topic(str(record.message.topic()))
            result = contracts.expired_result(
                record.request,
                model=model,
                worker_id=self.worker_id,
                echo_features=self.settings.models[model].echo_features,
            )
            by_model.setdefault(model, []).append((record, result))
        for model, outcomes in by_model.items():
            await self._send_outcomes(model, outcomes, "expired")
        self.stats.expired += len(records)

    async def _dead_letter(
        self,
        messages: Sequence[Message],
        model: str,
        reason: str,
        detail: str,
        error_class: str,
        attempts: int,
    ) -> None:
        now_ms = int(time.time() * 1000)
        letters = []
        for message in messages:
            value, headers = contracts.encode_dead_letter(
                message,
                reason,
                detail,
                error_class,
                attempts,
                now_ms,
                model=model,
                worker_id=self.worker_id,
            )
            letters.append(OutgoingMessage(self.topics[model].dlq, value, message.key(), headers))
        await self._deliver(letters)
        for message in messages:
            self.stats.dead_lettered += 1
            self.metrics.dead_lettered.labels(model, reason).inc()
            log.info(
                'dlq model="%s" reason="%s" partition="%s[%s]" offset="%s"',
                model,
                reason,
                message.topic(),
                message.partition(),
                message.offset(),
            )
            self.tracker.complete(
                str(message.topic()), int(message.partition() or 0), int(message.offset() or 0)
            )

    # ----------------------------------------------------- back-pressure

    async def _apply_backpressure(self) -> None:
        """Pause what cannot be served now; resume it when it can.

        1. Too many records without an outcome for long: pause every assigned partition
           (briefly saturated, the loop just stops polling; see ``SATURATION_PAUSE_AFTER_S``).
        2. A model whose breaker is open: pause that model's partitions.
        3. Real-time work waiting, or batch-job records at their own in-flight cap: pause the
           bulk topics, so batch jobs only use spare capacity and never build a backlog that
           real-time requests would queue behind.
        """
        assert self._consumer is not None
        saturated = self._saturated() and self._saturated_for_long()
        bulk_topics = {topics.batch for topics in self.topics.values()}
        bulk_yields = self.batcher.has_lane(Lane.REALTIME) or (
            sum(self.tracker.in_flight(topic) for topic in bulk_topics)
            >= self.settings.workers.max_in_flight_bulk_records
        )
        should_pause: set[tuple[str, int]] = set()
        for topic, partition in self._assignment:
            model = self._model_of_topic(topic)
            open_breaker = self._breaker(model).state is BreakerState.OPEN
            if saturated or open_breaker or (topic in bulk_topics and bulk_yields):
                should_pause.add((topic, partition))
        to_pause = should_pause - self.stats.paused
        to_resume = self.stats.paused - should_pause
        if to_pause:
            await self._on_consumer(self._consumer.pause, _partitions(to_pause))
        if to_resume:
            await self._on_consumer(self._consumer.resume, _partitions(to_resume))
        self.stats.paused = should_pause
        self.metrics.paused_partitions.set(len(should_pause))
        self.metrics.in_flight.set(self.tracker.in_flight())

    # ------------------------------------------------------------ commit

    async def _commit(self) -> None:
        if self.settings.workers.exactly_once:
            # Step 1 of the transactional commit: every consumed record gets its outcome.
            await self._drain(flush_all=True)
        await self._on_consumer(self._commit_on_consumer_thread)

    def _commit_on_consumer_thread(self) -> None:
        """Commit every partition whose watermark moved (runs on the consumer thread).

        At-least-once: a plain synchronous offset commit. Exactly-once, after the drain:
        2. send the positions into the open transaction and commit it,
        3. begin the next transaction.
        """
        assert self._consumer is not None
        assert self._producer is not None
        self._last_commit = self.clock()
        pending = self.tracker.pending_commits()
        if self.settings.workers.exactly_once:
            if pending:
                producer = self._producer.raw
                metadata = self._consumer.consumer_group_metadata()
                producer.send_offsets_to_transaction(_partitions_at(pending), metadata, 30)
                producer.commit_transaction(30)
                producer.begin_transaction()
        elif pending:
            self._consumer.commit(offsets=_partitions_at(pending), asynchronous=False)
        if pending:
            self.tracker.mark_committed(pending)
            self.stats.commits += 1

    def _positions(self) -> list[TopicPartition]:
        assert self._consumer is not None
        return list(self._consumer.position(_partitions(self._assignment)))

    def _update_lag(self, positions: list[TopicPartition]) -> None:
        """Set ``sluiceway_consumer_lag`` per assigned partition: end offset minus position.

        Runs on its own thread. The end offset is asked of the broker, not taken from the
        fetch cache, because a paused partition fetches nothing and its cached end would stand
        still exactly when its lag grows. A topic the broker does not answer for keeps its
        last values.
        """
        if self._lag_admin is None:
            self._lag_admin = AdminClient(self.settings.kafka.client_config())
        for topic in sorted({position.topic for position in positions}):
            try:
                # Generous: on a broker holding many topics the answer can take a second.
                ends = end_offsets_with(self._lag_admin, topic, LAG_QUERY_TIMEOUT_S)
            except (TopicAdminError, KafkaException) as error:
                log.warning('lag query failed topic="%s" error="%s"', topic, error)
                continue
            for position in positions:
                if position.topic != topic or position.partition not in ends:
                    continue
                end = ends[position.partition]
                # Before the first fetch the position is unknown (negative): all of it is lag.
                lag = end - position.offset if position.offset >= 0 else end
                self.metrics.consumer_lag.labels(topic, str(position.partition)).set(lag)

    # ------------------------------------------------- drain, rebalance

    async def _drain(self, *, flush_all: bool, timeout_s: float | None = None) -> bool:
        """Serve everything queued and wait for every outcome (bounded by the drain timeout)."""
        deadline = self.clock() + (timeout_s or self.settings.workers.drain_timeout_s)
        while self.clock() < deadline:
            self._dispatch(flush=flush_all)
            if not self._tasks and len(self.batcher) == 0:
                return True
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=0.05)
            else:
                await asyncio.sleep(0.01)  # queued work waits for a breaker or a slot
        return False

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assignment |= {(tp.topic, tp.partition) for tp in partitions}
        log.info('assigned="%s"', [f"{tp.topic}[{tp.partition}]" for tp in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Runs on the consumer thread inside ``consume``: finish the partitions' work, commit.

        1. Drain in-flight work on the event loop (free while this thread is in a call).
        2. Commit what completed.
        3. Forget the partitions; their queued leftovers are redelivered to the new owner.
        """
        assert self._loop is not None
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        log.info('revoked="%s"', sorted(revoked))
        # Step 1.
        drained = asyncio.run_coroutine_threadsafe(
            self._drain(flush_all=True, timeout_s=self.settings.workers.drain_timeout_s), self._loop
        )
        with contextlib.suppress(Exception):
            drained.result(timeout=self.settings.workers.drain_timeout_s + 5)
        # Step 2.
        self._commit_on_consumer_thread()
        # Step 3.
        self.batcher.discard(lambda record: record.position[:2] in revoked)
        self.tracker.forget(list(revoked))
        self.stats.paused -= revoked
        self._assignment -= revoked
        for topic, partition in revoked:
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(topic, str(partition))


def _partitions(keys: set[tuple[str, int]]) -> list[TopicPartition]:
    return [TopicPartition(topic, partition) for topic, partition in sorted(keys)]


def _partitions_at(offsets: Mapping[tuple[str, int], int]) -> list[TopicPartition]:
    return [
        TopicPartition(topic, partition, offset) for (topic, partition), offset in offsets.items()
    ]
