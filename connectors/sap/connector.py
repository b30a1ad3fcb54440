"""The running SAP connector: events or polling in, requests to Kafka, scores written back.

Intake, per business event (CloudEvent pushed to ``POST <path>``):

1. parse the event (structured, binary or batched mode); an invalid one is dead-lettered
   (once: the same malformed body delivered again is a duplicate);
2. route it by CloudEvents ``source`` and ``type`` to one of the connector's mappings
   (:mod:`connectors.sap.routing`); an event no mapping takes is skipped and counted;
3. derive the event's key from its ``source`` and ``id`` (the CloudEvents identity): an event
   already handled (seen in the requests topic at start-up, or by this process since) is
   answered 2xx at once, and one still in flight is waited for, so a redelivery never becomes
   a second request;
4. a cancellation (``...Canceled``) publishes an invalidation for the entity and remembers it,
   so a create or change of it that arrives later is skipped; anything else reads the entity
   named by the event's keys over OData (from the system the event came from), maps it,
   publishes the request and waits for the broker's acknowledgement;
5. only then answer 2xx; any transient failure answers 503, so SAP delivers the event again.

Every input event ends in exactly one outcome (:data:`OUTCOMES`), counted in
``ConnectorStats.outcomes`` (``/healthz`` and the connector's summary).

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
import uuid
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from hashlib import sha256
from typing import Any

from aiohttp import web
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from pydantic import ValidationError

import schemas
from connectors.common.checkpoint import CheckpointStore
from connectors.common.correlation import Rejected
from connectors.common.dates import parse_datetime, to_iso_utc
from connectors.common.dead_letters import (
    letter_privacy,
    letter_source_event,
    send_unmappable,
    source_event_key,
)
from connectors.common.dedupe import RecentKeys
from connectors.common.exceptions import UnmappableRecord
from connectors.common.invalidation import invalidation_message
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
from connectors.sap.routing import EventKind, RouteRule, event_kind, route_for, route_subject
from connectors.sap.webhook import WebhookGuard, WebhookSecurity, check_listen
from connectors.sap.webhook_auth import AuthFailure
from connectors.sap.webhook_limits import retry_after
from connectors.sap.writeback import (
    Skip,
    WritebackCall,
    WritebackSpec,
    correlation_id,
    entity_of,
    plan_writeback,
    signer,
)
from pipeline import tracing
from pipeline.kafka import clients
from pipeline.kafka.admin import ensure_topics, invalidation_topic_spec, model_topic_specs
from pipeline.kafka.clients import ConsumerRole, ProducerRole
from pipeline.kafka.producer import AsyncProducer, DeliveryError, OutgoingMessage
from pipeline.settings import Settings
from pipeline.topics import ModelTopics
from schemas.exceptions import DecodeError
from schemas.identity import message_key, request_id_for
from schemas.models import InferenceRequest, InferenceResult, Invalidation, InvalidationKind

log = logging.getLogger(__name__)

EVENTS_STREAM = "events"
"""Checkpoint stream of push mode: the id of the newest event whose request was acked."""
PERMANENT_WRITE_STATUSES = frozenset({400, 404, 405, 409, 410, 422, 428})
"""Answers that no retry changes (the entity is gone, the field is not updatable): the result
is dead-lettered and its offset committed. Anything else (401/403 after a credential change,
5xx, timeouts) holds the partition and is retried, so no score is skipped."""
WRITE_CONFLICT_ATTEMPTS = 3
"""A 412 means the entity changed between our read and our write: read again, this often."""


OUTCOMES = ("request", "invalidation", "duplicate", "skipped", "dead_letter")
"""What became of an input event; each event has exactly one."""
MALFORMED_ROUTE = "(malformed)"
"""Where a delivery that is no CloudEvent is counted: it names no route."""


def delta_stream(source: EntitySource, route_name: str = "") -> str:
    """The polling position's checkpoint stream; per route once there are several systems
    (two systems have the same entity sets)."""
    return f"delta:{route_name or source.entity_set}"


def cancelled_key(source_system: str, model: str, entity_id: str) -> str:
    """How a cancelled entity is remembered: by the entity id its requests are keyed by."""
    return f"{source_system}|{model}|{entity_id}"


def event_letter_key(request_id: str) -> str:
    """The source-event key of an event's dead letter: its request id (``source`` and ``id``
    hashed with the source system), which the memory of handled events holds."""
    return source_event_key(f"event:{request_id}")


def malformed_letter_key(body: bytes) -> str:
    """The source-event key of a malformed body's dead letter: the body's digest (it has no
    trustworthy id, and a digest quotes nothing of it)."""
    return source_event_key(f"malformed:{sha256(body).hexdigest()}")


def remember_letters(
    keys: Iterable[str], handled: RecentKeys, malformed: RecentKeys
) -> tuple[int, int]:
    """Put the source-event keys read back from the DLQ into the memories they came from:
    an event's request id into ``handled``, a malformed body's key into ``malformed``; keys
    of other forms (another connector's) are left alone. Returns how many went to each."""
    events = bodies = 0
    for key in keys:
        if key.startswith("event:"):
            handled.add(key.removeprefix("event:"))
            events += 1
        elif key.startswith("malformed:"):
            malformed.add(key)
            bodies += 1
    return events, bodies


def event_key(event: CloudEvent) -> str:
    """The source event id of a CloudEvent: ``source`` and ``id`` together are its identity
    (``id`` is unique only per source; two systems may reuse one)."""
    return f"{event.source}#{event.id}"


@dataclass(frozen=True, kw_only=True)
class Route(RouteRule):
    """A route with what it needs at run time: its system's OData client, its topics."""

    odata: ODataClient
    topics: ModelTopics
    writeback_spec: WritebackSpec | None


def build_route(
    namespace: str,
    mapping: Mapping,
    odata: ODataClient,
    *,
    name: str = "",
    system: str = "default",
    event_sources: tuple[str, ...] = (),
) -> Route:
    return Route(
        name=name,
        system=system,
        mapping=mapping,
        source=odata.source,
        event_sources=event_sources,
        odata=odata,
        topics=ModelTopics(namespace, mapping.model),
        writeback_spec=WritebackSpec.from_mapping(mapping.writeback) if mapping.writeback else None,
    )


@dataclass
class ConnectorStats:
    events: int = 0
    published: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    polled: int = 0
    polled_letters_repeated: int = 0
    """Unmappable polled records not dead-lettered again: their letter was written already
    (polling reads its newest change again on every poll)."""
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
    invalidations: int = 0
    """Invalidations published (cancelled or deleted entities)."""
    malformed: int = 0
    """Deliveries that were no CloudEvent (each dead-lettered once)."""
    remembered_events: int = 0
    """Keys in the memory of handled events (bounded)."""
    forgotten_events: int = 0
    """Keys that memory dropped for its bound (a redelivery after that is looked up again)."""
    remembered_writes: int = 0
    forgotten_writes: int = 0
    cancelled_entities: int = 0
    """Entities remembered as cancelled (bounded): a later create/change of them is skipped."""
    skips: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Results not written back, by reason."""
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    """Input events by outcome; they sum to the events received."""
    skipped_events: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Skipped input events by reason (``unmapped_type``, ``cancelled``, ``own_change``)."""
    outcomes_by_route: dict[str, dict[str, int]] = field(default_factory=dict)

    def count_outcome(self, route: str, outcome: str) -> None:
        self.outcomes[outcome] += 1
        by_route = self.outcomes_by_route.setdefault(route, dict.fromkeys(OUTCOMES, 0))
        by_route[outcome] += 1

    def counters(self) -> dict[str, Any]:
        """Everything as plain JSON: the counters, outcomes and reasons."""
        flat: dict[str, Any] = {k: v for k, v in vars(self).items() if isinstance(v, int)}
        flat["outcomes"] = dict(self.outcomes)
        flat["outcomes_by_route"] = {k: dict(v) for k, v in self.outcomes_by_route.items()}
        flat["skipped_events"] = dict(self.skipped_events)
        flat["skips"] = dict(self.skips)
        return flat

    def outcome_table(self) -> str:
        """Input events by route and outcome, with a total row that sums to ``events``."""
        width = max([len("route"), len("total"), *map(len, self.outcomes_by_route)])
        head = f"{'route':<{width}} " + " ".join(f"{o:>12}" for o in OUTCOMES) + f" {'events':>8}"
        lines = [head]
        rows = [*sorted(self.outcomes_by_route.items()), ("total", self.outcomes)]
        for route, counts in rows:
            cells = " ".join(f"{counts.get(o, 0):>12}" for o in OUTCOMES)
            lines.append(f"{route:<{width}} {cells} {sum(counts.values()):>8}")
        return "\n".join(lines)


class SapConnector:
    """One connector: its routes (mappings over systems); build it, ``await start()``, then
    serve and/or poll. ``SapConnector(settings, mapping, odata)`` is the one-route form."""

    def __init__(
        self,
        settings: Settings,
        mapping: Mapping | None = None,
        odata: ODataClient | None = None,
        *,
        routes: list[Route] | None = None,
        secrets: tuple[bytes, ...],
        name: str = "sap",
        dedupe_window: timedelta = timedelta(days=1),
        writeback_concurrency: int = 8,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        memory_keys: int = 200_000,
        monotonic: Callable[[], float] | None = None,
        letter_producer: Producer | None = None,
    ) -> None:
        if routes is None:
            if mapping is None or odata is None:
                raise ValueError("a mapping and its OData client, or routes")
            routes = [build_route(settings.namespace, mapping, odata)]
        if not routes:
            raise ValueError("a connector needs at least one route")
        names = [route.name for route in routes]
        if len(set(names)) != len(names):
            raise ValueError(f"route names repeat: {names}")
        self.settings = settings
        self.routes = routes
        self._routes_by_name = {route.name: route for route in routes}
        first = routes[0]
        # The first route stands for the connector where one is needed: malformed deliveries
        # (which name no route) are dead-lettered to its model.
        self.mapping = first.mapping
        self.odata = first.odata
        self.source = first.source
        self.writeback_spec = first.writeback_spec
        self.topics = first.topics
        # Refuses a model with a pii policy whose letters would keep raw payloads, as its worker.
        self.letter_privacy = {
            route.mapping.model: letter_privacy(settings, route.mapping.model) for route in routes
        }
        self.name = name
        self.signer = signer(name, secrets)
        self.stats = ConnectorStats()
        self.checkpoints = CheckpointStore(settings, name)
        self.positions: dict[str, str] = {}
        self._dedupe_window = dedupe_window
        self._clock = clock
        window_s = dedupe_window.total_seconds()
        memory: dict[str, Any] = {"max_keys": memory_keys, "max_age_s": max(window_s, 1.0)}
        if monotonic is not None:
            memory["clock"] = monotonic
        self._producer: AsyncProducer | None = None
        self._letter_producer = letter_producer
        """Where dead letters go; default the requests' producer (made at :meth:`start`)."""
        self._published = RecentKeys(**memory, name="published")
        """Request ids (the event keys) of events handled: published, invalidated,
        dead-lettered or skipped as cancelled."""
        self._malformed = RecentKeys(**memory, name="malformed")
        """Keys (:func:`malformed_letter_key`) of malformed bodies already dead-lettered."""
        self._cancelled = RecentKeys(**memory, name="cancelled")
        """``<route><predicate>`` of entities cancelled: a later create/change is skipped."""
        self._written = RecentKeys(**memory, name="written")
        self._in_flight: dict[str, asyncio.Future[str]] = {}
        self._newest_event: str | None = None
        self._saved_event: str | None = None
        self._write_slots = asyncio.Semaphore(writeback_concurrency)
        self._batch_done = False
        self._own_etags: dict[str, str] = {}
        self._writing: dict[str, asyncio.Event] = {}

    @property
    def writeback_group(self) -> str:
        """The writeback's consumer group (group ids are cluster-wide: namespaced)."""
        return f"{self.settings.namespace}.connector.{self.name}.writeback"

    def _models(self) -> dict[str, ModelTopics]:
        return {route.mapping.model: route.topics for route in self.routes}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Create topics, load checkpoints, and learn which events are already handled."""
        for topics in self._models().values():
            await asyncio.to_thread(ensure_topics, self.settings.kafka, model_topic_specs(topics))
            await asyncio.to_thread(
                ensure_topics, self.settings.kafka, [invalidation_topic_spec(topics)]
            )
        self.positions = await asyncio.to_thread(self.checkpoints.load)
        self._saved_event = self.positions.get(EVENTS_STREAM)
        since = self._clock() - self._dedupe_window
        known = 0
        for model, topics in self._models().items():
            systems = {r.mapping.source_system for r in self.routes if r.mapping.model == model}
            handled = await asyncio.to_thread(
                published_request_ids, self.settings, topics.requests, systems, since
            )
            invalidated, cancelled = await asyncio.to_thread(
                invalidated_events, self.settings, topics.invalidations, self.name, since
            )
            for request_id in sorted(handled | invalidated):
                self._published.add(request_id)
            for entity in sorted(cancelled):
                self._cancelled.add(entity)
            lettered = await asyncio.to_thread(
                dead_lettered_events, self.settings, topics.dlq, since
            )
            events, bodies = remember_letters(sorted(lettered), self._published, self._malformed)
            known += len(handled) + len(invalidated) + events + bodies
        self._producer = AsyncProducer(
            clients.producer(self.settings.kafka, role=ProducerRole.REQUESTS)
        )
        self._update_memory_stats()
        log.info(
            'sap connector started name="%s" routes="%s" known_events="%d" positions="%s"',
            self.name,
            ",".join(f"{r.name or r.mapping.model}" for r in self.routes),
            known,
            self.positions,
        )

    async def close(self) -> None:
        await self.save_event_checkpoint()
        if self._producer is not None:
            await asyncio.to_thread(self._producer.close, 10.0)
        await asyncio.to_thread(self.checkpoints.close)
        for route in self.routes:
            await route.odata.close()

    def _update_memory_stats(self) -> None:
        self.stats.remembered_events = len(self._published)
        self.stats.forgotten_events = self._published.evicted + self._malformed.evicted
        self.stats.remembered_writes = len(self._written)
        self.stats.forgotten_writes = self._written.evicted
        self.stats.cancelled_entities = len(self._cancelled)

    # ------------------------------------------------------------------ intake: events

    async def handle_http(
        self, headers: dict[str, str], body: bytes, *, max_events: int | None = None
    ) -> tuple[int, dict[str, Any]]:
        """The HTTP answer to one push: 200 once every event is published (or dead-lettered,
        invalidated, skipped), 503 when something transient failed (the sender delivers
        again), 413 (nothing published) when a batch holds more than ``max_events`` events."""
        try:
            events = parse_http(headers, body)
        except InvalidCloudEvent as invalid:
            return 200, await self._malformed_delivery(headers, body, invalid)
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
        finally:
            self._update_memory_stats()
        return 200, {"outcomes": outcomes}

    async def _malformed_delivery(
        self, headers: dict[str, str], body: bytes, invalid: InvalidCloudEvent
    ) -> dict[str, Any]:
        """Dead-letter a body that is no CloudEvent, once: a broker redelivers what it sent,
        and a second dead letter would be a second task for a person, about nothing new."""
        self.stats.events += 1
        self.stats.malformed += 1
        key = malformed_letter_key(body)
        if key in self._malformed:
            self.stats.duplicates += 1
            self.stats.count_outcome(MALFORMED_ROUTE, "duplicate")
            return {"outcome": "duplicate", "reason": invalid.reason_code}
        await self._dead_letter(
            self.routes[0],
            body,
            invalid.reason_code,
            invalid.message,
            key=None,
            headers=_ce_headers(headers),
            source_event=key,
        )
        self._malformed.add(key)
        self.stats.count_outcome(MALFORMED_ROUTE, "dead_letter")
        return {"outcome": "dead_letter", "reason": invalid.reason_code}

    async def ingest_event(self, event: CloudEvent) -> str:
        """Handle one event; returns its outcome (:data:`OUTCOMES`). Transient failures raise
        (:class:`ODataError`, ``DeliveryError``) and count no outcome: the sender retries."""
        route = route_for(self.routes, event)
        if route is None:
            self.stats.events += 1
            self.stats.skipped_events["unmapped_type"] += 1
            self.stats.count_outcome("(unmapped)", "skipped")
            log.info(
                'event skipped: no mapping takes it type="%s" source="%s"', event.type, event.source
            )
            return "skipped"
        request_id = str(request_id_for(route.mapping.source_system, event_key(event)))
        if request_id in self._published:
            return self._duplicate(route)
        running = self._in_flight.get(request_id)
        if running is not None:
            await asyncio.shield(running)
            return self._duplicate(route)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._in_flight[request_id] = future
        try:
            outcome = await self._ingest(route, event, request_id)
            self.stats.events += 1
            self.stats.count_outcome(route.name or route.mapping.model, outcome)
            future.set_result(outcome)
            return outcome
        except BaseException as failure:
            future.set_exception(failure)
            future.exception()  # retrieved: a waiter may never come
            raise
        finally:
            del self._in_flight[request_id]

    def _duplicate(self, route: Route) -> str:
        self.stats.events += 1
        self.stats.duplicates += 1
        self.stats.count_outcome(route.name or route.mapping.model, "duplicate")
        return "duplicate"

    async def _ingest(self, route: Route, event: CloudEvent, request_id: str) -> str:
        payload = json.dumps(event.structured()).encode()
        kind = event_kind(event.type)
        try:
            if not isinstance(event.data, dict):
                raise UnmappableRecord("missing_key", "the event's data carries no entity keys")
            try:
                predicate = key_predicate(route.source, event.data)
            except KeyError as missing:
                raise UnmappableRecord(
                    "missing_key", f"the event's data lacks key field {missing.args[0]!r}"
                ) from None
            except ValueError as invalid:
                raise UnmappableRecord("invalid_key", str(invalid)) from None
            entity = route_subject(route.name, predicate)
            if kind is not EventKind.SCORE:
                await self._invalidate(route, event, predicate, kind, request_id)
                self._published.add(request_id)
                self._newest_event = event.id
                return "invalidation"
            try:
                record = await route.odata.read_entity(predicate)
            except EntityNotFound as gone:
                raise UnmappableRecord("entity_not_found", str(gone)) from None
            if await self._is_own_change(entity, record):
                self.stats.own_changes += 1
                self.stats.skipped_events["own_change"] += 1
                return "skipped"
            request = route.mapping.to_request(
                record.properties,
                source_event_id=event_key(event),
                correlation_id=correlation_id(self.signer, entity, request_id),
            )
            if self._is_cancelled(request):
                # Out of order: the cancellation came first. The document is void; a score
                # of it would be a prediction about nothing.
                self.stats.skipped_events["cancelled"] += 1
                self._published.add(request_id)
                return "skipped"
        except UnmappableRecord as unmappable:
            await self._dead_letter(
                route,
                payload,
                unmappable.reason_code,
                unmappable.message,
                key=event.id,
                request_id=request_id,
                source_event=event_letter_key(request_id),
            )
            self._published.add(request_id)
            return "dead_letter"
        await self._publish(route, [request])
        self._newest_event = event.id
        return "request"

    async def _invalidate(
        self,
        route: Route,
        event: CloudEvent,
        predicate: str,
        kind: EventKind,
        request_id: str,
    ) -> None:
        """Publish the invalidation of a cancelled (or deleted) entity, keyed by the entity
        like its requests, and wait for the broker's acknowledgement."""
        assert self._producer is not None, "start() first"
        entity_key = await self._entity_id(route, event.data, predicate)
        try:
            invalidation = _invalidation(
                route,
                event,
                entity_key,
                kind,
                request_id,
                _event_time(event, self._clock),
                self.name,
            )
        except ValidationError as invalid:
            # Hostile or oversized attributes (an id longer than the contract allows):
            # the event is unusable as sent, like a missing key.
            raise UnmappableRecord(
                "invalid_event", f"the cancellation does not fit the contract: {invalid}"
            ) from None
        self._cancelled.add(
            cancelled_key(route.mapping.source_system, route.mapping.model, entity_key)
        )
        key, value, headers = invalidation_message(invalidation)
        await self._producer.submit_all(
            [OutgoingMessage(route.topics.invalidations, value, key, list(headers))]
        )
        self.stats.invalidations += 1
        log.info(
            'invalidation published entity="%s" model="%s" kind="%s"',
            entity_key,
            route.mapping.model,
            invalidation.kind.value,
        )

    def _is_cancelled(self, request: InferenceRequest) -> bool:
        if request.source is None:
            return False
        return (
            cancelled_key(request.source.system, request.model, request.source.entity_id)
            in self._cancelled
        )

    async def _entity_id(self, route: Route, keys: dict[str, Any], predicate: str) -> str:
        """The entity id (the Kafka key of its requests) of a cancelled entity: from the
        event's keys when the template needs no more, else from the entity as SAP still
        serves it (a cancelled document stays readable). ``UnmappableRecord`` when neither
        names it: an invalidation that no consumer could match is no invalidation."""
        try:
            return route.mapping.entity_id(keys)
        except UnmappableRecord:
            pass
        try:
            record = await route.odata.read_entity(predicate)
        except EntityNotFound:
            raise UnmappableRecord(
                "missing_key",
                "the cancelled entity is gone and the event's keys do not fill the entity id",
            ) from None
        return route.mapping.entity_id(record.properties)

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
        for route in self.routes:
            while True:
                advanced, count = await self._poll_from_position(route)
                published += count
                if not advanced:
                    break
        return published

    async def _poll_from_position(self, route: Route) -> tuple[bool, int]:
        stream = delta_stream(route.source, route.name)
        stored = self.positions.get(stream)
        since = parse_datetime(stored) if stored else None
        published = 0
        async with contextlib.aclosing(route.odata.read_changes(since)) as pages:
            async for page in pages:
                requests: list[InferenceRequest] = []
                newest = since
                for record in page.records:
                    request, changed = await self._polled_request(route, record)
                    if changed is not None and (newest is None or changed > newest):
                        newest = changed
                    if request is not None and str(request.request_id) not in self._published:
                        requests.append(request)
                # Step 1: publish the page's requests and wait for the broker's acks.
                await self._publish(route, requests)
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
        self, route: Route, record: EntityRecord
    ) -> tuple[InferenceRequest | None, datetime | None]:
        payload = json.dumps(record.properties, default=str).encode()
        changed: datetime | None = None
        # Until the record's change is known, its letter is keyed by its content: polling
        # reads the newest change again on every poll (``ge`` the position).
        letter = malformed_letter_key(payload)
        try:
            try:
                changed = delta_value(record, route.source)
                predicate = key_predicate(route.source, record.properties)
            except KeyError as missing:
                raise UnmappableRecord(
                    "missing_key", f"key field {missing.args[0]!r} is missing"
                ) from None
            except ValueError as invalid:
                raise UnmappableRecord("invalid_field", str(invalid)) from None
            entity = route_subject(route.name, predicate)
            if await self._is_own_change(entity, record):
                self.stats.own_changes += 1
                return None, changed
            event_id = f"{route.source.entity_set}{predicate}@{to_iso_utc(changed)}"
            request_id = request_id_for(route.mapping.source_system, event_id)
            letter = event_letter_key(str(request_id))
            request = route.mapping.to_request(
                record.properties,
                source_event_id=event_id,
                correlation_id=correlation_id(self.signer, entity, request_id),
            )
            if self._is_cancelled(request):
                return None, changed
        except UnmappableRecord as unmappable:
            if self._letter_written(letter):
                self.stats.polled_letters_repeated += 1
                return None, changed
            await self._dead_letter(
                route,
                payload,
                unmappable.reason_code,
                unmappable.message,
                key=None,
                source_event=letter,
            )
            remember_letters([letter], self._published, self._malformed)
            return None, changed
        return request, changed

    def _letter_written(self, key: str) -> bool:
        """Whether the letter of source-event ``key`` was written (by this run, or before a
        restart as the DLQ's headers said): an event's by its request id, else by digest."""
        if key.startswith("event:"):
            return key.removeprefix("event:") in self._published
        return key in self._malformed

    async def run_polling(self, interval_s: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.poll_once()
            except (ODataError, DeliveryError) as failure:
                log.warning('poll failed, next poll retries error="%s"', failure)
            await pause(stop, interval_s)

    async def _is_own_change(self, entity: str, record: EntityRecord) -> bool:
        """Whether the entity is as our own writeback left it: its change is our score,
        not news to score again (else every writeback would come back as a change).

        A read that raced a write of ours waits for the write's answer: the entity may
        already show the write's ETag before the connector has learnt it.
        """
        writing = self._writing.get(entity)
        if writing is not None:
            await writing.wait()
        return record.etag is not None and self._own_etags.get(entity) == record.etag

    # ------------------------------------------------------------------ publishing

    async def _publish(self, route: Route, requests: Iterable[InferenceRequest]) -> None:
        batch = list(requests)
        if not batch:
            return
        assert self._producer is not None, "start() first"

        with tracing.publishing(batch) as sent:
            await self._producer.submit_all(
                [
                    OutgoingMessage(
                        route.topics.requests,
                        schemas.encode(request),
                        message_key(request),
                        list(schemas.message_headers(request.AVRO_NAME)),
                    )
                    for request in sent
                ]
            )
        for request in batch:
            self._published.add(str(request.request_id))
        self.stats.published += len(batch)

    async def _dead_letter(
        self,
        route: Route,
        payload: bytes,
        reason: str,
        message: str,
        *,
        key: str | None,
        request_id: str | None = None,
        headers: dict[str, str] | None = None,
        source_event: str | None = None,
    ) -> None:
        producer = self._letter_producer or (
            self._producer.raw if self._producer is not None else None
        )
        letter = await asyncio.to_thread(
            lambda: send_unmappable(
                self.settings,
                model=route.mapping.model,
                source_payload=payload,
                reason_code=reason,
                message=message,
                source_system=route.mapping.source_system,
                producer=producer,
                source_key=key,
                source_headers=headers,
                request_id=request_id,
                connector=self.name,
                privacy=self.letter_privacy[route.mapping.model],
                source_event=source_event,
            )
        )
        # The letter's text, not ``message``: for a model with a pii policy it quotes no value.
        log.warning(
            'dead-lettered reason="%s" key="%s" message="%s"', reason, key, letter.reason_message
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
        results_topics = sorted(
            {route.topics.results for route in self.routes if route.writeback_spec is not None}
        )
        if not results_topics:
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
        consumer.subscribe(results_topics)
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
        by_entity: dict[tuple[str, str], list[InferenceResult]] = defaultdict(list)
        for message in messages:
            try:
                result = schemas.decode(message.value() or b"", InferenceResult)
            except DecodeError:
                continue
            named = entity_of(self.signer, result)
            if isinstance(named, Rejected):
                if named.reason != "not_ours":
                    self._count_forged(result, named.reason)
                continue
            by_entity[named].append(result)
        self._batch_done = False

        async def write_entity(named: tuple[str, str], results: list[InferenceResult]) -> None:
            route = self._routes_by_name.get(named[0])
            if route is None or route.writeback_spec is None:
                # Signed by us for a route this configuration no longer has: nowhere to write.
                self.stats.skipped += len(results)
                self.stats.skips["unknown_route"] += len(results)
                log.warning('writeback skipped: no route "%s" any more', named[0])
                return
            for result in results:
                await self._write_until_done(route, named[1], result, stop)

        await asyncio.gather(*(write_entity(n, rs) for n, rs in by_entity.items()))
        self._update_memory_stats()
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
        self, route: Route, predicate: str, result: InferenceResult, stop: asyncio.Event
    ) -> None:
        """Write one result; failures are retried (the partition waits) until it is written,
        dead-lettered as permanently unwritable, or the connector stops."""
        delay = 1.0
        while not stop.is_set():
            try:
                async with self._write_slots:
                    await self.write_result(predicate, result, route)
                return
            except ODataError as failure:
                if failure.status in PERMANENT_WRITE_STATUSES:
                    self.stats.write_failures += 1
                    await self._dead_letter(
                        route,
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

    async def write_result(
        self, predicate: str, result: InferenceResult, route: Route | None = None
    ) -> None:
        """Write one result back once: duplicates (same request id) are skipped."""
        route = route or self.routes[0]
        assert route.writeback_spec is not None
        request_id = str(result.request_id)
        if request_id in self._written:
            self.stats.already_written += 1
            return
        plan = plan_writeback(
            result, predicate=predicate, source=route.source, spec=route.writeback_spec
        )
        if isinstance(plan, Skip):
            self.stats.skipped += 1
            self.stats.skips[plan.reason] += 1
            return
        if plan.method == "POST":
            await route.odata.write(plan, None)
        elif not await self._update_entity(route, predicate, plan):
            self._written.add(request_id)
            self.stats.already_written += 1
            return
        self._written.add(request_id)
        self.stats.written += 1

    async def _update_entity(self, route: Route, predicate: str, plan: WritebackCall) -> bool:
        """PATCH/MERGE with the entity's current ETag; ``False`` when the marker shows it was
        already written (by a run that stopped before committing its offset)."""
        for attempt in range(1, WRITE_CONFLICT_ATTEMPTS + 1):
            try:
                record = await route.odata.read_entity(predicate)
            except EntityNotFound as gone:
                raise ODataError(str(gone), status=404) from None
            if plan.marker is not None:
                name, value = plan.marker
                if str(record.properties.get(name) or "") == value:
                    return False
            entity = route_subject(route.name, predicate)
            writing = self._writing[entity] = asyncio.Event()
            try:
                response = await route.odata.write(plan, record.etag)
                etag = response.headers.get("etag")
                if etag:
                    self._own_etags[entity] = etag
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
                del self._writing[entity]
            return True
        return True  # unreachable: the last attempt returns or raises

    # ------------------------------------------------------------------ HTTP receiver

    def web_app(self, path: str = "/events", guard: WebhookGuard | None = None) -> web.Application:
        """The receiver; ``guard`` (rate limit, authentication, events cap) comes before
        anything of a delivery is parsed, published or dead-lettered."""

        async def receive(request: web.Request) -> web.Response:
            refused, body = await _admitted(request)
            if refused is not None:
                return refused
            status, answer = await self.handle_http(
                dict(request.headers),
                body,
                max_events=guard.max_events if guard is not None else None,
            )
            headers = {"Retry-After": "5"} if status == 503 else None
            return web.json_response(answer, status=status, headers=headers)

        async def _admitted(request: web.Request) -> tuple[web.Response | None, bytes]:
            """The guard's refusal (429, 401) of ``request``, or ``None`` and its body. A
            signature-free mode authenticates before the body is read, so a stranger's large
            body is never read."""
            client = request.remote or "unknown"
            if guard is None:
                return None, await request.read()
            wait = guard.admit(client)
            if wait > 0:
                self.stats.rate_limited += 1
                return web.json_response(
                    {"error": "rate_limited"},
                    status=429,
                    headers={"Retry-After": retry_after(wait)},
                ), b""
            if not guard.needs_body():
                refused = await _authenticate(guard, request, b"", client)
                return refused, (b"" if refused is not None else await request.read())
            body = await request.read()
            return await _authenticate(guard, request, body, client), body

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

        async def handshake(request: web.Request) -> web.Response:
            # The CloudEvents webhook validation handshake (CloudEvents "HTTP 1.1 Web Hooks
            # for Event Delivery", section 4): the sender asks whether it may deliver here.
            # Guarded like a delivery: Event Mesh sends it with the subscription's
            # credentials, and an unauthenticated answer would tell a prober the path is live.
            refused, _ = await _admitted(request)
            if refused is not None:
                return refused
            answer = handshake_headers(
                request.headers.get("WebHook-Request-Origin"),
                guard.security.limits.per_client_rate if guard is not None else None,
            )
            if answer is None:
                return web.json_response(
                    {"error": "a validation request names its origin in WebHook-Request-Origin"},
                    status=400,
                    headers={"Allow": "OPTIONS, POST"},
                )
            return web.Response(status=200, headers=answer)

        async def health(_request: web.Request) -> web.Response:
            return web.json_response({"status": "ok", **self.stats.counters()})

        app = web.Application(client_max_size=self.settings.workers.max_message_bytes)
        app.router.add_post(path, receive)
        app.router.add_route("OPTIONS", path, handshake)
        app.router.add_get("/healthz", health)
        return app


async def pause(stop: asyncio.Event, seconds: float) -> None:
    """Wait ``seconds``, or less when ``stop`` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


_ORIGIN_MAX = 255


def handshake_headers(origin: str | None, rate: float | None) -> dict[str, str] | None:
    """The answer headers to a webhook validation request from ``origin``, or ``None`` when
    it names none (or something that is no host name: it is echoed back, so it must be
    plain). ``rate``: deliveries per second allowed to one sender, announced so that a
    well-behaved sender never meets a 429."""
    if origin is None:
        return None
    origin = origin.strip()
    if not origin or len(origin) > _ORIGIN_MAX or not origin.isascii():
        return None
    if any(not (c.isalnum() or c in ".-_:*[]") for c in origin):
        return None
    headers = {"WebHook-Allowed-Origin": origin, "Allow": "OPTIONS, POST"}
    if rate is not None:
        # Requests per minute, a whole number (the spec's unit); at least 1.
        headers["WebHook-Allowed-Rate"] = str(max(1, int(rate * 60)))
    return headers


def _invalidation(
    route: Route,
    event: CloudEvent,
    entity_key: str,
    kind: EventKind,
    request_id: str,
    occurred_at: datetime,
    connector: str,
) -> Invalidation:
    return Invalidation(
        event_id=uuid.UUID(request_id),
        model=route.mapping.model,
        entity_key=entity_key,
        kind=InvalidationKind.CANCELLED if kind is EventKind.CANCEL else InvalidationKind.DELETED,
        source_system=route.mapping.source_system,
        source_event_id=event_key(event),
        occurred_at=occurred_at,
        connector=connector,
        reason=event.type,
    )


def _event_time(event: CloudEvent, clock: Callable[[], datetime]) -> datetime:
    """When the event happened (its ``time``), else now; a ``time`` that is no timestamp
    is not worth refusing a cancellation for."""
    if event.time:
        try:
            return parse_datetime(event.time)
        except ValueError:
            pass
    return clock()


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
    settings: Settings,
    topic: str,
    source_systems: str | Collection[str],
    since: datetime,
    timeout_s: float = 30.0,
) -> set[str]:
    """Ids of the requests of ``source_systems`` published to ``topic`` since ``since``.

    The requests topic is the truth of what was published: a connector killed after the
    broker acked a request but before it answered the sender finds the request here, and the
    redelivered event is recognised as a duplicate.
    """
    systems = {source_systems} if isinstance(source_systems, str) else set(source_systems)
    found: set[str] = set()
    for value in _read_since(settings, topic, since, timeout_s):
        try:
            request = schemas.decode(value, InferenceRequest)
        except DecodeError:
            continue
        if request.source is not None and request.source.system in systems:
            found.add(str(request.request_id))
    return found


def dead_lettered_events(
    settings: Settings, topic: str, since: datetime, timeout_s: float = 30.0
) -> set[str]:
    """The source-event keys of the letters written to the DLQ ``topic`` since ``since``,
    read from their headers alone: a letter's value (perhaps sealed) is never opened."""
    found: set[str] = set()
    for message in _messages_since(settings, topic, since, timeout_s):
        key = letter_source_event(message.headers())
        if key is not None:
            found.add(key)
    return found


def _read_since(
    settings: Settings, topic: str, since: datetime, timeout_s: float
) -> Iterator[bytes]:
    """The values of ``topic`` written since ``since``, to the topic's end as of now."""
    for message in _messages_since(settings, topic, since, timeout_s):
        value = message.value()
        if value:  # a tombstone carries nothing to learn
            yield value


def _messages_since(
    settings: Settings, topic: str, since: datetime, timeout_s: float
) -> Iterator[Message]:
    """The records of ``topic`` written since ``since``, to the topic's end as of now."""
    consumer = clients.consumer(
        settings.kafka,
        group_id=clients.throwaway_group("sluiceway-dedupe"),
        role=ConsumerRole.SNAPSHOT,
    )
    try:
        metadata = consumer.list_topics(topic, timeout=timeout_s)
        partitions = sorted(metadata.topics[topic].partitions)
        since_ms = int(since.timestamp() * 1000)
        starts = consumer.offsets_for_times(
            [TopicPartition(topic, p, since_ms) for p in partitions], timeout=timeout_s
        )
        assigned = [tp for tp in starts if tp.offset >= 0]
        if not assigned:
            return
        consumer.assign(assigned)
        open_partitions = {tp.partition for tp in assigned}
        while open_partitions:
            message = consumer.poll(timeout_s)
            if message is None:
                raise TimeoutError(f"reading {topic} for handled events timed out")
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    open_partitions.discard(int(message.partition() or 0))
                    continue
                raise KafkaException(error)
            yield message
    finally:
        consumer.close()


def invalidated_events(
    settings: Settings, topic: str, connector: str, since: datetime, timeout_s: float = 30.0
) -> tuple[set[str], set[str]]:
    """The event ids (request-id form) and entities (:func:`cancelled_key`) of the
    invalidations ``connector`` published to ``topic`` since ``since``: a restarted connector
    neither publishes a redelivered cancellation again nor scores a cancelled entity."""
    events: set[str] = set()
    entities: set[str] = set()
    for value in _read_since(settings, topic, since, timeout_s):
        try:
            invalidation = schemas.decode(value, Invalidation)
        except DecodeError:
            continue
        if invalidation.connector != connector:
            continue
        events.add(str(invalidation.event_id))
        entities.add(
            cancelled_key(
                invalidation.source_system or "", invalidation.model, invalidation.entity_key
            )
        )
    return events, entities


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
