"""The two loops of the Salesforce connector.

**Ingest** (Pub/Sub API -> ``<ns>.<model>.requests``), per FetchResponse:

1. decode each event (schema by id, cached) and plan it (:func:`cdc.plan`): one unit of work
   per record id; own writeback, deletes and updates of no input field are skipped;
2. read through REST what the events do not carry (GAP_* events, updates of some fields), in
   one sObject Collections GET per entity; ``GAP_OVERFLOW`` resyncs the entity by SOQL;
3. map every record to a request whose id derives from the change (transaction key,
   sequence number, record id), so a redelivered event is the same request;
4. publish them all and wait for the broker's acks (unmappable records go to the DLQ);
5. only then save the last event's replay id as the checkpoint;
6. top the flow-control credits up.

A restart resumes with ``CUSTOM`` after the checkpoint: events after it are read again, and
their requests carry the same ids as before. A broken stream is resubscribed the same way with
backoff; a rejected replay id stops the connector with an alert instead.

**Writeback** (``<ns>.<model>.results`` -> REST), per polled batch of results: keep this
connector's results (their correlation id names connector, sObject and record, signed by this
connector for the result's request id; one that claims to be this connector's without that
signature is counted as ``forged``, logged and never written), PATCH them
through sObject Collections (200 per call, ``allOrNone=false``), and commit the consumer
offsets only after Salesforce accepted the batch. A record-level permanent failure
(``ENTITY_IS_DELETED``) is logged and not retried; a transient failure that outlasts the
retry budget leaves the offsets uncommitted and the batch is read again.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

import schemas
from connectors.common.checkpoint import CheckpointStore, position_bytes
from connectors.common.correlation import CorrelationSigner, Rejected
from connectors.common.dead_letters import source_event_key
from connectors.common.dedupe import RecentKeys
from connectors.common.mapping import Mapping
from connectors.common.outcomes import OUTCOMES
from connectors.salesforce import cdc
from connectors.salesforce.config import (
    SalesforceRetries,
    SourceConfig,
    WritebackConfig,
    correlation_id,
    record_of,
    writeback_values,
)
from connectors.salesforce.config import entity_values as config_entity_values
from connectors.salesforce.exceptions import (
    ConfigurationError,
    PermanentRestError,
    PubSubError,
    RateLimitedError,
    ReplayIdRejectedError,
    RestError,
    SalesforceError,
)
from connectors.salesforce.pubsub import (
    CreditWindow,
    FetchBatch,
    PubSubClient,
    ReceivedEvent,
    Subscription,
    replay_start,
)
from connectors.salesforce.rest import (
    RecordOutcome,
    RecordUpdate,
    SalesforceRest,
    chunks,
    soql_datetime,
)
from pipeline.kafka.events import decode_records
from pipeline.resilience.retry import RetryPolicy
from schemas.errors import SluicewayError, UnservableRecord
from schemas.models import InferenceRequest, InferenceResult

log = logging.getLogger("sluiceway.connectors.salesforce")

SOURCE_SYSTEM = "salesforce"
_API_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z][A-Za-z0-9_]*)?$")
"""An object or field API name (a compound member as ``Parent.Child``)."""


class Publisher(Protocol):
    """Publishes requests and returns once the broker acknowledged every one
    (``SluicewayClient.publish_many``)."""

    def publish_many(self, requests: Sequence[InferenceRequest], timeout_s: float = ...) -> Any: ...


DeadLetterSink = Callable[[str, bytes, UnservableRecord, str | None, str | None], None]
"""``(model, source payload, why, record id, source event key)``: writes one dead letter to
the model's DLQ and waits for its ack. The key (:func:`letter_key`; ``None`` for a letter
about no source event, such as a refused writeback) goes into the letter's headers, where a
restarted connector finds it."""


def letter_key(received: ReceivedEvent, record_id: str | None) -> str:
    """The dedupe key of the dead letter of one record of an event (of the whole event when
    no record id is known): the same event delivered again has the same key. An event
    without an id (never sent by Salesforce, but a stream is input) is named by its replay
    id rather than sharing one key with every other such event."""
    event = received.event_id or f"replay-{received.replay_id.hex()}"
    return source_event_key(f"letter:{event}:{record_id or '-'}")


@dataclass(frozen=True)
class Route:
    """One mapping of the connector: the entity it serves and how."""

    entity: str
    mapping: Mapping
    source: SourceConfig
    input_fields: tuple[str, ...]
    own_changes: cdc.OwnChanges

    @property
    def model(self) -> str:
        return self.mapping.model


@dataclass(frozen=True)
class InvalidationNotice:
    """A record's score no longer stands (deleted, merged away): published keyed by entity."""

    model: str
    entity_key: str
    sobject: str
    record_id: str
    source_event_id: str
    occurred_at_ms: int
    reason: str

    @property
    def dedupe_key(self) -> str:
        return f"invalidation:{self.model}:{self.source_event_id}"


class InvalidationPublisher(Protocol):
    """Publishes invalidations and returns once the broker acknowledged every one."""

    def __call__(self, notices: Sequence[InvalidationNotice]) -> None: ...


@dataclass
class IngestStats:
    events: int = 0
    requests: int = 0
    invalidations: int = 0
    duplicates: int = 0
    """Records whose request, invalidation or dead letter was written before (a redelivery)."""
    skipped: dict[str, int] = field(default_factory=dict)
    reads: int = 0
    resyncs: int = 0
    dead_lettered: int = 0
    resubscribes: int = 0
    last_replay_id: bytes | None = None
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    """Per input event, exactly one outcome (see :data:`OUTCOMES`)."""
    by_entity: dict[str, int] = field(default_factory=dict)
    """Input events per ``entityName``."""
    memory_keys: int = 0
    memory_evicted: int = 0

    def outcome_table(self) -> str:
        """The per-event outcome table the connector prints when it stops."""
        width = max(len(name) for name in OUTCOMES)
        lines = [f"{name:<{width}}  {self.outcomes.get(name, 0):>8}" for name in OUTCOMES]
        total = sum(self.outcomes.get(name, 0) for name in OUTCOMES)
        lines.append(f"{'events':<{width}}  {total:>8}")
        return "\n".join(lines)


@dataclass
class _Unit:
    """One record's work, on its way to a request or an invalidation."""

    route: Route
    event_index: int
    entity: str
    record_id: str
    source_event_id: str
    values: dict[str, Any]


class IngestLoop:
    """Pub/Sub API change events in, acknowledged requests out, replay ids checkpointed."""

    def __init__(
        self,
        *,
        name: str,
        signer: CorrelationSigner,
        routes: Sequence[Route],
        channel: str,
        replay_preset: Literal["LATEST", "EARLIEST"] = "LATEST",
        batch_size: int = 100,
        pubsub: PubSubClient,
        rest: SalesforceRest,
        publisher: Publisher,
        invalidations: InvalidationPublisher,
        checkpoints: CheckpointStore,
        dead_letter: DeadLetterSink,
        memory: RecentKeys | None = None,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.signer = signer
        self.routes = {route.entity: route for route in routes}
        if len(self.routes) != len(routes):
            raise ConfigurationError("two mappings for one entity")
        self.channel = channel
        self.replay_preset = replay_preset
        self.batch_size = batch_size
        self.pubsub = pubsub
        self.rest = rest
        self.publisher = publisher
        self.invalidations = invalidations
        self.checkpoints = checkpoints
        self.dead_letter = dead_letter
        self.memory = memory or RecentKeys(max_keys=100_000, max_age_s=7 * 24 * 3600.0)
        self.retry = retry or SalesforceRetries().resubscribe.policy()
        self._sleep = sleep
        self._clock = clock
        self.stats = IngestStats()
        self._stopping = threading.Event()
        self._subscription: Subscription | None = None
        self._lock = threading.Lock()

    @property
    def stream(self) -> str:
        """The checkpoint key: the Pub/Sub channel name."""
        return self.channel

    def stop(self) -> None:
        """Ask the loop to end after the batch in hand (safe from any thread)."""
        self._stopping.set()
        with self._lock:
            if self._subscription is not None:
                self._subscription.close()

    def run(self) -> IngestStats:
        """Subscribe until :meth:`stop`; resubscribe after transient failures.

        Raises :class:`ReplayIdRejectedError` (alert: an operator decides where to resume)
        and other non-transient :class:`SalesforceError` s.
        """
        stored = self.checkpoints.load().get(self.stream)
        self.stats.last_replay_id = position_bytes(stored) if stored else None
        attempts, failing_since = 0, 0.0
        while not self._stopping.is_set():
            progress_before = self.stats.events
            try:
                self._subscribe_once()
            except ReplayIdRejectedError as exc:
                replay = (self.stats.last_replay_id or b"").hex()
                log.error(
                    'alert="true" reason="replay_id_rejected" topic="%s" replay_id="%s" '
                    'error_code="%s" action="stopped; resume needs an operator decision"',
                    self.stream,
                    replay,
                    exc.error_code,
                )
                raise
            except SluicewayError as exc:
                if not exc.transient:  # a broker that did not answer is transient too
                    raise
                # The batch in hand was not checkpointed: resubscribing after the checkpoint
                # reads it again, and its requests keep their ids.
                if self._stopping.is_set():
                    break
                if self.stats.events > progress_before:
                    attempts = 0
                if attempts == 0:
                    failing_since = self._clock()
                attempts += 1
                if getattr(exc, "code", None) == "UNAUTHENTICATED":
                    self.rest.auth.refresh()
                delay = self.retry.next_delay(attempts, self._clock() - failing_since)
                if delay is None:
                    raise
                log.warning(
                    'event="resubscribe" topic="%s" attempt="%d" delay_s="%.2f" error="%s"',
                    self.stream,
                    attempts,
                    delay,
                    exc,
                )
                self.stats.resubscribes += 1
                self._stopping.wait(delay)
        return self.stats

    def _subscribe_once(self) -> None:
        topic = self.pubsub.get_topic(self.stream)
        if not topic.can_subscribe:
            raise PubSubError(f"{self.stream}: this user may not subscribe", code="PERMISSION")
        start = replay_start(self.stats.last_replay_id, self.replay_preset)
        window = CreditWindow(self.batch_size)
        subscription = self.pubsub.subscribe(self.stream, start, window.open())
        with self._lock:
            if self._stopping.is_set():
                subscription.close()
                return
            self._subscription = subscription
        log.info(
            'event="subscribed" topic="%s" replay_preset="%s" replay_id="%s" credits="%d"',
            self.stream,
            start.preset,
            start.replay_id.hex(),
            window.size,
        )
        try:
            for batch in subscription:
                self.handle(batch)
                window.on_response(len(batch.events))
                if self._stopping.is_set():
                    break
                subscription.request(window.top_up())
        finally:
            with self._lock:
                self._subscription = None
            subscription.close()

    # ------------------------------------------------------------------ one batch

    def handle(self, batch: FetchBatch) -> None:
        """Steps 1-5 of the module docstring for one FetchResponse."""
        outcomes: list[set[str]] = [set() for _ in batch.events]
        # Step 1.
        work: list[tuple[cdc.Work, Route, int]] = []
        for index, received in enumerate(batch.events):
            self.stats.events += 1
            if received.payload is None:
                why = UnservableRecord("undecodable_event", received.error or "undecodable")
                self._dead_letter_event(received, why, outcomes[index])
                continue
            try:
                event = cdc.parse_change_event(
                    received.payload, received.schema.document, received.replay_id
                )
            except (ValueError, KeyError, TypeError) as exc:
                why = UnservableRecord("not_a_change_event", str(exc))
                self._dead_letter_event(received, why, outcomes[index])
                continue
            entity = event.header.entity_name
            self.stats.by_entity[entity] = self.stats.by_entity.get(entity, 0) + 1
            route = self.routes.get(entity)
            if route is None:
                # A channel such as /data/ChangeEvents carries every selected entity; one
                # without a mapping is no business of this connector.
                self._skip("no_mapping", len(event.header.record_ids) or 1, outcomes[index])
                continue
            plan = cdc.plan(event, route.input_fields, route.own_changes)
            work.extend((item, route, index) for item in plan)
        # Step 2.
        units, invalidations = self._complete_records(work, outcomes)
        # Step 3.
        requests: list[InferenceRequest] = []
        keys: list[str] = []
        fresh_notices: list[InvalidationNotice] = []
        batch_keys: set[str] = set()
        for unit in units:
            received = batch.events[unit.event_index]
            entity_values = config_entity_values(
                unit.values, unit.route.input_fields, unit.route.source.null_values
            )
            try:
                request = unit.route.mapping.to_request(
                    {**entity_values, "Id": unit.record_id}, source_event_id=unit.source_event_id
                )
                signed = correlation_id(
                    self.signer, unit.entity, unit.record_id, request.request_id
                )
            except UnservableRecord as exc:
                self._dead_letter_event(
                    received,
                    exc,
                    outcomes[unit.event_index],
                    record_id=unit.record_id,
                    values=unit.values,
                    model=unit.route.model,
                )
                continue
            key = f"request:{request.request_id}"
            if key in self.memory or key in batch_keys:
                self.stats.duplicates += 1
                outcomes[unit.event_index].add("duplicate")
                continue
            batch_keys.add(key)
            keys.append(key)
            requests.append(request.model_copy(update={"correlation_id": signed}))
            outcomes[unit.event_index].add("request")
        for notice, event_index in invalidations:
            if notice.dedupe_key in self.memory or notice.dedupe_key in batch_keys:
                self.stats.duplicates += 1
                outcomes[event_index].add("duplicate")
                continue
            batch_keys.add(notice.dedupe_key)
            keys.append(notice.dedupe_key)
            fresh_notices.append(notice)
            outcomes[event_index].add("invalidation")
        # Step 4: only acknowledged keys are remembered, so a failed publish is retried.
        if requests:
            self.publisher.publish_many(requests)
            self.stats.requests += len(requests)
        if fresh_notices:
            self.invalidations(fresh_notices)
            self.stats.invalidations += len(fresh_notices)
        for key in keys:
            self.memory.add(key)
        self.stats.memory_keys = len(self.memory)
        self.stats.memory_evicted = self.memory.evicted
        for event_outcomes in outcomes:
            outcome = next((name for name in _PRECEDENCE if name in event_outcomes), "skipped")
            self.stats.outcomes[outcome] += 1
        # Step 5.
        if batch.events:
            self._checkpoint(batch.events[-1].replay_id)
        elif batch.latest_replay_id and batch.pending_num_requested > 0:
            # An empty (keepalive) response while credits were open: nothing lies between
            # the last event and the latest replay id, so resuming from it skips nothing.
            self._checkpoint(batch.latest_replay_id)

    def _skip(self, reason: str, records: int, event_outcomes: set[str]) -> None:
        self.stats.skipped[reason] = self.stats.skipped.get(reason, 0) + records
        event_outcomes.add("skipped")

    def _checkpoint(self, replay_id: bytes) -> None:
        if replay_id != self.stats.last_replay_id:
            self.checkpoints.save(self.stream, replay_id)
            self.stats.last_replay_id = replay_id

    def _complete_records(
        self, work: Sequence[tuple[cdc.Work, Route, int]], outcomes: list[set[str]]
    ) -> tuple[list[_Unit], list[tuple[InvalidationNotice, int]]]:
        """Every record to score with its field values (read through REST where the event
        does not carry every input field), and every record to invalidate."""
        to_read: dict[str, set[str]] = {}
        for item, _, _ in work:
            if isinstance(item, cdc.ScoreRecord) and item.needs_read:
                to_read.setdefault(item.entity, set()).add(item.record_id)
        read: dict[tuple[str, str], dict[str, Any] | None] = {}
        for entity, ids in to_read.items():
            fields = cdc.rest_field_names(self.routes[entity].input_fields)
            found = self.rest.retrieve_records(entity, sorted(ids), fields)
            self.stats.reads += len(ids)
            read.update({(entity, record_id): record for record_id, record in found.items()})
        units: list[_Unit] = []
        invalidations: list[tuple[InvalidationNotice, int]] = []
        for item, route, index in work:
            if isinstance(item, cdc.Skip):
                self._skip(item.reason, len(item.record_ids) or 1, outcomes[index])
            elif isinstance(item, cdc.Invalidate):
                notice = InvalidationNotice(
                    model=route.model,
                    entity_key=route.mapping.entity_id({"Id": item.record_id}),
                    sobject=item.entity,
                    record_id=item.record_id,
                    source_event_id=item.source_event_id,
                    occurred_at_ms=item.occurred_at_ms,
                    reason=item.reason,
                )
                invalidations.append((notice, index))
            elif isinstance(item, cdc.ScoreRecord):
                values = dict(item.values)
                if item.needs_read:
                    record = read.get((item.entity, item.record_id))
                    if record is None:
                        self._skip("deleted_before_read", 1, outcomes[index])
                        continue
                    values = cdc.rest_values(record)
                units.append(
                    _Unit(route, index, item.entity, item.record_id, item.source_event_id, values)
                )
            else:
                resynced = self._resync(item, route)
                if not resynced:
                    self._skip("resync_found_nothing", 1, outcomes[index])
                units.extend(
                    _Unit(route, index, item.entity, record_id, item.record_event_id(record_id), v)
                    for record_id, v in resynced
                )
        return units, invalidations

    def _resync(self, item: cdc.ResyncEntity, route: Route) -> list[tuple[str, dict[str, Any]]]:
        """Every record of the entity changed since the overflow, read by SOQL."""
        self.stats.resyncs += 1
        names = list(dict.fromkeys(["Id", *cdc.rest_field_names(route.input_fields)]))
        unsafe = [n for n in [item.entity, *names] if not _API_NAME.match(n)]
        if unsafe:
            raise SalesforceError(f"not Salesforce API names, refused in SOQL: {unsafe}")
        # SOQL, not SQL, and built only from the API names checked above.
        soql = f"SELECT {', '.join(names)} FROM {item.entity} WHERE SystemModstamp >= "  # noqa: S608
        soql += soql_datetime(item.since_ms)
        log.warning('event="resync" entity="%s" since_ms="%d"', item.entity, item.since_ms)
        return [(str(record["Id"]), cdc.rest_values(record)) for record in self.rest.query(soql)]

    def _dead_letter_event(
        self,
        received: ReceivedEvent,
        why: UnservableRecord,
        event_outcomes: set[str],
        *,
        record_id: str | None = None,
        values: dict[str, Any] | None = None,
        model: str | None = None,
    ) -> None:
        key = letter_key(received, record_id)
        if key in self.memory:
            self.stats.duplicates += 1
            event_outcomes.add("duplicate")
            log.info(
                'event="dead_letter_duplicate" reason="%s" record_id="%s" replay_id="%s"',
                why.reason_code,
                record_id or "-",
                received.replay_id.hex(),
            )
            return
        payload = {
            "replay_id": received.replay_id.hex(),
            "event_id": received.event_id,
            "record_id": record_id,
            "values": values if values is not None else received.payload,
            "payload_base64": base64.b64encode(received.raw).decode("ascii"),
        }
        target = model or self._fallback_model
        self.dead_letter(
            target, json.dumps(payload, default=str).encode("utf-8"), why, record_id, key
        )
        # Only an acknowledged letter is remembered: a failed write is tried again.
        self.memory.add(key)
        self.stats.dead_lettered += 1
        event_outcomes.add("dead_letter")
        log.warning(
            'event="dead_lettered" reason="%s" record_id="%s" replay_id="%s"',
            why.reason_code,
            record_id or "-",
            received.replay_id.hex(),
        )

    @property
    def _fallback_model(self) -> str:
        """Where an event that names no known entity is dead-lettered: the first mapping's
        model (an undecodable event cannot say whose it is)."""
        return next(iter(self.routes.values())).model


_PRECEDENCE = ("dead_letter", "request", "invalidation", "duplicate", "skipped")
"""Which outcome an event has when its records fare differently (an event naming two
records, one dead-lettered and one requested, is a ``dead_letter``)."""


# ---------------------------------------------------------------------------- writeback


@dataclass
class WritebackStats:
    results: int = 0
    written: int = 0
    not_ok: int = 0
    already_written: int = 0
    forged: int = 0
    """Results claiming to be this connector's without its valid signature for their request."""
    failed: dict[str, int] = field(default_factory=dict)
    dead_lettered: int = 0
    """Permanent write failures sent to the model's DLQ (with errorCode, fields, result)."""
    no_writeback: int = 0
    """Results for an entity whose mapping has no ``writeback`` section."""
    rate_limited: int = 0
    """Batches put back because the org's API limit was reached."""
    commits: int = 0


def latest_per_record(updates: Sequence[RecordUpdate]) -> list[RecordUpdate]:
    """One update per record, the latest (a collection must not name a record twice)."""
    latest: dict[tuple[str, str], RecordUpdate] = {}
    for update in updates:
        key = (update.sobject, update.record_id)
        latest.pop(key, None)
        latest[key] = update
    return list(latest.values())


@dataclass(frozen=True)
class WritebackTarget:
    """Where the results of one entity's mapping go."""

    model: str
    config: WritebackConfig


class WritebackLoop:
    """This connector's results in, REST PATCHes out, offsets committed after the write."""

    def __init__(
        self,
        *,
        name: str,
        signer: CorrelationSigner,
        targets: dict[str, WritebackTarget],
        consumer: Consumer,
        rest: SalesforceRest,
        dead_letter: DeadLetterSink,
        retry: RetryPolicy | None = None,
        poll_timeout_s: float = 0.5,
    ) -> None:
        self.name = name
        self.signer = signer
        self.targets = targets
        """sObject -> its mapping's model and writeback section."""
        self.consumer = consumer
        self.rest = rest
        self.dead_letter = dead_letter
        self.retry = retry or SalesforceRetries().writeback.policy()
        self.poll_timeout_s = poll_timeout_s
        self.stats = WritebackStats()
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> WritebackStats:
        failures = 0
        while not self._stopping.is_set():
            messages = self.consumer.consume(200, self.poll_timeout_s)
            if not messages:
                continue
            try:
                self.write(messages)
            except RestError as exc:
                if not exc.transient:
                    raise
                failures += 1
                self._rewind(messages)
                delay = self.retry.next_delay(failures, 0.0) or self.retry.max_delay_s
                if isinstance(exc, RateLimitedError):
                    # The org's breaker is open: nothing goes out before it closes.
                    self.stats.rate_limited += 1
                    delay = max(delay, self.rest.limits.wait_s())
                log.warning(
                    'event="writeback_retry" results="%d" delay_s="%.2f" error="%s"',
                    len(messages),
                    delay,
                    exc,
                )
                self._stopping.wait(delay)
                continue
            failures = 0
            try:
                self.consumer.commit(asynchronous=False)
            except KafkaException as exc:
                # The writes are idempotent (same values): a re-read batch writes them again.
                log.warning('event="commit_failed" error="%s"', exc)
                continue
            self.stats.commits += 1
        return self.stats

    def write(self, messages: Sequence[Message]) -> None:
        """PATCH the values of this connector's ``ok`` results among ``messages``."""
        updates: list[RecordUpdate] = []
        results: dict[tuple[str, str], InferenceResult] = {}
        for result in decode_records(messages, InferenceResult):
            target = record_of(result, self.signer)
            if isinstance(target, Rejected):
                if target.reason != "not_ours":
                    self._count_forged(result, target.reason)
                continue
            self.stats.results += 1
            sobject, record_id = target
            destination = self.targets.get(sobject)
            if destination is None:
                self.stats.no_writeback += 1
                continue
            values = writeback_values(result, destination.config)
            if values is None:
                self.stats.not_ok += 1
                log.info(
                    'event="not_written" request_id="%s" status="%s" record_id="%s"',
                    result.request_id,
                    result.status.value,
                    record_id,
                )
                continue
            updates.append(RecordUpdate(sobject, record_id, values))
            results[(sobject, record_id)] = result
        for chunk in chunks(latest_per_record(updates)):
            chunk = self._not_yet_written(chunk)
            if not chunk:
                continue
            try:
                outcomes = self.rest.update_records(chunk)
            except PermanentRestError as exc:
                # The whole request was refused (400 with errorCode and fields): the same
                # request would be refused again, so every record of it is dead-lettered.
                code = exc.error_code or "UNKNOWN"
                outcomes = [
                    RecordOutcome(update, False, code, str(exc), exc.fields) for update in chunk
                ]
            for outcome in outcomes:
                if outcome.ok:
                    self.stats.written += 1
                    continue
                code = outcome.error_code or "UNKNOWN"
                if outcome.transient:
                    raise RestError(
                        f"{outcome.update.record_id}: {code} {outcome.message}",
                        status=200,
                        error_code=code,
                        transient=True,
                    )
                self.stats.failed[code] = self.stats.failed.get(code, 0) + 1
                log.warning(
                    'event="writeback_refused" sobject="%s" record_id="%s" error_code="%s" '
                    'fields="%s"',
                    outcome.update.sobject,
                    outcome.update.record_id,
                    code,
                    ",".join(outcome.fields),
                )
                key = (outcome.update.sobject, outcome.update.record_id)
                self._dead_letter_refusal(outcome, results[key])

    def _dead_letter_refusal(self, outcome: RecordOutcome, result: InferenceResult) -> None:
        """A permanent write error, with Salesforce's errorCode and fields and the result
        that could not be written, to the model's DLQ."""
        code = outcome.error_code or "UNKNOWN"
        payload = {
            "sobject": outcome.update.sobject,
            "record_id": outcome.update.record_id,
            "error_code": code,
            "fields": list(outcome.fields),
            "message": outcome.message,
            "values": dict(outcome.update.fields),
            # The result's fields (tensors are bytes: they travel in the encoded result).
            "result": json.loads(result.model_dump_json(exclude={"outputs"})),
            "result_base64": base64.b64encode(schemas.encode(result)).decode("ascii"),
        }
        why = UnservableRecord(
            "writeback_refused", f"Salesforce refused the write: {code} {list(outcome.fields)}"
        )
        model = self.targets[outcome.update.sobject].model
        self.dead_letter(
            model,
            json.dumps(payload, default=str).encode("utf-8"),
            why,
            outcome.update.record_id,
            None,
        )
        self.stats.dead_lettered += 1

    def _count_forged(self, result: InferenceResult, reason: str) -> None:
        # One line, no feature values or scores: the request id finds the request.
        self.stats.forged += 1
        log.warning(
            'event="writeback_refused_unsigned" reason="%s" request_id="%s" model="%s"',
            reason,
            result.request_id,
            result.model,
        )

    def _not_yet_written(self, chunk: list[RecordUpdate]) -> list[RecordUpdate]:
        """Drop updates whose record already holds their request id in the marker field."""
        pending: list[RecordUpdate] = []
        by_type: dict[str, list[RecordUpdate]] = {}
        for update in chunk:
            by_type.setdefault(update.sobject, []).append(update)
        for sobject, group in by_type.items():
            marker = self.targets[sobject].config.marker_field
            if marker is None:
                pending.extend(group)
                continue
            current = self.rest.retrieve_records(sobject, [u.record_id for u in group], [marker])
            for update in group:
                record = current.get(update.record_id)
                if record is not None and record.get(marker) == update.fields[marker]:
                    self.stats.already_written += 1
                    continue
                pending.append(update)
        return pending

    def _rewind(self, messages: Sequence[Message]) -> None:
        """Seek each partition back to the first message of the batch, to write it again."""
        first: dict[tuple[str, int], int] = {}
        for message in messages:
            key = (str(message.topic()), int(message.partition() or 0))
            offset = int(message.offset() or 0)
            first[key] = min(offset, first.get(key, offset))
        for (topic, partition), offset in first.items():
            try:
                self.consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException as exc:
                raise SalesforceError(f"cannot rewind {topic}[{partition}]: {exc}") from exc


__all__ = [
    "OUTCOMES",
    "IngestLoop",
    "IngestStats",
    "InvalidationNotice",
    "Route",
    "WritebackLoop",
    "WritebackStats",
    "WritebackTarget",
    "latest_per_record",
    "letter_key",
]
