"""Intake: the CloudEvents the webhook receives, each to a request, an invalidation, a dead
letter, a duplicate or a skip (:data:`~connectors.sap.core.OUTCOMES`).

Per business event (CloudEvent pushed to ``POST <path>``, :mod:`connectors.sap.receiver`):

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
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from connectors.common.dates import parse_datetime
from connectors.sap.cloudevents import CloudEvent, parse_http
from connectors.sap.core import (
    MALFORMED_ROUTE,
    Route,
    SapCore,
    cancelled_key,
    event_key,
    event_letter_key,
    malformed_letter_key,
    pause,
)
from connectors.sap.exceptions import EntityNotFound, ODataError
from connectors.sap.odata import key_predicate
from connectors.sap.routing import EventKind, event_kind, route_for, route_subject
from connectors.sap.writeback import correlation_id
from pipeline.client import ClientError
from schemas.errors import UnservableRecord
from schemas.identity import request_id_for
from schemas.models import Invalidation, InvalidationKind

log = logging.getLogger(__name__)

EVENTS_STREAM = "events"
"""Checkpoint stream of push mode: the id of the newest event whose request was acked."""
TRANSIENT_FAILURES = (ODataError, ClientError)
"""What answers 503 (the sender delivers again) rather than ending the event: OData calls and
publishing that failed (an OData refusal too: the same event may read once access is back)."""


class EventIntake:
    """Events in, acknowledged requests (or invalidations, letters) out."""

    def __init__(self, core: SapCore) -> None:
        self.core = core
        self.stats = core.stats
        self._in_flight: dict[str, asyncio.Future[str]] = {}
        self._newest_event: str | None = None
        self._saved_event: str | None = None

    def started(self) -> None:
        """Take the saved event position from the loaded checkpoints."""
        self._saved_event = self.core.positions.get(EVENTS_STREAM)

    async def handle_http(
        self, headers: dict[str, str], body: bytes, *, max_events: int | None = None
    ) -> tuple[int, dict[str, Any]]:
        """The HTTP answer to one push: 200 once every event is published (or dead-lettered,
        invalidated, skipped), 503 when something transient failed (the sender delivers
        again), 413 (nothing published) when a batch holds more than ``max_events`` events."""
        try:
            events = parse_http(headers, body)
        except UnservableRecord as invalid:
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
        except TRANSIENT_FAILURES as failure:
            log.warning('event intake failed, sender will retry error="%s"', failure)
            return 503, {"error": str(failure)}
        finally:
            self.core.count_memory()
        return 200, {"outcomes": outcomes}

    async def _malformed_delivery(
        self, headers: dict[str, str], body: bytes, invalid: UnservableRecord
    ) -> dict[str, Any]:
        """Dead-letter a body that is no CloudEvent, once: a broker redelivers what it sent,
        and a second dead letter would be a second task for a person, about nothing new."""
        self.stats.events += 1
        self.stats.malformed += 1
        key = malformed_letter_key(body)
        if key in self.core.memory.malformed:
            self.stats.duplicates += 1
            self.stats.count_outcome(MALFORMED_ROUTE, "duplicate")
            return {"outcome": "duplicate", "reason": invalid.reason_code}
        await self.core.dead_letter(
            self.core.first,
            body,
            invalid,
            key=None,
            headers=_ce_headers(headers),
            source_event=key,
        )
        self.core.memory.malformed.add(key)
        self.stats.count_outcome(MALFORMED_ROUTE, "dead_letter")
        return {"outcome": "dead_letter", "reason": invalid.reason_code}

    async def ingest_event(self, event: CloudEvent) -> str:
        """Handle one event; returns its outcome (:data:`OUTCOMES`). Transient failures raise
        (:data:`TRANSIENT_FAILURES`) and count no outcome: the sender retries."""
        route = route_for(self.core.routes, event)
        if route is None:
            self.stats.events += 1
            self.stats.skipped_events["unmapped_type"] += 1
            self.stats.count_outcome("(unmapped)", "skipped")
            log.info(
                'event skipped: no mapping takes it type="%s" source="%s"', event.type, event.source
            )
            return "skipped"
        request_id = str(request_id_for(route.mapping.source_system, event_key(event)))
        if request_id in self.core.memory.published:
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
            self.stats.count_outcome(route.label, outcome)
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
        self.stats.count_outcome(route.label, "duplicate")
        return "duplicate"

    async def _ingest(self, route: Route, event: CloudEvent, request_id: str) -> str:
        core, memory = self.core, self.core.memory
        payload = json.dumps(event.structured()).encode()
        kind = event_kind(event.type)
        try:
            if not isinstance(event.data, dict):
                raise UnservableRecord("missing_key", "the event's data carries no entity keys")
            try:
                predicate = key_predicate(route.source, event.data)
            except KeyError as missing:
                raise UnservableRecord(
                    "missing_key", f"the event's data lacks key field {missing.args[0]!r}"
                ) from None
            except ValueError as invalid:
                raise UnservableRecord("invalid_key", str(invalid)) from None
            entity = route_subject(route.name, predicate)
            if kind is not EventKind.SCORE:
                await self._invalidate(route, event, predicate, kind, request_id)
                memory.published.add(request_id)
                self._newest_event = event.id
                return "invalidation"
            try:
                record = await route.odata.read_entity(predicate)
            except EntityNotFound as gone:
                raise UnservableRecord("entity_not_found", str(gone)) from None
            if await core.own_writes.is_own_change(entity, record):
                self.stats.own_changes += 1
                self.stats.skipped_events["own_change"] += 1
                return "skipped"
            request = route.mapping.to_request(
                record.properties,
                source_event_id=event_key(event),
                correlation_id=correlation_id(core.signer, entity, request_id),
            )
            if memory.is_cancelled(request):
                # Out of order: the cancellation came first. The document is void; a score
                # of it would be a prediction about nothing.
                self.stats.skipped_events["cancelled"] += 1
                memory.published.add(request_id)
                return "skipped"
        except UnservableRecord as unservable:
            await core.dead_letter(
                route,
                payload,
                unservable,
                key=event.id,
                request_id=request_id,
                source_event=event_letter_key(request_id),
            )
            memory.published.add(request_id)
            return "dead_letter"
        await core.publish([request])
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
        entity_key = await self._entity_id(route, event.data, predicate)
        try:
            invalidation = _invalidation(
                route,
                event,
                entity_key,
                kind,
                request_id,
                _event_time(event, self.core.clock),
                self.core.name,
            )
        except ValidationError as invalid:
            # Hostile or oversized attributes (an id longer than the contract allows):
            # the event is unusable as sent, like a missing key.
            raise UnservableRecord(
                "invalid_event", f"the cancellation does not fit the contract: {invalid}"
            ) from None
        self.core.memory.cancelled.add(
            cancelled_key(route.mapping.source_system, route.mapping.model, entity_key)
        )
        await self.core.invalidate(invalidation)
        log.info(
            'invalidation published entity="%s" model="%s" kind="%s"',
            entity_key,
            route.mapping.model,
            invalidation.kind.value,
        )

    async def _entity_id(self, route: Route, keys: dict[str, Any], predicate: str) -> str:
        """The entity id (the Kafka key of its requests) of a cancelled entity: from the
        event's keys when the template needs no more, else from the entity as SAP still
        serves it (a cancelled document stays readable). ``UnservableRecord`` when neither
        names it: an invalidation that no consumer could match is no invalidation."""
        try:
            return route.mapping.entity_id(keys)
        except UnservableRecord:
            pass
        try:
            record = await route.odata.read_entity(predicate)
        except EntityNotFound:
            raise UnservableRecord(
                "missing_key",
                "the cancelled entity is gone and the event's keys do not fill the entity id",
            ) from None
        return route.mapping.entity_id(record.properties)

    # ------------------------------------------------------------------ checkpoint

    async def save_event_checkpoint(self) -> None:
        newest = self._newest_event
        if newest is not None and newest != self._saved_event:
            await asyncio.to_thread(self.core.checkpoints.save, EVENTS_STREAM, newest)
            self._saved_event = newest
            self.core.positions[EVENTS_STREAM] = newest

    async def run_checkpoints(self, stop: asyncio.Event, interval_s: float = 0.5) -> None:
        """Save the newest acked event id now and then (each request was acked before it)."""
        while not stop.is_set():
            await pause(stop, interval_s)
            await self.save_event_checkpoint()


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
