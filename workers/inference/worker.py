"""The inference worker: a conductor wiring small collaborators that hand values along.

    message --Intake--> Record | Refusal
    Record --Dispatcher--> Dispatch (a micro-batch with a backend slot)
    Dispatch --BatchServer--> BatchOutcome (served, failed, waiting)
    outcomes --OutcomeSink--> acknowledged offsets (OffsetTracker)
    acknowledged offsets --commit--> the group (or the transaction)

One asyncio loop owns all state. Each model has its own consumer group member
(``<ns>.worker.<model>``) whose confluent-kafka consumer runs on a thread of its own; its
rebalance callbacks post the event to the loop and wait for the loop's answer, so nothing
but the loop ever touches the batcher or the offset tracker. The producer acknowledges
through futures; the object store writes on a small thread pool.

Only an unrecoverable fault of the worker's own stops it (its configuration; in exactly-once
mode, a transaction the broker refuses): it says why in one line. Anything a record carries
ends as that record's outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, KafkaException
from confluent_kafka.admin import AdminClient

from pipeline import privacy, tracing
from pipeline.backends import Backend, BackendError
from pipeline.backends.signature import ModelSignature
from pipeline.batching import Lane
from pipeline.health import HealthState
from pipeline.kafka import clients
from pipeline.kafka.admin import end_offsets_with
from pipeline.kafka.exceptions import DeliveryError, TopicAdminError
from pipeline.kafka.ports import (
    CommitRefused,
    ConsumedMessage,
    ConsumerPort,
    PartitionKey,
    ProducerPort,
)
from pipeline.kafka.producer import AsyncProducer
from pipeline.kafka.watermark import OffsetTracker
from pipeline.metrics import BREAKER_STATE_VALUES, WorkerMetrics
from pipeline.resilience import BreakerState, CircuitBreaker, RetryPolicy
from pipeline.resilience.breaker import BreakerConfig
from pipeline.routing import RoutingTable
from pipeline.settings import Settings, SettingsError
from pipeline.topics import ModelTopics, control_topic
from workers.inference.dispatch import Dispatch, Dispatcher
from workers.inference.intake import Intake, Record, Refusal
from workers.inference.serving import BatchServer, RecordFailure
from workers.inference.sink import ObjectWriter, OutcomeSink, ReplyTopics

log = logging.getLogger("sluiceway.worker")

FETCH_MAX_RECORDS = 500
FETCH_TIMEOUT_S = 0.05
"""A fetch returns as soon as one record arrives; this only bounds an idle wait."""
CONTROL_POLL_INTERVAL_S = 0.2
SESSION_TIMEOUT_MS = 10_000
"""A member silent this long leaves the group and its partitions move (heartbeats run on
librdkafka's own thread, so a busy event loop does not miss them)."""
LAG_INTERVAL_S = 5.0
LAG_QUERY_TIMEOUT_S = 3.0
SIGNATURE_TIMEOUT_S = 5.0
SATURATION_PAUSE_AFTER_S = 5.0
"""How long the worker stops fetching when saturated before it pauses its partitions instead.

A short saturation (the common case at full load) just skips fetching: librdkafka keeps its
bounded prefetch, so records flow again the moment outcomes complete. Pausing would drop that
prefetch, and the refetch after resuming was measured at 0.3-0.7 s of idle worker each time.
A long saturation (an object store outage) pauses, so the worker polls again and keeps its
place in the consumer group (``max.poll.interval.ms``).
"""


def worker_group_id(namespace: str, model: str) -> str:
    """The consumer group serving ``model``: one per model, whatever else a worker serves."""
    return f"{namespace}.worker.{model}"


class ControlSource(Protocol):
    """Feeds routing decisions into the routing table (``ControlFollower`` fits)."""

    def poll(self, timeout_s: float = 0.0) -> int: ...
    def close(self) -> None: ...


@dataclass
class WorkerStats:
    consumed: int = 0
    results: int = 0
    dead_lettered: int = 0
    expired: int = 0
    batches: int = 0
    commits: int = 0
    commits_refused: int = 0
    paused: set[PartitionKey] = field(default_factory=set)


class GroupMember:
    """One model's consumer group member, and the thread every call to it runs on."""

    def __init__(self, model: str, consumer: ConsumerPort, topics: ModelTopics) -> None:
        self.model = model
        self.consumer = consumer
        self.topics = topics
        self.assignment: dict[PartitionKey, int] = {}
        """Assigned partitions and the epoch they were assigned in."""
        self.paused: set[PartitionKey] = set()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"consumer-{model}")

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def shutdown(self, wait: bool) -> None:
        self._thread.shutdown(wait=wait, cancel_futures=True)


class _RebalanceBridge:
    """Runs on the member's consumer thread: posts each event to the loop and waits for it."""

    def __init__(self, worker: InferenceWorker, member: GroupMember) -> None:
        self._worker = worker
        self._member = member

    def _on_loop(self, coroutine: Coroutine[Any, Any, Any], timeout_s: float) -> Any:
        loop = self._worker.loop
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=timeout_s)

    def on_assign(self, partitions: Sequence[PartitionKey]) -> None:
        self._on_loop(self._worker.assigned(self._member, partitions), 30)

    def on_revoke(self, partitions: Sequence[PartitionKey]) -> None:
        """1. The loop stops serving the partitions and drains their work (bounded).
        2. What completed is committed here, on the consumer's thread.
        3. The loop forgets the partitions; leftovers are redelivered to the new owner."""
        drain_s = self._worker.settings.workers.drain_timeout_s
        # Step 1.
        offsets: Mapping[PartitionKey, int] = {}
        try:
            offsets = self._on_loop(self._worker.releasing(self._member, partitions), drain_s + 30)
        except Exception:
            log.exception('releasing partitions failed model="%s"', self._member.model)
        # Step 2.
        if offsets:
            try:
                self._member.consumer.commit(offsets)
                self._on_loop(self._worker.committed(offsets), 30)
            except CommitRefused as refused:
                log.info(
                    'commit at handover refused model="%s" reason="%s"', self._member.model, refused
                )
            except KafkaException as error:
                log.warning(
                    'commit at handover failed model="%s" error="%s"', self._member.model, error
                )
        # Step 3.
        self._on_loop(self._worker.forget(self._member, partitions), 30)

    def on_lost(self, partitions: Sequence[PartitionKey]) -> None:
        """Taken without a handover: nothing may be committed; the new owner serves them."""
        self._on_loop(self._worker.forget(self._member, partitions, lost=True), 30)


ConsumerFactory = Callable[[str, str], ConsumerPort]
"""(model, group id) -> a consumer for that group."""


class InferenceWorker:
    """Serves the named models until :meth:`stop` is called or the task is cancelled."""

    def __init__(
        self,
        settings: Settings,
        models: Sequence[str],
        backends: Mapping[str, Backend],
        store: ObjectWriter,
        *,
        routing: RoutingTable | None = None,
        retry: RetryPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        consumer_factory: ConsumerFactory | None = None,
        producer: ProducerPort | None = None,
        control: ControlSource | None = None,
        reply_topic_exists: Callable[[str], bool] | None = None,
        metrics: WorkerMetrics | None = None,
        lag: bool = True,
        breaker_config: BreakerConfig | None = None,
    ) -> None:
        unknown = [m for m in models if m not in settings.models]
        if unknown:
            raise SettingsError(f"models not in settings.models: {unknown}")
        if not models:
            raise SettingsError("a worker serves at least one model")
        problems = privacy.configuration_problems(
            {m: settings.models[m].pii.values() for m in models},
            dead_letter_original=settings.workers.dead_letter_original,
            has_hash_key=settings.workers.pii_hash_key is not None,
        )
        if problems:
            raise SettingsError("; ".join(problems))
        self.settings = settings
        self.models = list(dict.fromkeys(models))
        self.backends = dict(backends)
        self.clock = clock
        self.routing = routing or RoutingTable(
            {m: v for m in self.models if (v := settings.models[m].default_version) is not None}
        )
        self.retry = retry or RetryPolicy()
        self.worker_id = settings.workers.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.metrics = metrics or WorkerMetrics()
        self.health = HealthState(self.models, clock=clock)
        self.stats = WorkerStats()
        self.tracker = OffsetTracker()
        self.signatures: dict[str, ModelSignature] = {}
        self.breakers: dict[tuple[str, str], CircuitBreaker] = {}
        backend_of = {m: settings.models[m].backend for m in self.models}
        missing = sorted({b for b in backend_of.values() if b not in self.backends})
        if missing:
            raise SettingsError(f"no backend built for {missing}")
        self.intake = Intake(settings, self.routing, self.signatures, clock)
        self.dispatcher = Dispatcher(settings.workers, backend_of, clock)
        self.servers = {
            name: BatchServer(backend, self._breaker, self.retry, clock, on_retry=self._count_retry)
            for name, backend in self.backends.items()
        }
        self._consumer_factory = consumer_factory or self._kafka_consumer
        self._producer_given = producer
        self._producer: ProducerPort | None = producer
        self._control = control
        self._reply_topic_exists = reply_topic_exists
        self._store = store
        self._lag_enabled = lag
        self._breaker_config = breaker_config
        self.sink: OutcomeSink | None = None
        self.members: list[GroupMember] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fatal: BaseException | None = None
        self._epoch = 0
        self._saturated_since: float | None = None
        self._last_commit = 0.0
        self._last_control_poll = 0.0
        self._last_lag_update = 0.0
        self._last_signature_refresh = 0.0
        self._side_thread = ThreadPoolExecutor(max_workers=2, thread_name_prefix="worker-side")
        self._lag_admin: AdminClient | None = None
        self._lag_query: asyncio.Future[None] | None = None
        self._transaction = asyncio.Lock()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "the worker is not running"
        return self._loop

    # ------------------------------------------------------------------ wiring

    def _kafka_consumer(self, model: str, group_id: str) -> ConsumerPort:
        from pipeline.kafka.consumer import KafkaConsumer

        return KafkaConsumer(self._consumer_config(group_id))

    def _consumer_config(self, group_id: str) -> dict[str, Any]:
        return clients.consumer_config(
            self.settings.kafka,
            group_id=group_id,
            role=clients.ConsumerRole.WORKER,
            group_instance_id=self.settings.workers.group_instance_id,
            overrides={
                # A worker process that died (a supervisor restarts it at once) holds its
                # partitions until this runs out: librdkafka's 45 s default stalled them. A
                # static member keeps the default: it comes back under its own instance id
                # (a restarted pod, a supervisor's restarted child) and takes its partitions
                # back without a rebalance only if it returns within the timeout.
                **(
                    {}
                    if self.settings.workers.group_instance_id
                    else {"session.timeout.ms": SESSION_TIMEOUT_MS}
                ),
                # Each topic's partitions spread over the members. cooperative-sticky
                # balanced only the count over both topics: a second worker process got the
                # three idle batch-job partitions and the first kept every real-time one.
                # Eager: a rebalance revokes everything (drained as on SIGTERM). Switching a
                # running group over needs all its members stopped first (docs/worker.md).
                "partition.assignment.strategy": "range",
                # librdkafka's default prefetch, not the profile's 64 KiB: with 64 KiB the
                # worker idled between fetches at full load (docs/worker.md, 2026-12-02). A
                # batch job's prefetched records do not hold real-time ones back for long:
                # its partitions pause (dropping their prefetch) whenever real-time records
                # wait, and it has a record cap of its own while real-time traffic flows.
                "max.partition.fetch.bytes": 1024 * 1024,
                "queued.max.messages.kbytes": 4096,
            },
        )

    def _producer_config(self) -> dict[str, Any]:
        transactional_id = None
        if self.settings.workers.exactly_once:
            name = "-".join(self.models)
            transactional_id = f"{self.settings.namespace}.worker.{name}-{self.worker_id}"
        return clients.producer_config(
            self.settings.kafka,
            role=clients.ProducerRole.LOW_LATENCY,
            transactional_id=transactional_id,
            transaction_timeout_ms=15_000,
            overrides={
                "message.max.bytes": self.settings.workers.max_message_bytes + 65536,
                # The worker never creates topics: a reply topic must exist (checked first).
                "allow.auto.create.topics": False,
            },
        )

    def _breaker(self, model: str) -> CircuitBreaker:
        backend = self.backends[self.settings.models[model].backend]
        key = (backend.endpoint, model)
        breaker = self.breakers.get(key)
        if breaker is None:
            name = f"{backend.endpoint}/{model}"
            breaker = self.breakers[key] = CircuitBreaker(
                name, self._breaker_config, clock=self.clock, on_state_change=self._on_breaker
            )
            self.metrics.breaker_state.labels(name).set(0)
        return breaker

    def _breaker_open(self, model: str) -> bool:
        return self._breaker(model).state is BreakerState.OPEN

    def _on_breaker(self, name: str, old: BreakerState, new: BreakerState) -> None:
        log.warning('breaker="%s" from="%s" to="%s"', name, old.value, new.value)
        self.metrics.breaker_state.labels(name).set(BREAKER_STATE_VALUES[new.value])
        # The name is "<endpoint>/<model>" (see _breaker); model names hold no "/".
        self.health.breaker_changed(name, name.rsplit("/", 1)[-1], is_open=new is BreakerState.OPEN)

    def _count_retry(self, model: str, attempt: int, delay_s: float, reason: str) -> None:
        endpoint = self.backends[self.settings.models[model].backend].endpoint
        self.metrics.retries.labels(endpoint, model).inc()
        log.info(
            'model="%s" retry="%d" delay_s="%.3f" reason="%s"', model, attempt, delay_s, reason
        )

    def _reply_exists(self, topic: str) -> bool:
        if self._reply_topic_exists is not None:
            return self._reply_topic_exists(topic)
        from confluent_kafka import TopicCollection

        admin = self._admin()
        futures = admin.describe_topics(TopicCollection([topic]), request_timeout=5)
        try:
            futures[topic].result()
        except KafkaException:
            return False
        return True

    def _admin(self) -> AdminClient:
        if self._lag_admin is None:
            self._lag_admin = clients.admin(self.settings.kafka)
        return self._lag_admin

    async def _on_side_thread(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._side_thread, fn)

    # ------------------------------------------------------------------ main loop

    def stop(self) -> None:
        self.health.stopping()
        self._stop.set()
        self._wake.set()

    async def run(self) -> WorkerStats:
        """Consume, batch, serve and commit until stopped; then drain and let go."""
        self._loop = asyncio.get_running_loop()
        if self._producer is None:
            self._producer = AsyncProducer(self._producer_config())
        if self.settings.workers.exactly_once:
            await self._on_side_thread(lambda: self._require_producer().init_transactions(30))
            self._require_producer().begin_transaction()
        self.sink = OutcomeSink(
            self.settings,
            self._require_producer(),
            self._store,
            self.tracker,
            self.metrics,
            ReplyTopics(self._reply_exists, self.clock),
            worker_id=self.worker_id,
            retry=self.retry,
            clock=self.clock,
            run_blocking=self._on_side_thread,
        )
        if self._control is None:
            from workers.inference.control import ControlFollower

            self._control = ControlFollower(
                self.settings.kafka,
                control_topic(self.settings.namespace),
                self.routing,
            )
        control = self._control
        await self._on_side_thread(lambda: control.poll(1.0))
        await self._refresh_signatures()
        for model in self.models:
            group = worker_group_id(self.settings.namespace, model)
            member = GroupMember(
                model,
                self._consumer_factory(model, group),
                ModelTopics(self.settings.namespace, model),
            )
            self.members.append(member)
            topics = [member.topics.requests, member.topics.batch]
            await member.call(member.consumer.subscribe, topics, _RebalanceBridge(self, member))
            log.info('worker="%s" group="%s" topics="%s" starting', self.worker_id, group, topics)
        sources = [asyncio.create_task(self._source(member)) for member in self.members]
        try:
            while not self._stop.is_set():
                await self._step()
            await asyncio.gather(*sources, return_exceptions=True)
            if self._fatal is None:
                await self._drain(flush=True)
                await self._commit()
        finally:
            self._stop.set()
            for task in sources:
                task.cancel()
            await self._close()
        if self._fatal is not None:
            raise self._fatal
        # The sink counts what it answered; the stop line and a supervisor's sum read these.
        self.stats.results = self._require_sink().results
        self.stats.dead_lettered = self._require_sink().dead_lettered
        return self.stats

    async def _close(self) -> None:
        for member in self.members:
            if self._fatal is None:
                try:
                    await member.call(member.consumer.close)
                except Exception as error:
                    log.warning(
                        'closing consumer failed model="%s" error="%s"', member.model, error
                    )
            member.shutdown(wait=self._fatal is None)
        if self._control is not None:
            with contextlib.suppress(Exception):
                self._control.close()
        remaining = 0
        if self._producer is not None and self._producer_given is None:
            remaining = self._producer.close(5 if self._fatal else 30)
        self._side_thread.shutdown(wait=False, cancel_futures=True)
        log.info('worker="%s" stopped undelivered="%d"', self.worker_id, remaining)

    def _require_producer(self) -> ProducerPort:
        assert self._producer is not None
        return self._producer

    def _require_sink(self) -> OutcomeSink:
        assert self.sink is not None
        return self.sink

    async def _source(self, member: GroupMember) -> None:
        """Fetch the member's records and hand them to intake, until stopped."""
        while not self._stop.is_set():
            room = self.settings.workers.max_in_flight_records - self.tracker.in_flight()
            if self._saturated():
                if not self._saturated_for_long():
                    await self._await_outcomes(0.01)
                    continue
                # Paused first, so the poll that keeps the group membership brings no records.
                await self._apply_backpressure()
            try:
                messages = await member.call(
                    member.consumer.fetch,
                    max(1, min(FETCH_MAX_RECORDS, room)),
                    FETCH_TIMEOUT_S,
                )
            except RuntimeError:
                return  # the member's thread was shut down
            if messages:
                self._admit(member, messages)
                self._wake.set()

    async def _step(self) -> None:
        due = self.dispatcher.next_due_in()
        timeout = 0.05 if due is None else min(max(due, 0.002), 0.05)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)
        self._wake.clear()
        self.health.loop_turned()
        now = self.clock()
        if now - self._last_control_poll >= CONTROL_POLL_INTERVAL_S and self._control:
            self._last_control_poll = now
            control = self._control
            await self._on_side_thread(lambda: control.poll(0.0))
        if now - self._last_signature_refresh >= self.settings.workers.signature_refresh_s:
            self._spawn(self._refresh_signatures())
        self._dispatch()
        await self._apply_backpressure()
        if now - self._last_commit >= self.settings.workers.commit_interval_ms / 1000:
            await self._commit()
        self._update_gauges()
        if self._lag_enabled and now - self._last_lag_update >= LAG_INTERVAL_S:
            self._last_lag_update = now
            if self._lag_query is None or self._lag_query.done():
                self._lag_query = asyncio.ensure_future(self._update_lag())

    # ------------------------------------------------------------------ intake

    def _admit(self, member: GroupMember, messages: Sequence[ConsumedMessage]) -> None:
        refusals: list[Refusal] = []
        consumed: dict[str, int] = {}
        for message in messages:
            if message.error() is not None:
                log.warning('consumer error="%s"', message.error())
                continue
            topic, partition, offset = message.topic(), message.partition(), message.offset()
            if topic is None or partition is None or offset is None:
                continue
            epoch = member.assignment.get((topic, partition))
            if epoch is None:
                continue  # fetched before a revocation took effect: the new owner has it
            self.tracker.track(topic, partition, offset)
            self.stats.consumed += 1
            consumed[topic] = consumed.get(topic, 0) + 1
            lane = Lane.BULK if topic == member.topics.batch else Lane.REALTIME
            admitted = self.intake.admit(message, member.model, lane, epoch)
            if isinstance(admitted, Refusal):
                refusals.append(admitted)
            else:
                tracing.consumed(message, admitted.request)
                self.dispatcher.add(admitted, self.intake.deadline(admitted.request))
        for topic, count in consumed.items():
            self.metrics.consumed.labels(topic).inc(count)
        if refusals:
            self._spawn(self._require_sink().refused(refusals))

    async def _refresh_signatures(self) -> None:
        """Ask each backend what its models take; a backend that does not answer keeps the
        signature it had (requests are then checked by the backend itself)."""
        self._last_signature_refresh = self.clock()
        for model in self.models:
            backend = self.backends[self.settings.models[model].backend]
            try:
                signature = await asyncio.wait_for(backend.describe(model), SIGNATURE_TIMEOUT_S)
            except (BackendError, TimeoutError) as error:
                log.warning('model="%s" signature unknown error="%s"', model, error)
                continue
            if signature != self.signatures.get(model):
                log.info(
                    'model="%s" inputs="%s" versions="%s"',
                    model,
                    [(s.name, s.datatype, list(s.shape)) for s in signature.inputs],
                    sorted(signature.versions or ()),
                )
            self.signatures[model] = signature

    # ------------------------------------------------------------------ dispatch and serve

    def _dispatch(self, *, flush: bool = False) -> None:
        dispatches, expired = self.dispatcher.take(self._breaker_open, flush=flush)
        if expired:
            self.stats.expired += len(expired)
            self._spawn(
                tracing.traced(
                    self._require_sink().expired(expired),
                    tracing.OUTCOME_PRODUCE,
                    {"sluiceway.status": "expired", "sluiceway.records": len(expired)},
                    (record.request for record in expired),
                )
            )
        for dispatch in dispatches:
            self._spawn(
                tracing.traced(
                    self._serve(dispatch),
                    tracing.BATCH,
                    {
                        "sluiceway.model": dispatch.batch.key[0],
                        "sluiceway.records": len(dispatch.batch),
                    },
                    (pending.item.request for pending in dispatch.batch.items),
                )
            )

    async def _serve(self, dispatch: Dispatch) -> None:
        batch = dispatch.batch
        model, version = batch.key
        now = self.clock()
        queue_wait = self.metrics.queue_wait.labels(model)
        for pending in batch.items:
            queue_wait.observe(now - pending.enqueued_at)
        self.metrics.batch_size.labels(model).observe(len(batch))
        try:
            outcome = await tracing.traced(
                self.servers[dispatch.backend].serve(batch),
                tracing.BACKEND,
                {"sluiceway.backend": self.backends[dispatch.backend].endpoint},
            )
        finally:
            self.dispatcher.finished(dispatch)
        if outcome.waiting:
            self.dispatcher.requeue(batch.key, outcome.waiting, self._is_current)
        if outcome.splits:
            self.metrics.batch_splits.labels(model).inc(outcome.splits)
        self.metrics.backend_latency.labels(
            self.backends[dispatch.backend].endpoint, model
        ).observe(outcome.backend_s)
        sink = self._require_sink()
        work = []
        if outcome.failed:
            work.append(sink.failed(model, outcome.failed))
        if outcome.served:
            work.append(self._publish(model, version, outcome.served, outcome.backend_s))
        await asyncio.gather(*work)
        self.stats.batches += 1
        self._observe_realtime_latency([record for record, _ in outcome.served])

    async def _publish(
        self, model: str, version: str | None, served: Any, backend_s: float
    ) -> None:
        sink = self._require_sink()
        try:
            await sink.served(model, version, served, backend_s)
        except (DeliveryError, KafkaException):
            raise
        except Exception as error:
            log.error(
                'model="%s" results could not be built error="%s" at="%s"',
                model,
                type(error).__name__,
                privacy.code_trace(error),
            )
            await sink.failed(
                model,
                [
                    RecordFailure(
                        record,
                        "unprocessable",
                        privacy.withheld(error),
                        type(error).__name__,
                        1,
                    )
                    for record, _ in served
                ],
            )

    def _is_current(self, record: Record) -> bool:
        """Whether the record's partition is still assigned under the epoch it came in."""
        member = self._member_of(record.model)
        return member is not None and member.assignment.get(record.partition_key) == record.epoch

    def _member_of(self, model: str) -> GroupMember | None:
        return next((m for m in self.members if m.model == model), None)

    def _observe_realtime_latency(self, records: Sequence[Record]) -> None:
        """Publish-to-outcome time of the slowest real-time record: what the governor steers."""
        now_ms = time.time() * 1000
        slowest = max(
            (
                now_ms - created_ms
                for record in records
                if record.lane is Lane.REALTIME
                for kind, created_ms in [record.message.timestamp()]
                if kind != TIMESTAMP_NOT_AVAILABLE
            ),
            default=None,
        )
        if slowest is not None:
            self.dispatcher.governor.observe_realtime(slowest / 1000.0)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._wake.set()
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        # Every record's failure is an outcome by now: what is left is the worker's own
        # (a transaction the broker refused in exactly-once mode, or a bug). Its records'
        # offsets stay uncommitted, so a restart serves them again.
        log.error("worker stopping: %s: %s", type(error).__name__, error, exc_info=error)
        self._fatal = error
        self.stop()

    # ------------------------------------------------------------------ back-pressure

    def _saturated(self) -> bool:
        """Too many records without an outcome: take no more until some complete."""
        saturated = self.tracker.in_flight() >= self.settings.workers.max_in_flight_records
        if not saturated:
            self._saturated_since = None
        elif self._saturated_since is None:
            self._saturated_since = self.clock()
        return saturated

    def _saturated_for_long(self) -> bool:
        since = self._saturated_since
        return since is not None and self.clock() - since >= SATURATION_PAUSE_AFTER_S

    async def _await_outcomes(self, timeout_s: float) -> None:
        if self._tasks:
            await asyncio.wait(
                set(self._tasks), timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        else:
            await asyncio.sleep(timeout_s)

    def partitions_to_pause(self, member: GroupMember) -> set[PartitionKey]:
        """1. Saturated for long: every partition. 2. The model's breaker is open: all of its
        partitions. 3. Real-time work waiting, or batch-job records at their cap (which is
        the whole worker while no real-time traffic flows): the bulk topic, so batch jobs
        only use spare capacity."""
        if (self._saturated() and self._saturated_for_long()) or self._breaker_open(member.model):
            return set(member.assignment)
        bulk_topics = {m.topics.batch for m in self.members}
        # Without real-time traffic there is no bulk cap: at the worker's own bound the
        # source only skips fetches, as for real-time records. Pausing there dropped the
        # prefetch each time, and the refetch left the worker idle.
        cap = self.dispatcher.bulk_record_cap()
        bulk_yields = self.dispatcher.realtime_waiting() or (
            cap is not None and sum(self.tracker.in_flight(t) for t in bulk_topics) >= cap
        )
        return {key for key in member.assignment if bulk_yields and key[0] == member.topics.batch}

    async def _apply_backpressure(self) -> None:
        paused: set[PartitionKey] = set()
        for member in self.members:
            should_pause = self.partitions_to_pause(member)
            to_pause = should_pause - member.paused
            to_resume = member.paused - should_pause
            if to_pause:
                await member.call(member.consumer.pause, to_pause)
            if to_resume:
                await member.call(member.consumer.resume, to_resume)
            member.paused = should_pause
            paused |= should_pause
        self.stats.paused = paused
        self.metrics.paused_partitions.set(len(paused))

    def _update_gauges(self) -> None:
        self.metrics.in_flight.set(self.tracker.in_flight())
        self.metrics.queued.set(len(self.dispatcher))
        self.metrics.deadline_index.set(self.dispatcher.batcher.deadline_index_size)

    # ------------------------------------------------------------------ commit

    async def _commit(self) -> None:
        """Commit every partition whose watermark moved.

        At-least-once: a synchronous commit per group member. Exactly-once:
        1. every consumed record gets its outcome (drain),
        2. each group's positions go into the open transaction, which commits,
        3. the next transaction begins.
        A commit the group refuses (it moved on) is not an error: the records are
        redelivered to their new owner.
        """
        self._last_commit = self.clock()
        if self.settings.workers.exactly_once:
            await self._commit_transaction()
            return
        for member in self.members:
            pending = self._pending_commits(member)
            if not pending:
                continue
            try:
                await member.call(member.consumer.commit, pending)
            except CommitRefused as refused:
                self._commit_refused(member, refused)
                continue
            except KafkaException as error:
                log.warning(
                    'commit failed model="%s" error="%s"; next interval retries',
                    member.model,
                    error,
                )
                continue
            await self.committed(pending)

    async def _commit_transaction(self) -> None:
        async with self._transaction:
            # Step 1.
            await self._drain(flush=True)
            # Steps 2 and 3.
            offsets = [
                (pending, member.consumer.group_metadata())
                for member in self.members
                if (pending := self._pending_commits(member))
            ]
            if not offsets:
                return
            producer = self._require_producer()
            await self._on_side_thread(lambda: producer.commit_offsets_in_transaction(offsets, 30))
            for pending, _ in offsets:
                await self.committed(pending)

    def _pending_commits(self, member: GroupMember) -> dict[PartitionKey, int]:
        return {
            key: offset
            for key, offset in self.tracker.pending_commits().items()
            if key in member.assignment
        }

    def _commit_refused(self, member: GroupMember, refused: CommitRefused) -> None:
        self.stats.commits_refused += 1
        self.metrics.commits_refused.inc()
        log.info('commit refused model="%s" reason="%s"', member.model, refused)

    async def committed(self, offsets: Mapping[PartitionKey, int]) -> None:
        self.tracker.mark_committed(dict(offsets))
        self.stats.commits += 1

    # ------------------------------------------------------------------ drain, rebalance

    async def _drain(self, *, flush: bool, timeout_s: float | None = None) -> bool:
        """Serve everything queued and wait for every outcome (bounded by the drain timeout)."""
        deadline = self.clock() + (timeout_s or self.settings.workers.drain_timeout_s)
        while self.clock() < deadline:
            self._dispatch(flush=flush)
            if not self._tasks and len(self.dispatcher) == 0:
                return True
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=0.05)
            else:
                await asyncio.sleep(0.01)  # queued work waits for a breaker or a slot
        return False

    async def assigned(self, member: GroupMember, partitions: Sequence[PartitionKey]) -> None:
        self._epoch += 1
        for key in partitions:
            member.assignment[key] = self._epoch
        self.health.assignment(member.model, len(member.assignment))
        log.info('assigned model="%s" partitions="%s"', member.model, _shown(partitions))

    async def releasing(
        self, member: GroupMember, partitions: Sequence[PartitionKey]
    ) -> dict[PartitionKey, int]:
        """Stop serving ``partitions`` and drain their in-flight work; return what to commit.

        1. They leave the assignment, so nothing of theirs is requeued or fetched again.
        2. Their queued records are dropped (the new owner serves them).
        3. The batches in flight now finish, bounded by the drain timeout.
        4. In exactly-once mode the transaction commits here; otherwise the offsets to
           commit are returned to the consumer thread, which commits them.
        """
        log.info('revoked model="%s" partitions="%s"', member.model, _shown(partitions))
        released = set(partitions)
        # Step 1.
        for key in released:
            member.assignment.pop(key, None)
        self.health.assignment(member.model, len(member.assignment))
        # Step 2.
        self.dispatcher.discard(released)
        # Step 3.
        in_flight = set(self._tasks)
        if in_flight:
            await asyncio.wait(in_flight, timeout=self.settings.workers.drain_timeout_s)
        # Step 4.
        pending = {
            key: offset for key, offset in self.tracker.pending_commits().items() if key in released
        }
        if self.settings.workers.exactly_once:
            async with self._transaction:
                await self._drain(flush=True)
                offsets = [(pending, member.consumer.group_metadata())] if pending else []
                offsets += [
                    (other_pending, other.consumer.group_metadata())
                    for other in self.members
                    if other is not member and (other_pending := self._pending_commits(other))
                ]
                if offsets:
                    producer = self._require_producer()
                    await self._on_side_thread(
                        lambda: producer.commit_offsets_in_transaction(offsets, 30)
                    )
                    for committed_offsets, _ in offsets:
                        await self.committed(committed_offsets)
            return {}
        return pending

    async def forget(
        self, member: GroupMember, partitions: Sequence[PartitionKey], *, lost: bool = False
    ) -> None:
        keys = list(partitions)
        if lost:
            log.warning('lost model="%s" partitions="%s"', member.model, _shown(keys))
            for key in keys:
                member.assignment.pop(key, None)
            self.health.assignment(member.model, len(member.assignment))
            self.dispatcher.discard(keys)
        self.tracker.forget(keys)
        member.paused -= set(keys)
        for topic, partition in keys:
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(topic, str(partition))

    # ------------------------------------------------------------------ lag

    async def _update_lag(self) -> None:
        """Set ``sluiceway_consumer_lag`` per assigned partition: end offset minus position.

        The end offset is asked of the broker, not taken from the fetch cache, because a
        paused partition fetches nothing and its cached end would stand still exactly when
        its lag grows. Asked on a side thread: it takes round trips.
        """
        positions: dict[PartitionKey, int] = {}
        for member in self.members:
            if member.assignment:
                positions.update(
                    await member.call(member.consumer.positions, list(member.assignment))
                )
        if positions:
            await self._on_side_thread(lambda: self._query_lag(positions))

    def _query_lag(self, positions: Mapping[PartitionKey, int]) -> None:
        admin = self._admin()
        for topic in sorted({topic for topic, _ in positions}):
            try:
                ends = end_offsets_with(admin, topic, LAG_QUERY_TIMEOUT_S)
            except (TopicAdminError, KafkaException) as error:
                log.warning('lag query failed topic="%s" error="%s"', topic, error)
                continue
            for (position_topic, partition), offset in positions.items():
                if position_topic != topic or partition not in ends:
                    continue
                end = ends[partition]
                # Before the first fetch the position is unknown (negative): all of it is lag.
                lag = end - offset if offset >= 0 else end
                self.metrics.consumer_lag.labels(topic, str(partition)).set(lag)


def _shown(partitions: Sequence[PartitionKey] | set[PartitionKey]) -> list[str]:
    return [f"{topic}[{partition}]" for topic, partition in sorted(partitions)]
