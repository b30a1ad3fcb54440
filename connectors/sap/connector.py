"""The running SAP connector: events or polling in, requests to Kafka, scores written back.

Intake, per business event (CloudEvent pushed to ``POST <path>``):

1. parse the event (structured, binary or batched mode); an invalid one is dead-lettered;
2. derive the request id from the event id: an event already published (seen in the requests
   topic, at start-up, or by this process since) is answered 2xx at once, and one still in
   flight is waited for, so a redelivery never becomes a second request;
3. read the entity named by the event's keys over OData, map it, publish the request and wait
   for the broker's acknowledgement;
4. only then answer 2xx; any transient failure answers 503, so SAP delivers the event again.

Polling mode reads ``$filter=<delta_field> ge <position>`` pages in change order, publishes
each page's requests, and checkpoints the page's newest change time once they are acked.

Writeback consumes ``<ns>.<model>.results`` in the connector's own consumer group, picks the
results whose correlation id this connector signed for their request id (anything else that
claims to be this connector's is counted as ``forged``, logged and never written), and writes
each back (read the entity for
its ETag, skip it if its marker field already holds the request id, PATCH/MERGE with
``If-Match``, or call the configured action). Offsets are committed only after every result
up to them was written (or dead-lettered as permanently unwritable).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

import schemas
from connectors.common.checkpoint import CheckpointStore
from connectors.common.correlation import Rejected
from connectors.common.dates import parse_datetime, to_iso_utc
from connectors.common.dead_letters import send_unmappable
from connectors.common.exceptions import UnmappableRecord
from connectors.common.mapping import Mapping
from connectors.sap.client import ODataClient
from connectors.sap.cloudevents import CloudEvent, parse_http
from connectors.sap.exceptions import (
    EntityNotFound,
    InvalidCloudEvent,
    ODataError,
    PreconditionFailed,
)
from connectors.sap.odata import EntityRecord, EntitySource, delta_value, key_predicate
from connectors.sap.webhook import WebhookGuard, WebhookSecurity, check_listen
from connectors.sap.webhook_auth import AuthFailure
from connectors.sap.webhook_limits import retry_after
from connectors.sap.writeback import (
    Skip,
    WritebackCall,
    WritebackSpec,
    correlation_id,
    plan_writeback,
    predicate_of,
    signer,
)
from pipeline.client import request_id_for
from pipeline.kafka import clients
from pipeline.kafka.admin import ensure_topics, model_topic_specs
from pipeline.kafka.clients import ConsumerRole, ProducerRole
from pipeline.kafka.producer import AsyncProducer, DeliveryError, OutgoingMessage
from pipeline.settings import Settings
from pipeline.topics import ModelTopics
from schemas.exceptions import DecodeError
from schemas.models import InferenceRequest, InferenceResult

log = logging.getLogger(__name__)

EVENTS_STREAM = "events"
"""Checkpoint stream of push mode: the id of the newest event whose request was acked."""
PERMANENT_WRITE_STATUSES = frozenset({400, 404, 405, 409, 410, 422, 428})
"""Answers that no retry changes (the entity is gone, the field is not updatable): the result
is dead-lettered and its offset committed. Anything else (401/403 after a credential change,
5xx, timeouts) holds the partition and is retried, so no score is skipped."""
WRITE_CONFLICT_ATTEMPTS = 3
"""A 412 means the entity changed between our read and our write: read again, this often."""


def delta_stream(source: EntitySource) -> str:
    return f"delta:{source.entity_set}"


@dataclass
class ConnectorStats:
    events: int = 0
    published: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    polled: int = 0
    written: int = 0
    already_written: int = 0
    skipped: int = 0
    write_failures: int = 0
    own_changes: int = 0
    auth_failures: int = 0
    """Deliveries refused 401 (reasons in the log and in ``WebhookGuard.refusals``)."""
    rate_limited: int = 0
    """Deliveries refused 429."""
    too_many_events: int = 0
    """Deliveries refused 413 for carrying more events than allowed."""
    forged: int = 0
    """Results claiming to be this connector's without its valid signature for their request."""
    skips: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class SapConnector:
    """One mapping's connector; build it, ``await start()``, then serve and/or poll."""

    def __init__(
        self,
        settings: Settings,
        mapping: Mapping,
        odata: ODataClient,
        *,
        secrets: tuple[bytes, ...],
        name: str = "sap",
        dedupe_window: timedelta = timedelta(days=1),
        writeback_concurrency: int = 8,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.mapping = mapping
        self.odata = odata
        self.name = name
        self.signer = signer(name, secrets)
        self.source = odata.source
        self.writeback_spec = (
            WritebackSpec.from_mapping(mapping.writeback) if mapping.writeback else None
        )
        self.topics = ModelTopics(settings.namespace, mapping.model)
        self.stats = ConnectorStats()
        self.checkpoints = CheckpointStore(settings, name)
        self.positions: dict[str, str] = {}
        self._dedupe_window = dedupe_window
        self._clock = clock
        self._producer: AsyncProducer | None = None
        self._published: set[str] = set()
        self._in_flight: dict[str, asyncio.Future[str]] = {}
        self._newest_event: str | None = None
        self._saved_event: str | None = None
        self._written: set[str] = set()
        self._write_slots = asyncio.Semaphore(writeback_concurrency)
        self._batch_done = False
        self._own_etags: dict[str, str] = {}
        self._writing: dict[str, asyncio.Event] = {}

    @property
    def writeback_group(self) -> str:
        """The writeback's consumer group (group ids are cluster-wide: namespaced)."""
        return f"{self.settings.namespace}.connector.{self.name}.writeback"

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Create topics, load checkpoints, and learn which requests are already published."""
        await asyncio.to_thread(ensure_topics, self.settings.kafka, model_topic_specs(self.topics))
        self.positions = await asyncio.to_thread(self.checkpoints.load)
        self._saved_event = self.positions.get(EVENTS_STREAM)
        since = self._clock() - self._dedupe_window
        self._published = await asyncio.to_thread(
            published_request_ids,
            self.settings,
            self.topics.requests,
            self.mapping.source_system,
            since,
        )
        self._producer = AsyncProducer(
            clients.producer(self.settings.kafka, role=ProducerRole.REQUESTS)
        )
        log.info(
            'sap connector started name="%s" model="%s" known_requests="%d" positions="%s"',
            self.name,
            self.mapping.model,
            len(self._published),
            self.positions,
        )

    async def close(self) -> None:
        await self.save_event_checkpoint()
        if self._producer is not None:
            await asyncio.to_thread(self._producer.close, 10.0)
        await asyncio.to_thread(self.checkpoints.close)
        await self.odata.close()

    # ------------------------------------------------------------------ intake: events

    async def handle_http(
        self, headers: dict[str, str], body: bytes, *, max_events: int | None = None
    ) -> tuple[int, dict[str, Any]]:
        """The HTTP answer to one push: 200 once every event is published (or dead-lettered),
        503 when something transient failed (the sender delivers again), 413 (nothing
        published) when a batch holds more than ``max_events`` events."""
        try:
            events = parse_http(headers, body)
        except InvalidCloudEvent as invalid:
            await self._dead_letter(
                body, invalid.reason_code, invalid.message, key=None, headers=_ce_headers(headers)
            )
            return 200, {"outcome": "dead_lettered", "reason": invalid.reason_code}
        if max_events is not None and len(events) > max_events:
            self.stats.too_many_events += 1
            return 413, {
                "error": "too_many_events",
                "reason": f"a delivery may carry at most {max_events} events; this one has "
                f"{len(events)}: send smaller batches",
            }
        outcomes = []
        try:
            for event in events:
                outcomes.append(await self.ingest_event(event))
        except (ODataError, DeliveryError) as failure:
            log.warning('event intake failed, sender will retry error="%s"', failure)
            return 503, {"error": str(failure)}
        return 200, {"outcomes": outcomes}

    async def ingest_event(self, event: CloudEvent) -> str:
        """Publish the request for one event; returns ``published``, ``duplicate`` or
        ``dead_lettered``. Transient failures raise (:class:`ODataError`, ``DeliveryError``)."""
        self.stats.events += 1
        request_id = str(request_id_for(self.mapping.source_system, event.id))
        if request_id in self._published:
            self.stats.duplicates += 1
            return "duplicate"
        running = self._in_flight.get(request_id)
        if running is not None:
            await asyncio.shield(running)
            self.stats.duplicates += 1
            return "duplicate"
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._in_flight[request_id] = future
        try:
            outcome = await self._ingest(event, request_id)
            future.set_result(outcome)
            return outcome
        except BaseException as failure:
            future.set_exception(failure)
            future.exception()  # retrieved: a waiter may never come
            raise
        finally:
            del self._in_flight[request_id]

    async def _ingest(self, event: CloudEvent, request_id: str) -> str:
        payload = json.dumps(event.structured()).encode()
        if self.source.event_types and event.type not in self.source.event_types:
            await self._dead_letter(
                payload,
                "unexpected_event_type",
                f"event type {event.type!r} is not one this mapping handles",
                key=event.id,
                request_id=request_id,
            )
            return "dead_lettered"
        try:
            if not isinstance(event.data, dict):
                raise UnmappableRecord("missing_key", "the event's data carries no entity keys")
            try:
                predicate = key_predicate(self.source, event.data)
            except KeyError as missing:
                raise UnmappableRecord(
                    "missing_key", f"the event's data lacks key field {missing.args[0]!r}"
                ) from None
            except ValueError as invalid:
                raise UnmappableRecord("invalid_key", str(invalid)) from None
            try:
                record = await self.odata.read_entity(predicate)
            except EntityNotFound as gone:
                raise UnmappableRecord("entity_not_found", str(gone)) from None
            if await self._is_own_change(predicate, record):
                self.stats.own_changes += 1
                return "own_change"
            request = self.mapping.to_request(
                record.properties,
                source_event_id=event.id,
                correlation_id=correlation_id(self.signer, predicate, request_id),
            )
        except UnmappableRecord as unmappable:
            await self._dead_letter(
                payload,
                unmappable.reason_code,
                unmappable.message,
                key=event.id,
                request_id=request_id,
            )
            return "dead_lettered"
        await self._publish([request])
        self._newest_event = event.id
        return "published"

    # ------------------------------------------------------------------ intake: polling

    async def poll_once(self) -> int:
        """Read every change since the checkpointed position; return how many were published.

        Each query starts from the position and is left after its first page that moves the
        position on; the next query starts from there. Following the server's next link
        instead would be unsafe: ``$skiptoken`` paging is positional in many services, and
        entities changed meanwhile (our own writebacks change them!) move to the end of the
        order, shifting unread ones in front of the token, never to be read. The next link
        is followed only while a page moves nothing on (a run of equal change times).
        """
        published = 0
        while True:
            advanced, count = await self._poll_from_position()
            published += count
            if not advanced:
                return published

    async def _poll_from_position(self) -> tuple[bool, int]:
        stream = delta_stream(self.source)
        stored = self.positions.get(stream)
        since = parse_datetime(stored) if stored else None
        published = 0
        async with contextlib.aclosing(self.odata.read_changes(since)) as pages:
            async for page in pages:
                requests: list[InferenceRequest] = []
                newest = since
                for record in page.records:
                    request, changed = await self._polled_request(record)
                    if changed is not None and (newest is None or changed > newest):
                        newest = changed
                    if request is not None and str(request.request_id) not in self._published:
                        requests.append(request)
                # Step 1: publish the page's requests and wait for the broker's acks.
                await self._publish(requests)
                published += len(requests)
                self.stats.polled += len(page.records)
                if newest is not None and newest != since:
                    # Step 2: only now is the page's newest change time a safe position.
                    position = to_iso_utc(newest)
                    await asyncio.to_thread(self.checkpoints.save, stream, position)
                    self.positions[stream] = position
                    return True, published
        return False, published

    async def _polled_request(
        self, record: EntityRecord
    ) -> tuple[InferenceRequest | None, datetime | None]:
        payload = json.dumps(record.properties, default=str).encode()
        changed: datetime | None = None
        try:
            try:
                changed = delta_value(record, self.source)
                predicate = key_predicate(self.source, record.properties)
            except KeyError as missing:
                raise UnmappableRecord(
                    "missing_key", f"key field {missing.args[0]!r} is missing"
                ) from None
            except ValueError as invalid:
                raise UnmappableRecord("invalid_field", str(invalid)) from None
            if await self._is_own_change(predicate, record):
                self.stats.own_changes += 1
                return None, changed
            event_id = f"{self.source.entity_set}{predicate}@{to_iso_utc(changed)}"
            request = self.mapping.to_request(
                record.properties,
                source_event_id=event_id,
                correlation_id=correlation_id(
                    self.signer,
                    predicate,
                    request_id_for(self.mapping.source_system, event_id),
                ),
            )
        except UnmappableRecord as unmappable:
            await self._dead_letter(payload, unmappable.reason_code, unmappable.message, key=None)
            return None, changed
        return request, changed

    async def run_polling(self, interval_s: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.poll_once()
            except (ODataError, DeliveryError) as failure:
                log.warning('poll failed, next poll retries error="%s"', failure)
            await pause(stop, interval_s)

    async def _is_own_change(self, predicate: str, record: EntityRecord) -> bool:
        """Whether the entity is as our own writeback left it: its change is our score,
        not news to score again (else every writeback would come back as a change).

        A read that raced a write of ours waits for the write's answer: the entity may
        already show the write's ETag before the connector has learnt it.
        """
        writing = self._writing.get(predicate)
        if writing is not None:
            await writing.wait()
        return record.etag is not None and self._own_etags.get(predicate) == record.etag

    # ------------------------------------------------------------------ publishing

    async def _publish(self, requests: Iterable[InferenceRequest]) -> None:
        batch = list(requests)
        if not batch:
            return
        assert self._producer is not None, "start() first"

        await self._producer.submit_all(
            [
                OutgoingMessage(
                    self.topics.requests,
                    schemas.encode(request),
                    request.source.entity_id if request.source else str(request.request_id),
                    list(schemas.message_headers(request.AVRO_NAME)),
                )
                for request in batch
            ]
        )
        for request in batch:
            self._published.add(str(request.request_id))
        self.stats.published += len(batch)

    async def _dead_letter(
        self,
        payload: bytes,
        reason: str,
        message: str,
        *,
        key: str | None,
        request_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        log.warning('dead-lettered reason="%s" key="%s" message="%s"', reason, key, message)
        producer = self._producer.raw if self._producer is not None else None
        await asyncio.to_thread(
            lambda: send_unmappable(
                self.settings,
                model=self.mapping.model,
                source_payload=payload,
                reason_code=reason,
                message=message,
                source_system=self.mapping.source_system,
                producer=producer,
                source_key=key,
                source_headers=headers,
                request_id=request_id,
                connector=self.name,
            )
        )
        self.stats.dead_lettered += 1

    async def save_event_checkpoint(self) -> None:
        newest = self._newest_event
        if newest is not None and newest != self._saved_event:
            await asyncio.to_thread(self.checkpoints.save, EVENTS_STREAM, newest)
            self._saved_event = newest
            self.positions[EVENTS_STREAM] = newest

    async def run_checkpoints(self, stop: asyncio.Event, interval_s: float = 0.5) -> None:
        """Save the newest acked event id now and then (each request was acked before it)."""
        while not stop.is_set():
            await pause(stop, interval_s)
            await self.save_event_checkpoint()

    # ------------------------------------------------------------------ writeback

    async def run_writeback(self, stop: asyncio.Event, poll_s: float = 0.5) -> None:
        """Write results back until ``stop``; commit offsets only after their writes."""
        if self.writeback_spec is None:
            return
        consumer = clients.consumer(
            self.settings.kafka,
            group_id=self.writeback_group,
            role=ConsumerRole.COMMITTED,
            overrides={
                # Static membership: a restarted connector takes its partitions back at once
                # instead of waiting out the dead member's session.
                "group.instance.id": f"{self.writeback_group}.0",
                "session.timeout.ms": 10_000,
            },
        )
        consumer.subscribe([self.topics.results])
        try:
            while not stop.is_set():
                messages = await asyncio.to_thread(consumer.consume, 200, poll_s)
                records = [m for m in messages if m.error() is None]
                if not records:
                    continue
                await self._write_batch(records, stop)
                if stop.is_set() and not self._batch_done:
                    return  # stopped mid-batch: commit nothing, the next run redoes it
                await asyncio.to_thread(_commit, consumer, records)
        finally:
            await asyncio.to_thread(consumer.close)

    async def _write_batch(self, messages: list[Message], stop: asyncio.Event) -> None:
        # One entity's results in offset order (an older score never overwrites a newer one);
        # different entities in parallel.
        by_entity: dict[str, list[InferenceResult]] = defaultdict(list)
        for message in messages:
            try:
                result = schemas.decode(message.value() or b"", InferenceResult)
            except DecodeError:
                continue
            predicate = predicate_of(self.signer, result)
            if isinstance(predicate, Rejected):
                if predicate.reason != "not_ours":
                    self._count_forged(result, predicate.reason)
                continue
            by_entity[predicate].append(result)
        self._batch_done = False

        async def write_entity(predicate: str, results: list[InferenceResult]) -> None:
            for result in results:
                await self._write_until_done(predicate, result, stop)

        await asyncio.gather(*(write_entity(p, rs) for p, rs in by_entity.items()))
        self._batch_done = not stop.is_set()

    def _count_forged(self, result: InferenceResult, reason: str) -> None:
        # One line, no feature values or scores: the request id lets an operator find the
        # request, the reason says what was wrong with its correlation id.
        self.stats.forged += 1
        log.warning(
            'writeback refused: result not signed for its request reason="%s" request_id="%s" '
            'model="%s"',
            reason,
            result.request_id,
            result.model,
        )

    async def _write_until_done(
        self, predicate: str, result: InferenceResult, stop: asyncio.Event
    ) -> None:
        """Write one result; failures are retried (the partition waits) until it is written,
        dead-lettered as permanently unwritable, or the connector stops."""
        delay = 1.0
        while not stop.is_set():
            try:
                async with self._write_slots:
                    await self.write_result(predicate, result)
                return
            except ODataError as failure:
                if failure.status in PERMANENT_WRITE_STATUSES:
                    self.stats.write_failures += 1
                    await self._dead_letter(
                        schemas.encode(result),
                        f"writeback_failed_{failure.status}",
                        str(failure),
                        key=predicate,
                        request_id=str(result.request_id),
                    )
                    return
                log.warning('writeback retried later error="%s"', failure)
            await pause(stop, delay)
            delay = min(delay * 2, 30.0)

    async def write_result(self, predicate: str, result: InferenceResult) -> None:
        """Write one result back once: duplicates (same request id) are skipped."""
        assert self.writeback_spec is not None
        request_id = str(result.request_id)
        if request_id in self._written:
            self.stats.already_written += 1
            return
        plan = plan_writeback(
            result, predicate=predicate, source=self.source, spec=self.writeback_spec
        )
        if isinstance(plan, Skip):
            self.stats.skipped += 1
            self.stats.skips[plan.reason] += 1
            return
        if plan.method == "POST":
            await self.odata.write(plan, None)
        elif not await self._update_entity(predicate, plan):
            self._written.add(request_id)
            self.stats.already_written += 1
            return
        self._written.add(request_id)
        self.stats.written += 1

    async def _update_entity(self, predicate: str, plan: WritebackCall) -> bool:
        """PATCH/MERGE with the entity's current ETag; ``False`` when the marker shows it was
        already written (by a run that stopped before committing its offset)."""
        for attempt in range(1, WRITE_CONFLICT_ATTEMPTS + 1):
            try:
                record = await self.odata.read_entity(predicate)
            except EntityNotFound as gone:
                raise ODataError(str(gone), status=404) from None
            if plan.marker is not None:
                name, value = plan.marker
                if str(record.properties.get(name) or "") == value:
                    return False
            writing = self._writing[predicate] = asyncio.Event()
            try:
                response = await self.odata.write(plan, record.etag)
                etag = response.headers.get("etag")
                if etag:
                    self._own_etags[predicate] = etag
            except PreconditionFailed:
                if attempt == WRITE_CONFLICT_ATTEMPTS:
                    raise ODataError(
                        f"{plan.path}: the entity kept changing (412 x{attempt})",
                        status=412,
                        transient=True,
                    ) from None
                continue
            finally:
                writing.set()
                del self._writing[predicate]
            return True
        return True  # unreachable: the last attempt returns or raises

    # ------------------------------------------------------------------ HTTP receiver

    def web_app(self, path: str = "/events", guard: WebhookGuard | None = None) -> web.Application:
        """The receiver; ``guard`` (rate limit, authentication, events cap) comes before
        anything of a delivery is parsed, published or dead-lettered."""

        async def receive(request: web.Request) -> web.Response:
            client = request.remote or "unknown"
            if guard is not None:
                wait = guard.admit(client)
                if wait > 0:
                    self.stats.rate_limited += 1
                    return web.json_response(
                        {"error": "rate_limited"},
                        status=429,
                        headers={"Retry-After": retry_after(wait)},
                    )
                if not guard.needs_body():
                    refused = await _authenticate(guard, request, b"", client)
                    if refused is not None:
                        return refused
            body = await request.read()
            if guard is not None and guard.needs_body():
                refused = await _authenticate(guard, request, body, client)
                if refused is not None:
                    return refused
            status, answer = await self.handle_http(
                dict(request.headers),
                body,
                max_events=guard.max_events if guard is not None else None,
            )
            headers = {"Retry-After": "5"} if status == 503 else None
            return web.json_response(answer, status=status, headers=headers)

        async def _authenticate(
            guard: WebhookGuard, request: web.Request, body: bytes, client: str
        ) -> web.Response | None:
            try:
                await guard.authenticate(request.headers, body, client)
            except AuthFailure as failure:
                self.stats.auth_failures += 1
                # Never the reason: it would tell a prober which part of its guess was wrong.
                return web.json_response(
                    {"error": "unauthorized"},
                    status=401,
                    headers={"WWW-Authenticate": failure.challenge},
                )
            return None

        async def health(_request: web.Request) -> web.Response:
            counts = {k: v for k, v in vars(self.stats).items() if isinstance(v, int)}
            return web.json_response({"status": "ok", **counts})

        app = web.Application(client_max_size=self.settings.workers.max_message_bytes)
        app.router.add_post(path, receive)
        app.router.add_get("/healthz", health)
        return app


async def pause(stop: asyncio.Event, seconds: float) -> None:
    """Wait ``seconds``, or less when ``stop`` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def _ce_headers(headers: dict[str, str]) -> dict[str, str]:
    return {
        name: value
        for name, value in headers.items()
        if name.lower().startswith("ce-") or name.lower() == "content-type"
    }


def _commit(consumer: Consumer, messages: list[Message]) -> None:
    ends: dict[tuple[str, int], int] = {}
    for message in messages:
        place = (str(message.topic()), int(message.partition() or 0))
        ends[place] = max(ends.get(place, -1), int(message.offset() or 0) + 1)
    consumer.commit(
        offsets=[TopicPartition(t, p, o) for (t, p), o in ends.items()], asynchronous=False
    )


def published_request_ids(
    settings: Settings, topic: str, source_system: str, since: datetime, timeout_s: float = 30.0
) -> set[str]:
    """Ids of the requests of ``source_system`` published to ``topic`` since ``since``.

    The requests topic is the truth of what was published: a connector killed after the
    broker acked a request but before it answered the sender finds the request here, and the
    redelivered event is recognised as a duplicate.
    """
    consumer = clients.consumer(
        settings.kafka,
        group_id=clients.throwaway_group("sluiceway-dedupe"),
        role=ConsumerRole.SNAPSHOT,
    )
    found: set[str] = set()
    try:
        metadata = consumer.list_topics(topic, timeout=timeout_s)
        partitions = sorted(metadata.topics[topic].partitions)
        since_ms = int(since.timestamp() * 1000)
        starts = consumer.offsets_for_times(
            [TopicPartition(topic, p, since_ms) for p in partitions], timeout=timeout_s
        )
        assigned = [tp for tp in starts if tp.offset >= 0]
        if not assigned:
            return found
        consumer.assign(assigned)
        open_partitions = {tp.partition for tp in assigned}
        while open_partitions:
            message = consumer.poll(timeout_s)
            if message is None:
                raise TimeoutError(f"reading {topic} for published requests timed out")
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    open_partitions.discard(int(message.partition() or 0))
                    continue
                raise KafkaException(error)
            try:
                request = schemas.decode(message.value() or b"", InferenceRequest)
            except DecodeError:
                continue
            if request.source is not None and request.source.system == source_system:
                found.add(str(request.request_id))
    finally:
        consumer.close()
    return found


async def serve(
    connector: SapConnector,
    *,
    host: str = "127.0.0.1",
    port: int | None = 8089,
    path: str = "/events",
    poll_interval_s: float | None = None,
    writeback: bool = True,
    stop: asyncio.Event | None = None,
    ready: Callable[[int | None], None] | None = None,
    security: WebhookSecurity | None = None,
) -> ConnectorStats:
    """Run the connector until ``stop`` (or SIGTERM/SIGINT): the receiver on ``host:port``
    (``port=None``: no receiver), polling every ``poll_interval_s`` (``None``: no polling),
    and the writeback loop. ``ready`` is called with the bound port once it listens.

    ``security`` guards the receiver (authentication, TLS, rate and size limits); without
    it, or without its verifier, only a loopback ``host`` is accepted (:func:`check_listen`).
    """
    security = security or WebhookSecurity()
    guard: WebhookGuard | None = None
    if port is not None:
        check_listen(host, security)
        guard = WebhookGuard(security)
        await guard.start()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await connector.start()
    runner: web.AppRunner | None = None
    bound: int | None = None
    tasks = [asyncio.create_task(connector.run_checkpoints(stop), name="checkpoints")]
    try:
        if port is not None:
            runner = web.AppRunner(connector.web_app(path, guard))
            await runner.setup()
            site = web.TCPSite(runner, host, port, ssl_context=security.tls)
            await site.start()
            addresses = runner.addresses
            bound = int(addresses[0][1]) if addresses else port
        if poll_interval_s is not None:
            tasks.append(
                asyncio.create_task(connector.run_polling(poll_interval_s, stop), name="polling")
            )
        if writeback:
            tasks.append(asyncio.create_task(connector.run_writeback(stop), name="writeback"))
        log.info('sap connector serving port="%s" path="%s"', bound, path)
        if ready is not None:
            ready(bound)
        stopped = asyncio.create_task(stop.wait(), name="stop")
        pending: set[asyncio.Task[Any]] = {stopped, *tasks}
        while stopped in pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done - {stopped}:
                # A loop that ends with an error stops the connector with it (a supervisor
                # restarts it), rather than letting it run on half-working.
                failure = task.exception()
                if failure is not None:
                    log.error(
                        'sap connector task failed task="%s" error="%s"', task.get_name(), failure
                    )
                    raise failure
    finally:
        stop.set()
        if runner is not None:
            await runner.cleanup()
        await asyncio.gather(*tasks, return_exceptions=True)
        await connector.close()
    return connector.stats
