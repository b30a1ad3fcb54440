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
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

import schemas
from connectors.common.checkpoint import CheckpointStore, position_bytes
from connectors.common.correlation import CorrelationSigner, Rejected
from connectors.common.exceptions import UnmappableRecord
from connectors.common.mapping import Mapping
from connectors.salesforce import cdc
from connectors.salesforce.config import (
    SourceConfig,
    WritebackConfig,
    correlation_id,
    record_of,
    writeback_values,
)
from connectors.salesforce.exceptions import (
    PubSubError,
    ReplayIdRejectedError,
    SalesforceError,
    TransientPubSubError,
    TransientRestError,
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
    RecordUpdate,
    SalesforceRest,
    chunks,
    soql_datetime,
)
from pipeline.client import BrokerUnavailableError
from pipeline.resilience.retry import RetryPolicy
from schemas.exceptions import DecodeError
from schemas.models import InferenceRequest, InferenceResult

log = logging.getLogger("sluiceway.connectors.salesforce")

SOURCE_SYSTEM = "salesforce"
_API_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z][A-Za-z0-9_]*)?$")
"""An object or field API name (a compound member as ``Parent.Child``)."""


class Publisher(Protocol):
    """Publishes requests and returns once the broker acknowledged every one
    (``SluicewayClient.publish_many``)."""

    def publish_many(self, requests: Sequence[InferenceRequest], timeout_s: float = ...) -> Any: ...


DeadLetterSink = Callable[[bytes, UnmappableRecord, str | None], None]
"""``(source payload, why, request id)``: writes one dead letter and waits for its ack."""


@dataclass
class IngestStats:
    events: int = 0
    requests: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    reads: int = 0
    resyncs: int = 0
    dead_lettered: int = 0
    resubscribes: int = 0
    last_replay_id: bytes | None = None


class IngestLoop:
    """Pub/Sub API change events in, acknowledged requests out, replay ids checkpointed."""

    def __init__(
        self,
        *,
        name: str,
        signer: CorrelationSigner,
        mapping: Mapping,
        source: SourceConfig,
        own_changes: cdc.OwnChanges,
        input_fields: Sequence[str],
        pubsub: PubSubClient,
        rest: SalesforceRest,
        publisher: Publisher,
        checkpoints: CheckpointStore,
        dead_letter: DeadLetterSink,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.signer = signer
        self.mapping = mapping
        self.source = source
        self.own_changes = own_changes
        self.input_fields = tuple(input_fields)
        self.pubsub = pubsub
        self.rest = rest
        self.publisher = publisher
        self.checkpoints = checkpoints
        self.dead_letter = dead_letter
        self.retry = retry or RetryPolicy(
            max_attempts=10, base_delay_s=0.5, max_delay_s=30.0, max_elapsed_s=600.0
        )
        self._sleep = sleep
        self._clock = clock
        self.stats = IngestStats()
        self._stopping = threading.Event()
        self._subscription: Subscription | None = None
        self._lock = threading.Lock()

    @property
    def stream(self) -> str:
        """The checkpoint key: the Pub/Sub topic name."""
        return self.source.topic

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
            except (TransientPubSubError, TransientRestError, BrokerUnavailableError) as exc:
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
        start = replay_start(self.stats.last_replay_id, self.source.replay_preset)
        window = CreditWindow(self.source.batch_size)
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
        # Step 1.
        work: list[tuple[cdc.Work, ReceivedEvent]] = []
        for received in batch.events:
            self.stats.events += 1
            if received.payload is None:
                why = UnmappableRecord("undecodable_event", received.error or "undecodable")
                self._dead_letter_event(received, why)
                continue
            try:
                event = cdc.parse_change_event(
                    received.payload, received.schema.document, received.replay_id
                )
            except (ValueError, KeyError, TypeError) as exc:
                self._dead_letter_event(received, UnmappableRecord("not_a_change_event", str(exc)))
                continue
            work.extend(
                (item, received) for item in cdc.plan(event, self.input_fields, self.own_changes)
            )
        # Step 2.
        records = self._complete_records(work)
        # Step 3.
        requests: list[InferenceRequest] = []
        for entity, record_id, event_id, values, received in records:
            try:
                request = self.mapping.to_request(
                    {"Id": record_id, **values}, source_event_id=event_id
                )
            except UnmappableRecord as exc:
                self._dead_letter_event(received, exc, record_id=record_id, values=values)
                continue
            try:
                signed = correlation_id(self.signer, entity, record_id, request.request_id)
            except UnmappableRecord as exc:
                self._dead_letter_event(received, exc, record_id=record_id, values=values)
                continue
            requests.append(request.model_copy(update={"correlation_id": signed}))
        # Step 4.
        if requests:
            self.publisher.publish_many(requests)
            self.stats.requests += len(requests)
        # Step 5.
        if batch.events:
            self._checkpoint(batch.events[-1].replay_id)
        elif batch.latest_replay_id and batch.pending_num_requested > 0:
            # An empty (keepalive) response while credits were open: nothing lies between
            # the last event and the latest replay id, so resuming from it skips nothing.
            self._checkpoint(batch.latest_replay_id)

    def _checkpoint(self, replay_id: bytes) -> None:
        if replay_id != self.stats.last_replay_id:
            self.checkpoints.save(self.stream, replay_id)
            self.stats.last_replay_id = replay_id

    def _complete_records(
        self, work: Sequence[tuple[cdc.Work, ReceivedEvent]]
    ) -> list[tuple[str, str, str, dict[str, Any], ReceivedEvent]]:
        """``(entity, record id, source event id, field values, event)`` for every record to
        score, read through REST where the event does not carry every input field."""
        to_read: dict[str, set[str]] = {}
        for item, _ in work:
            if isinstance(item, cdc.ScoreRecord) and item.needs_read:
                to_read.setdefault(item.entity, set()).add(item.record_id)
            elif isinstance(item, cdc.Skip):
                self.stats.skipped[item.reason] = self.stats.skipped.get(item.reason, 0) + len(
                    item.record_ids
                )
        read: dict[tuple[str, str], dict[str, Any] | None] = {}
        for entity, ids in to_read.items():
            found = self.rest.retrieve_records(entity, sorted(ids), self.input_fields)
            self.stats.reads += len(ids)
            read.update({(entity, record_id): record for record_id, record in found.items()})
        complete: list[tuple[str, str, str, dict[str, Any], ReceivedEvent]] = []
        for item, received in work:
            if isinstance(item, cdc.ScoreRecord):
                values = dict(item.values)
                if item.needs_read:
                    record = read.get((item.entity, item.record_id))
                    if record is None:
                        self.stats.skipped["deleted_before_read"] = (
                            self.stats.skipped.get("deleted_before_read", 0) + 1
                        )
                        continue
                    values = _rest_values(record)
                complete.append(
                    (item.entity, item.record_id, item.source_event_id, values, received)
                )
            elif isinstance(item, cdc.ResyncEntity):
                complete.extend(
                    (item.entity, record_id, item.record_event_id(record_id), values, received)
                    for record_id, values in self._resync(item)
                )
        return complete

    def _resync(self, item: cdc.ResyncEntity) -> list[tuple[str, dict[str, Any]]]:
        """Every record of the entity changed since the overflow, read by SOQL."""
        self.stats.resyncs += 1
        names = list(dict.fromkeys(["Id", *self.input_fields]))
        unsafe = [n for n in [item.entity, *names] if not _API_NAME.match(n)]
        if unsafe:
            raise SalesforceError(f"not Salesforce API names, refused in SOQL: {unsafe}")
        # SOQL, not SQL, and built only from the API names checked above.
        soql = f"SELECT {', '.join(names)} FROM {item.entity} WHERE SystemModstamp >= "  # noqa: S608
        soql += soql_datetime(item.since_ms)
        log.warning('event="resync" entity="%s" since_ms="%d"', item.entity, item.since_ms)
        return [(str(record["Id"]), _rest_values(record)) for record in self.rest.query(soql)]

    def _dead_letter_event(
        self,
        received: ReceivedEvent,
        why: UnmappableRecord,
        *,
        record_id: str | None = None,
        values: dict[str, Any] | None = None,
    ) -> None:
        payload = {
            "replay_id": received.replay_id.hex(),
            "event_id": received.event_id,
            "record_id": record_id,
            "values": values if values is not None else received.payload,
            "payload_base64": base64.b64encode(received.raw).decode("ascii"),
        }
        self.dead_letter(json.dumps(payload, default=str).encode("utf-8"), why, record_id)
        self.stats.dead_lettered += 1
        log.warning(
            'event="dead_lettered" reason="%s" record_id="%s" replay_id="%s"',
            why.reason_code,
            record_id or "-",
            received.replay_id.hex(),
        )


def _rest_values(record: dict[str, Any]) -> dict[str, Any]:
    """A REST record as flat field values (``attributes`` dropped, compounds dotted)."""
    return cdc.flatten({k: v for k, v in record.items() if k != "attributes"}) | {
        name: None for name, value in record.items() if value is None
    }


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
    commits: int = 0


def latest_per_record(updates: Sequence[RecordUpdate]) -> list[RecordUpdate]:
    """One update per record, the latest (a collection must not name a record twice)."""
    latest: dict[tuple[str, str], RecordUpdate] = {}
    for update in updates:
        key = (update.sobject, update.record_id)
        latest.pop(key, None)
        latest[key] = update
    return list(latest.values())


class WritebackLoop:
    """This connector's results in, REST PATCHes out, offsets committed after the write."""

    def __init__(
        self,
        *,
        name: str,
        signer: CorrelationSigner,
        config: WritebackConfig,
        consumer: Consumer,
        rest: SalesforceRest,
        retry: RetryPolicy | None = None,
        poll_timeout_s: float = 0.5,
    ) -> None:
        self.name = name
        self.signer = signer
        self.config = config
        self.consumer = consumer
        self.rest = rest
        self.retry = retry or RetryPolicy(
            max_attempts=1_000_000, base_delay_s=0.5, max_delay_s=30.0, max_elapsed_s=1e9
        )
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
            except TransientRestError as exc:
                failures += 1
                self._rewind(messages)
                delay = self.retry.next_delay(failures, 0.0) or self.retry.max_delay_s
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
        for message in messages:
            if message.error() is not None or not message.value():
                continue
            try:
                result = schemas.decode(message.value() or b"", InferenceResult)
            except DecodeError:
                continue
            target = record_of(result, self.signer)
            if isinstance(target, Rejected):
                if target.reason != "not_ours":
                    self._count_forged(result, target.reason)
                continue
            self.stats.results += 1
            values = writeback_values(result, self.config)
            if values is None:
                self.stats.not_ok += 1
                log.info(
                    'event="not_written" request_id="%s" status="%s" record_id="%s"',
                    result.request_id,
                    result.status.value,
                    target[1],
                )
                continue
            updates.append(RecordUpdate(target[0], target[1], values))
        for chunk in chunks(latest_per_record(updates)):
            chunk = self._not_yet_written(chunk)
            if not chunk:
                continue
            for outcome in self.rest.update_records(chunk):
                if outcome.ok:
                    self.stats.written += 1
                    continue
                code = outcome.error_code or "UNKNOWN"
                if outcome.transient:
                    raise TransientRestError(
                        f"{outcome.update.record_id}: {code} {outcome.message}",
                        status=200,
                        error_code=code,
                    )
                self.stats.failed[code] = self.stats.failed.get(code, 0) + 1
                log.warning(
                    'event="writeback_refused" sobject="%s" record_id="%s" error_code="%s" '
                    'message="%s"',
                    outcome.update.sobject,
                    outcome.update.record_id,
                    code,
                    outcome.message,
                )

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
        marker = self.config.marker_field
        if marker is None:
            return chunk
        pending: list[RecordUpdate] = []
        by_type: dict[str, list[RecordUpdate]] = {}
        for update in chunk:
            by_type.setdefault(update.sobject, []).append(update)
        for sobject, group in by_type.items():
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
    "IngestLoop",
    "IngestStats",
    "WritebackLoop",
    "WritebackStats",
    "latest_per_record",
]
